"""Importing published PyTorch weights into restorer models, faithfully and without running them.

``restorer convert model.pth out.safetensors`` reads the file with :mod:`restorer.weights.unpickle`
(state dicts and whole pickled modules, zip and legacy formats; nothing from the file runs), then:

1. finds the weights: a state dict (possibly under ``state_dict``/``params``/``model``...) or a
   pickled ``nn.Module`` (its layers in ``_modules`` order, with their class names and
   attributes such as BatchNorm's ``eps``);
2. infers the DnCNN layout from what was read (channels, width, depth, BatchNorm and its eps,
   bias on the last convolution), builds that net and checks layer by layer that the file holds
   exactly its tensors, shapes and (for a pickled module) layer types and attributes;
3. saves a restorer model whose provenance names the source file (sha256), its format and the
   detected layout.

A file that does not fit is refused with a list of what it holds. ``--net ARCH`` with shape
flags imports other archs by exact tensor names and shapes (or the same shapes in the same
order); for ``dncnn`` the flags must agree with what the file holds.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from restorer.errors import ModelError
from restorer.io import storage
from restorer.nets import NETS, build_net, net_spec
from restorer.weights.checkpoint import save_model
from restorer.weights.unpickle import (
    ObjectRecord,
    is_module_record,
    module_leaves,
    module_tensors,
    read_torch_file,
)

log = logging.getLogger(__name__)

# The nets whose shape the command-line flags describe (an opponent or noise-map net's trunk is
# a net spec of its own: build it from a converted net instead).
FLAG_NETS = tuple(sorted(arch for arch in NETS if arch not in ("opponent", "noisemap")))

# Keys under which training scripts keep a state dict next to other things.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "params_ema", "params", "model", "net")

# Attributes a pickled layer must have (when it has them at all) to be one of our DnCNN's.
DNCNN_LAYER_ATTRIBUTES: dict[str, dict[str, Any]] = {
    "Conv2d": {"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1),
               "groups": 1, "transposed": False, "output_padding": (0, 0),
               "padding_mode": "zeros"},
    "BatchNorm2d": {"affine": True, "track_running_stats": True},
    "ReLU": {"threshold": 0, "value": 0},  # old torch's ReLU was Threshold(0, 0)
}


@dataclass(frozen=True)
class FoundLayer:
    name: str  # dotted module name in the file ("dncnn.3"), "" for a bare tensor group
    kind: str  # pickled class name ("Conv2d"); for a state dict guessed from its tensors
    shapes: dict[str, tuple[int, ...] | None]  # tensor name -> shape; None: registered as None
    attributes: dict[str, Any] = field(default_factory=dict)  # pickled attributes (eps...)
    pickled: bool = False  # kind and attributes come from a pickled module, not a guess


@dataclass(frozen=True)
class Found:
    """What a weights file holds, read without running it."""
    format: str  # "legacy torch.save", "zip torch.save" or "safetensors"
    content: str  # "state dict" or "whole module __main__.DnCNN"
    tensors: dict[str, torch.Tensor]  # state dict order
    layers: list[FoundLayer]

    def describe(self, limit: int = 40) -> str:
        lines = []
        for layer in self.layers[:limit]:
            shapes = ", ".join(f"{k} {'x'.join(map(str, s)) if s else 'scalar'}"
                               if s is not None else f"{k} None" for k, s in layer.shapes.items())
            lines.append(f"  {layer.name or '(top)'} {layer.kind}" + (f": {shapes}" if shapes
                                                                        else ""))
        if len(self.layers) > limit:
            lines.append(f"  ... and {len(self.layers) - limit} more layers")
        return "\n".join(lines)


def convert_weights(source: str, target: str, spec: Mapping[str, Any] | None = None,
                    key_prefix: str = "", batch_norm_eps: float | None = None) -> str:
    """Import ``source`` into a restorer model at ``target``; returns the model's sha256.

    ``spec`` is ``None`` or ``{"arch": "dncnn", ...}`` to infer a DnCNN layout (given fields
    must agree with the file), or another arch's full spec to load by names/shapes.
    ``batch_norm_eps`` sets BatchNorm's eps where the file does not record it (state dicts).
    """
    data = storage.read_bytes(source)
    found = read_weights(data, source, key_prefix)
    spec = dict(spec or {"arch": "dncnn"})
    notes: list[str] = []
    if spec.get("arch") == "dncnn":
        try:
            inferred, notes = infer_dncnn(found, source, batch_norm_eps)
        except ModelError as e:
            if len(spec) == 1 or any(layer.pickled for layer in found.layers):
                raise
            # A state dict with flat names (model.0, model.1...) hides its layers: the flags
            # give the layout, and the tensors must then have its shapes in its order.
            log.warning("%s; taking the layout from the flags", e)
            notes = ["layout from the command-line flags, not inferred from the file"]
            if batch_norm_eps is not None:
                spec["batch_norm_eps"] = batch_norm_eps
        else:
            for name, value in spec.items():
                if inferred.get(name) != value:
                    raise ModelError(
                        f"{source} does not match net {spec}: the file holds a dncnn with "
                        f"{name}={inferred.get(name)!r}; drop the flag to take the file's layout")
            spec = inferred
    elif spec.get("arch") not in FLAG_NETS:
        raise ModelError(f"Unknown net arch {spec.get('arch')!r}; --net options: "
                         f"{', '.join(FLAG_NETS)}")
    net = build_net(spec)
    spec = net_spec(net)  # every field, defaults included
    _load_by_order(net, found, source, spec)
    layout = describe_spec(spec)
    log.info("importing %s (%s, %s) as %s", source, found.format, found.content, layout)
    provenance = {"imported": {
        "source": source, "sha256": hashlib.sha256(data).hexdigest(), "format": found.format,
        "content": found.content, "layout": layout, "key_prefix": key_prefix, "notes": notes,
    }}
    return save_model(target, net.eval(), provenance)


def read_weights(data: bytes, source: str, key_prefix: str = "") -> Found:
    """The tensors and layers of a weights file (torch.save or safetensors), nothing run."""
    if len(data) >= 10 and data[8:9] == b"{":
        # safetensors keeps no order: take the names' (body.2 before body.10)
        tensors = dict(sorted(load_safetensors(data).items(), key=lambda kv: _natural(kv[0])))
        return _state_dict_found("safetensors", "state dict", tensors, key_prefix, source)
    torch_file = read_torch_file(data, source)
    fmt = f"{torch_file.format} torch.save" + (" (before PyTorch 1.6)"
                                                if torch_file.format == "legacy" else "")
    obj, where = torch_file.obj, ""
    for _ in range(2):  # {"state_dict": {...}} or {"model": <module>}
        if isinstance(obj, Mapping) and not is_module_record(obj):
            key = next((k for k in STATE_DICT_KEYS if k in obj), None)
            if key is None:
                break
            obj, where = obj[key], f" under {key!r}"
    if is_module_record(obj):
        return _module_found(fmt, obj, where, key_prefix)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _state_dict_found(fmt, f"state dict{where}", dict(obj), key_prefix, source)
    what = obj.qualname if isinstance(obj, ObjectRecord) else type(obj).__name__
    keys = f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else ""
    raise ModelError(f"{source} holds a {what}{keys}, neither a state dict of tensors nor a "
                     "pickled nn.Module")


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _state_dict_found(fmt: str, content: str, tensors: Mapping[str, torch.Tensor],
                      key_prefix: str, source: str) -> Found:
    tensors = {_strip(k, key_prefix): v for k, v in tensors.items()}
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        groups.setdefault(module, {})[leaf] = tuple(tensor.shape)
    layers = [FoundLayer(name, _guess_kind(shapes), shapes) for name, shapes in groups.items()]
    return Found(fmt, content, dict(tensors), layers)


def _guess_kind(shapes: Mapping[str, tuple[int, ...]]) -> str:
    if "running_mean" in shapes:
        return "BatchNorm2d"
    if len(shapes.get("weight") or ()) == 4:
        return "Conv2d"
    return "?"


def _module_found(fmt: str, record: ObjectRecord, where: str, key_prefix: str) -> Found:
    tensors = {_strip(k, key_prefix): v for k, v in module_tensors(record)
               if isinstance(v, torch.Tensor)}
    layers = []
    for name, leaf in module_leaves(record):
        shapes = {}
        for group in ("_parameters", "_buffers"):
            for key, value in (leaf.state.get(group) or {}).items():
                shapes[key] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        attributes = {k: v for k, v in leaf.state.items() if not k.startswith("_")
                      and isinstance(v, (int, float, str, bool, tuple, type(None)))}
        layers.append(FoundLayer(_strip(name, key_prefix), leaf.class_name, shapes, attributes,
                                 pickled=True))
    return Found(fmt, f"whole module {record.qualname}{where}", tensors, layers)


def infer_dncnn(found: Found, source: str, batch_norm_eps: float | None = None
                ) -> tuple[dict[str, Any], list[str]]:
    """The dncnn spec that holds exactly ``found``'s layers, and notes on what was assumed."""
    layers = [layer for layer in found.layers if layer.shapes or layer.pickled]
    convs = [layer for layer in layers if layer.kind == "Conv2d"]
    norms = [layer for layer in layers if layer.kind == "BatchNorm2d"]
    first = convs[0].shapes.get("weight") if convs else None
    if len(convs) < 2 or first is None or len(first) != 4:
        raise _not_dncnn(found, source, "fewer than two 3x3 convolutions")
    notes: list[str] = []
    eps_values = {layer.attributes["eps"] for layer in norms if "eps" in layer.attributes}
    if len(eps_values) > 1:
        raise _not_dncnn(found, source, f"BatchNorm layers with different eps {eps_values}")
    if eps_values:
        eps = float(eps_values.pop())
        if batch_norm_eps is not None and batch_norm_eps != eps:
            raise ModelError(f"{source} records BatchNorm eps {eps}, --batch-norm-eps says "
                             f"{batch_norm_eps}; drop the flag")
    else:
        eps = 1e-5 if batch_norm_eps is None else batch_norm_eps
        if norms:
            notes.append(f"BatchNorm eps is not stored in a state dict: {eps} "
                         + ("as given" if batch_norm_eps is not None else "assumed (torch's "
                            "default; pass --batch-norm-eps if the authors used another)"))
    pickled = any(layer.pickled for layer in found.layers)
    if not pickled:
        notes.append("layout inferred from tensor shapes: a state dict stores no activations "
                     "and no forward(); DnCNN's ReLUs and residual x - noise are assumed")
    last_bias = convs[-1].shapes.get("bias") is not None
    spec = {"arch": "dncnn", "channels": first[1], "num_features": first[0],
            "num_layers": len(convs), "batch_norm": bool(norms), "batch_norm_eps": eps,
            "last_bias": last_bias}
    try:
        net = build_net(spec)
    except (ModelError, ValueError, RuntimeError) as e:
        raise _not_dncnn(found, source, str(e)) from None
    ours = [(type(m).__name__, m) for m in net.body]
    if pickled:
        theirs = [layer.kind for layer in layers]
        if theirs != [kind for kind, _ in ours]:
            raise _not_dncnn(found, source, f"layer types {_runs(theirs)}, where dncnn has "
                                            f"{_runs([kind for kind, _ in ours])}")
        for layer in layers:
            for key, value in layer.attributes.items():
                want = DNCNN_LAYER_ATTRIBUTES.get(layer.kind, {}).get(key, value)
                if _plain(value) != _plain(want):
                    raise _not_dncnn(found, source, f"{layer.name} has {key}={value!r}, "
                                                    f"dncnn's {layer.kind} has {want!r}")
    ours_shapes = [(kind, {k: tuple(t.shape) for k, t in _own_tensors(m)})
                   for kind, m in ours if kind != "ReLU"]
    theirs_shapes = [(layer.kind, {k: s for k, s in layer.shapes.items() if s is not None})
                     for layer in layers if layer.kind != "ReLU"]
    if [_comparable(x) for x in ours_shapes] != [_comparable(x) for x in theirs_shapes]:
        raise _not_dncnn(found, source, f"tensors that differ from {describe_spec(spec)}")
    return spec, notes


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _comparable(layer: tuple[str, dict[str, tuple[int, ...]]]) -> tuple:
    # num_batches_tracked arrived in PyTorch 0.4.1; older files lack it and it does not matter.
    kind, shapes = layer
    return kind, sorted((k, s) for k, s in shapes.items() if k != "num_batches_tracked")


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _runs(kinds: list[str]) -> str:
    return " ".join(kinds[:8]) + (f" ... ({len(kinds)} layers)" if len(kinds) > 8 else "")


