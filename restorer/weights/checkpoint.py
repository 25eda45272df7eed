"""Weights in safetensors beside the spec that built them; never unpickled.

A model file is a safetensors file whose string metadata holds:

- ``format``: ``"restorer.model"``, ``format_version``: ``"1"``;
- ``net``: JSON of the net spec (``{"arch": ..., **config}``), see :mod:`restorer.nets`;
- ``provenance``: JSON (how it was trained: command, data, steps, metrics), optional.

Pickled checkpoints (``.pth``/``.pt``/``.ckpt`` from ``torch.save``) are refused: loading a
pickle runs arbitrary code. ``restorer convert`` imports them once without running them
(:mod:`restorer.weights.unpickle`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from restorer.errors import ModelError
from restorer.io import storage
from restorer.nets import build_net, canonical_spec, net_spec

MODEL_FORMAT = "restorer.model"
MODEL_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class LoadedModel:
    net: nn.Module  # in eval mode, on CPU
    spec: dict[str, Any]  # the net spec
    provenance: dict[str, Any]
    sha256: str  # of the file's bytes
    source: str  # where it was loaded from


def model_bytes(net: nn.Module, provenance: dict[str, Any] | None = None,
                dtype: torch.dtype | None = None) -> bytes:
    """Serialise ``net`` with its spec into safetensors bytes.

    ``dtype`` (e.g. ``torch.float16``, half the size) stores the floating-point tensors in that
    type; loading casts them back to the net's float32 parameters.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "net": json.dumps(net_spec(net), sort_keys=True),
        "provenance": json.dumps(provenance or {}, sort_keys=True),
    }
    return save_tensors(tensors, metadata=metadata)


def save_model(uri: str, net: nn.Module, provenance: dict[str, Any] | None = None,
               options: storage.StorageOptions = storage.StorageOptions(),
               dtype: torch.dtype | None = None) -> str:
    """Write ``net`` to ``uri`` atomically (weights in ``dtype`` if given, see
    :func:`model_bytes`); returns the file's sha256."""
    data = model_bytes(net, provenance, dtype)
    storage.write_bytes(uri, data, options)
    return hashlib.sha256(data).hexdigest()


def _check_not_pickle(data: bytes, source: str) -> None:
    # A safetensors file starts with its header's length (8 bytes, little-endian) and then "{";
    # that length's first byte can be 0x80 too, so recognise safetensors before pickles.
    if len(data) >= 10 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data):
        return
    if data[:2] == b"PK" or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                    b"\x05")):
        raise ModelError(
            f"{source} is a pickled PyTorch checkpoint; restorer never unpickles models. Convert "
            f"it once with `restorer convert {source} model.safetensors`"
        )
    if len(data) < 10 or data[8:9] != b"{":
        raise ModelError(f"{source} is not a safetensors file")


def read_metadata(data: bytes, source: str) -> dict[str, str]:
    _check_not_pickle(data, source)
    header_size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + header_size])
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{source} has a corrupt safetensors header") from e
    return header.get("__metadata__", {})


def load_model_bytes(data: bytes, source: str) -> LoadedModel:
    metadata = read_metadata(data, source)
    if metadata.get("format") != MODEL_FORMAT or "net" not in metadata:
        raise ModelError(f"{source} is a safetensors file without a restorer net spec; import "
                         "bare weights with `restorer convert`")
    if metadata.get("format_version") != MODEL_FORMAT_VERSION:
        raise ModelError(f"{source} has model format version {metadata.get('format_version')}; "
                         f"this restorer reads version {MODEL_FORMAT_VERSION}")
    spec = canonical_spec(json.loads(metadata["net"]))  # a file keeps the names it was saved with
    net = build_net(spec)
    try:
        tensors = load_tensors(data)
        net.load_state_dict(tensors, strict=True)
    except (RuntimeError, SafetensorError) as e:
        raise ModelError(f"The weights in {source} do not match its net spec {spec}: {e}") from e
    net.eval()
    return LoadedModel(net=net, spec=spec, provenance=json.loads(metadata.get("provenance", "{}")),
                       sha256=hashlib.sha256(data).hexdigest(), source=source)


def load_model(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> LoadedModel:
    """Load a restorer model file (local path or URI)."""
    return load_model_bytes(storage.read_bytes(uri, options), uri)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


__all__ = [
    "LoadedModel",
    "count_parameters",
    "load_model",
    "load_model_bytes",
    "model_bytes",
    "read_metadata",
    "save_model",
]
