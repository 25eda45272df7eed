"""Restoration nets: ``nn.Module`` definitions only, one architecture per file.

Every net takes float32 ``[0, 1]`` NCHW input and returns the restored image (never the
residual), and declares the interface that the tiler, the restore actor, training and
evaluation rely on (:class:`RestorationNet`; every class in ``NETS`` provides all of it):

- ``channels``: planes in and out (1 gray, 3 RGB);
- ``scale``: output size / input size (1, or 2/4 for super-resolution);
- ``alignment``: the net is translation-equivariant in steps of this many input pixels (1 for
  a plain convolution stack, ``2 ** (levels - 1)`` for a U-Net), so tiles start on multiples
  of it;
- ``receptive_field``: width in input pixels of what one output pixel sees; tiles overlap by at
  least this much so that tiled and whole-image outputs agree;
- ``runs_per_pixel``: how many times the net's layers run per input pixel (1; an opponent net's
  trunk runs once per plane, 3), for the cost a worker plan reads
  (:func:`restorer.job.sizing.macs_per_pixel`).

A net spec is a plain mapping ``{"arch": NAME, **config fields}``; it is stored inside every
checkpoint, so a checkpoint rebuilds its own net. Config fields use torch's vocabulary
(``num_features``, ``num_blocks``, ``num_layers``); the U-Net's first names, ``features`` and
``blocks`` (``ALIASES``), stay accepted, so model files written with them load unchanged.
"""

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from restorer.errors import ModelError
from restorer.nets.dncnn import DnCNN
from restorer.nets.noisemap import NoiseMapNet
from restorer.nets.opponent import OpponentNet
from restorer.nets.srnet import SRNet
from restorer.nets.unet import UNet


@runtime_checkable
class RestorationNet(Protocol):
    """What restorer uses of a net besides ``nn.Module`` (see the module docstring)."""

    channels: int  # planes in and out: 1 gray, 3 RGB
    scale: int  # output side / input side
    alignment: int  # tiles start on multiples of this many input pixels
    runs_per_pixel: int  # times the layers run per input pixel (an opponent net's trunk: 3)

    @property
    def receptive_field(self) -> int:
        """Width in input pixels of what one output pixel sees."""
        ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


NETS: dict[str, type[nn.Module]] = {
    "dncnn": DnCNN,
    "noisemap": NoiseMapNet,
    "opponent": OpponentNet,
    "srnet": SRNet,
    "unet": UNet,
}
# Bounds on a spec before its net is allocated (a spec may come from a file's metadata: a
# hostile or corrupt one must not exhaust an actor's memory): each integer field, and the
# parameters of the net (counted on the meta device, which allocates nothing).
MAX_CONFIG_INT = 4096  # channels, features, layers, blocks, levels, scale
MAX_NET_PARAMETERS = 200_000_000  # 800 MB of float32 weights; the zoo's largest has ~2 M

# Former names of config fields -> their names now; files written with them still load.
ALIASES = {"features": "num_features", "blocks": "num_blocks"}


def canonical_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with former field names (``ALIASES``) renamed to today's; giving a field under
    both names is an error."""
    renamed: dict[str, Any] = {}
    for key, value in spec.items():
        name = ALIASES.get(key, key)
        if name != key and name in spec:
            raise ModelError(f"The net spec {dict(spec)} gives both {key!r} and {name!r}; "
                             f"give {name!r} only")
        renamed[name] = value
    return renamed


def build_net(spec: Mapping[str, Any]) -> nn.Module:
    """Build a net (an ``nn.Module`` that is a :class:`RestorationNet`) from
    ``{"arch": NAME, **config}``; former field names are accepted (``ALIASES``), unknown archs
    and keys are errors."""
    spec = canonical_spec(spec)
    arch = spec.get("arch")
    if arch not in NETS:
        raise ModelError(f"Unknown net arch {arch!r}; known: {', '.join(sorted(NETS))}")
    net_class = NETS[arch]
    config_class = net_class.config_class
    allowed = {f.name for f in fields(config_class)}
    unknown = sorted(set(spec) - allowed - {"arch"})
    if unknown:
        raise ModelError(
            f"Unknown keys {unknown} in the spec of net {arch!r}; allowed: {sorted(allowed)}"
        )
    config = config_class(**{k: v for k, v in spec.items() if k != "arch"})
    _check_size(arch, config, net_class)
    return net_class(config)


def _check_size(arch: str, config: Any, net_class: type[nn.Module]) -> None:
    """Refuse a config whose integers or parameter count exceed ``MAX_CONFIG_INT`` /
    ``MAX_NET_PARAMETERS`` before anything is allocated."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, int) and not isinstance(value, bool) and not (
                0 <= value <= MAX_CONFIG_INT):
            raise ModelError(f"Net {arch!r}: {f.name} = {value} is outside 0..{MAX_CONFIG_INT}; "
                             "the model's spec (or its file's metadata) is corrupt or hostile")
    with torch.device("meta"):
        count = sum(p.numel() for p in net_class(config).parameters())
    if count > MAX_NET_PARAMETERS:
        raise ModelError(f"Net {arch!r} with {asdict(config)} would hold {count:,} parameters, "
                         f"more than {MAX_NET_PARAMETERS:,}; the model's spec (or its file's "
                         "metadata) is corrupt or hostile")


def net_spec(net: nn.Module) -> dict[str, Any]:
    """The spec that rebuilds ``net`` with :func:`build_net` (today's field names)."""
    for arch, net_class in NETS.items():
        if type(net) is net_class:
            config = asdict(net.config)
            defaults = {f.name: f.default for f in fields(net.config)}
            for name in getattr(net.config, "omitted_at_default", ()):
                if config[name] == defaults[name]:  # specs written before it existed
                    del config[name]
            return {"arch": arch, **config}
    raise ModelError(f"{type(net).__name__} is not a registered net; add it to restorer.nets.NETS")