def _not_dncnn(found: Found, source: str, reason: str) -> ModelError:
    return ModelError(
        f"{source} ({found.format}, {found.content}) is not a layout restorer can import "
        f"faithfully: {reason}. It holds:\n{found.describe()}\n"
        f"--net options: {', '.join(FLAG_NETS)} (only dncnn is inferred; other nets need "
        "their shape flags and tensors that match exactly)"
    )


def describe_spec(spec: Mapping[str, Any]) -> str:
    """One line for a net spec, e.g. ``dncnn: 17 layers, 64 features, 1 channel, ...``."""
    if spec.get("arch") != "dncnn":
        return ", ".join(f"{k}={v}" for k, v in spec.items())
    parts = [f"dncnn: {spec['num_layers']} layers", f"{spec['num_features']} features",
             f"{spec['channels']} channel" + ("s" if spec["channels"] != 1 else "")]
    parts.append(f"BatchNorm eps {spec.get('batch_norm_eps', 1e-5):g}" if spec.get("batch_norm",
                                                                                   True)
                 else "no BatchNorm")
    if not spec.get("last_bias", True):
        parts.append("no bias on the last convolution")
    return ", ".join(parts)


def _load_by_order(net: nn.Module, found: Found, source: str, spec: Mapping[str, Any]) -> None:
    """Load ``found``'s tensors into ``net``: by name; else layer by layer in order (tensor
    names within a layer must agree: weight, bias, running_mean...); else, for flat names
    (model.0, model.1...), the same shapes in the same order."""
    expected = net.state_dict()
    state = dict(found.tensors)
    if set(state) != set(expected):
        renamed = _rename_by_layers(expected, state) or _rename_by_order(expected, state)
        if renamed is None:
            missing = sorted(set(expected) - set(state))[:5]
            extra = sorted(set(state) - set(expected))[:5]
            raise ModelError(f"{source} does not match net {dict(spec)}: missing {missing}, "
                             f"unexpected {extra}. It holds:\n{found.describe()}\n"
                             "Check the --net options and --key-prefix")
        state = renamed
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{source} does not match net {dict(spec)}: {e}") from None


