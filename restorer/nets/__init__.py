"""Restoration nets: ``nn.Module`` definitions only, one architecture per file.

Every net takes float32 ``[0, 1]`` NCHW input and returns the restored image (never the
residual), with these attributes that the tiler and the pipeline rely on:

- ``channels``: planes in and out (1 gray, 3 RGB);
- ``scale``: output size / input size (1, or 2/4 for super-resolution);
- ``receptive_field``: width in input pixels of what one output pixel sees; tiles overlap by at
  least this much so that tiled and whole-image outputs agree;
- ``alignment`` (optional, default 1): the net is translation-equivariant in steps of this many
  input pixels (``2 ** (levels - 1)`` for a U-Net), so tiles start on multiples of it.

A net spec is a plain mapping ``{"arch": NAME, **config fields}``; it is stored inside every
checkpoint, so a checkpoint rebuilds its own net.
"""

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from torch import nn

from restorer.errors import ModelError
from restorer.nets.dncnn import DnCNN
from restorer.nets.srnet import SRNet
from restorer.nets.unet import UNet

NETS: dict[str, type[nn.Module]] = {
    "dncnn": DnCNN,
    "srnet": SRNet,
    "unet": UNet,
}


def build_net(spec: Mapping[str, Any]) -> nn.Module:
    """Build a net from ``{"arch": NAME, **config}``; unknown archs and keys are errors."""
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
    return net_class(config)


def net_spec(net: nn.Module) -> dict[str, Any]:
    """The spec that rebuilds ``net`` with :func:`build_net`."""
    for arch, net_class in NETS.items():
        if type(net) is net_class:
            return {"arch": arch, **asdict(net.config)}
    raise ModelError(f"{type(net).__name__} is not a registered net; add it to restorer.nets.NETS")
