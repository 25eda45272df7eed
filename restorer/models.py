"""The bundled model zoo and model lookup by name or path.

A model argument is either the name of a bundled model (``restorer models`` lists them; each is
``restorer/zoo/NAME.safetensors`` with a card ``NAME.md``) or the path/URI of a safetensors file
written by :mod:`restorer.checkpoint` (local, ``file://`` or ``s3://``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from restorer import storage
from restorer.checkpoint import LoadedModel, load_model, read_metadata
from restorer.errors import UnknownModelError

ZOO_DIR = Path(__file__).parent / "zoo"

# The model `restorer restore` uses when no --model is given.
DEFAULT_MODEL = "restore-default"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    path: Path
    card: Path | None


def zoo() -> dict[str, ZooEntry]:
    """The bundled models, by name."""
    entries = {}
    for path in sorted(ZOO_DIR.glob("*.safetensors")):
        card = path.with_suffix(".md")
        entries[path.stem] = ZooEntry(path.stem, path, card if card.exists() else None)
    return entries


def resolve_model_uri(model: str | None) -> str:
    """The path or URI of ``model`` (a zoo name, a path or a URI); ``None`` means the default."""
    model = model or DEFAULT_MODEL
    bundled = zoo()
    if model in bundled:
        return str(bundled[model].path)
    if storage.is_remote(model) or os.path.exists(storage.local_path(model)):
        return model
    raise UnknownModelError(
        f"Unknown model {model!r}: not a bundled model ({', '.join(sorted(bundled)) or 'none'}) "
        "and no such file. Pass a zoo name or the path of a .safetensors model."
    )


def get_model(model: str | None, options: storage.StorageOptions = storage.StorageOptions()
              ) -> LoadedModel:
    """Load ``model`` (zoo name, path or URI; ``None`` = default) on CPU in eval mode."""
    return load_model(resolve_model_uri(model), options)


def describe(uri: str) -> dict:
    """Net spec and provenance of a model file without building the net."""
    import json

    data = storage.read_bytes(uri)
    metadata = read_metadata(data, uri)
    return {"net": json.loads(metadata.get("net", "{}")),
            "provenance": json.loads(metadata.get("provenance", "{}"))}


__all__ = [
    "DEFAULT_MODEL",
    "ZOO_DIR",
    "LoadedModel",
    "ZooEntry",
    "describe",
    "get_model",
    "resolve_model_uri",
    "zoo",
]