def _layers(state: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        groups.setdefault(module, {})[leaf] = tensor
    return list(groups.items())


def _rename_by_layers(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor] | None:
    ours, theirs = _layers(expected), _layers(state)
    if len(ours) != len(theirs):
        return None
    renamed = {}
    for (our_module, our_tensors), (_, their_tensors) in zip(ours, theirs):
        for leaf, tensor in our_tensors.items():
            if leaf in their_tensors and their_tensors[leaf].shape == tensor.shape:
                renamed[f"{our_module}.{leaf}" if our_module else leaf] = their_tensors[leaf]
            elif not _is_counter(leaf, tensor):  # old files lack num_batches_tracked
                return None
            else:
                renamed[f"{our_module}.{leaf}" if our_module else leaf] = tensor
        if set(their_tensors) - set(our_tensors):
            return None
    return renamed


def _rename_by_order(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor] | None:
    ours = [(k, v) for k, v in expected.items() if not _is_counter(k, v)]
    theirs = [(k, v) for k, v in state.items() if not _is_counter(k, v)]
    if len(ours) != len(theirs) or any(a.shape != b.shape for (_, a), (_, b) in
                                       zip(ours, theirs)):
        return None
    renamed = {name: tensor for (name, _), (_, tensor) in zip(ours, theirs)}
    # Counters of BatchNorm updates: theirs by position when both have them, else ours.
    ours_counts = [k for k, v in expected.items() if _is_counter(k, v)]
    theirs_counts = [v for k, v in state.items() if _is_counter(k, v)]
    counts = (dict(zip(ours_counts, theirs_counts)) if len(ours_counts) == len(theirs_counts)
              else {k: expected[k] for k in ours_counts})
    return {**renamed, **counts}


def _is_counter(name: str, tensor: torch.Tensor) -> bool:
    """BatchNorm's num_batches_tracked (PyTorch >= 0.4.1): a count, not a weight."""
    return name.endswith("num_batches_tracked") or (tensor.dim() == 0
                                                    and not tensor.is_floating_point())


__all__ = ["Found", "convert_weights", "describe_spec", "infer_dncnn", "read_weights"]
