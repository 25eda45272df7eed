"""The bundled model zoo and model lookup by name or path.

A model argument is either the name of a bundled model (``restorer models`` lists them; each is
``restorer/zoo/NAME.safetensors`` with a card ``NAME.md``) or the path/URI of a safetensors file
written by :mod:`restorer.weights.checkpoint` (local, ``file://`` or ``s3://``).

What ``restorer models`` says of a bundled model (its purpose, what it learnt, its measured
quality) is read from its card (:func:`read_card`), which ``python -m restorer.train.recipes NAME
--ship`` writes when the model is trained: retrain a model and the listing follows. Which model
to pick for which images (:func:`choices`) is the ``[choose]`` table of
``zoo/cards/text.toml``, beside the cards' prose.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from restorer.errors import UnknownModelError
from restorer.io import storage
from restorer.weights.checkpoint import LoadedModel, load_model, read_metadata

ZOO_DIR = Path(__file__).parent.parent / "zoo"
CARD_TEXT = ZOO_DIR / "cards" / "text.toml"

# The model `restorer restore` uses when no --model is given.
DEFAULT_MODEL = "restore-default"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    path: Path
    card: Path | None


def bundled() -> dict[str, ZooEntry]:
    """The bundled models, by name."""
    entries = {}
    for path in sorted(ZOO_DIR.glob("*.safetensors")):
        card = path.with_suffix(".md")
        entries[path.stem] = ZooEntry(path.stem, path, card if card.exists() else None)
    return entries


@dataclass(frozen=True)
class MeasuredRow:
    """One row of a card's "Measured" table (``restorer eval`` on a test set)."""

    set: str  # e.g. "set12"
    setting: str  # e.g. "sigma 25", "quality 20", "x2"
    images: int
    input_psnr: float  # dB, the degraded input
    psnr: float  # dB, the model's output


@dataclass(frozen=True)
class ModelCard:
    """What a bundled model's card says, for ``restorer models``."""

    name: str
    purpose: str  # the paragraph under the card's title, Markdown emphasis removed
    facts: dict[str, str]  # the card's first table: file, net, input / output, learnt, ...
    measured: tuple[MeasuredRow, ...]
    limits: str  # the "Limits:" sentences of the card's notes, "" if none

    @property
    def learnt(self) -> str:
        return self.facts.get("learnt", "")

    @property
    def parameters(self) -> int | None:
        found = re.search(r"([\d,]+) parameters", self.facts.get("net", ""))
        return int(found.group(1).replace(",", "")) if found else None


def _plain(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"\1", " ".join(text.split()))


def _table(lines: list[str]) -> list[list[str]]:
    """The rows (cells stripped of Markdown bold) of the first Markdown table in ``lines``,
    header included, separator row left out."""
    rows, started = [], False
    for line in lines:
        if line.startswith("|"):
            started = True
            cells = [_plain(c) for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif started:
            break
    return rows


def read_card(name: str, text: str) -> ModelCard:
    """Parse a zoo card (``restorer/zoo/NAME.md``, as ``zoo/cards/card.md`` lays it out).

    Raises ``ValueError`` naming the card when it lacks its title paragraph or table.
    """
    lines = text.splitlines()
    first_table = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if first_table is None or not lines or not lines[0].startswith("# "):
        raise ValueError(f"model card {name}.md has no title and facts table; regenerate it "
                         f"with python -m restorer.train.recipes {name} --ship")
    purpose = _plain(" ".join(line for line in lines[1:first_table] if line.strip()))
    facts = {row[0]: row[1] for row in _table(lines[first_table:]) if len(row) >= 2 and row[0]}
    measured = []
    if "## Measured" in lines:
        rows = _table(lines[lines.index("## Measured"):])
        header = [h.lower() for h in rows[0]] if rows else []
        for row in rows[1:]:
            cells = dict(zip(header, row))
            try:
                measured.append(MeasuredRow(cells["set"], cells["setting"],
                                            int(cells["images"]), float(cells["input psnr"]),
                                            float(cells["psnr"])))
            except (KeyError, ValueError):
                continue  # a table of another shape: not a PSNR row
    limits = ""
    if "## Notes" in lines:  # the paragraph that says "Limits...", from there to its end
        paragraphs = "\n".join(lines[lines.index("## Notes") + 1:]).split("\n\n")
        found = next((p for p in paragraphs if "Limits" in p), "")
        limits = found[found.index("Limits"):] if found else ""
    return ModelCard(name, purpose, facts, tuple(measured), _plain(limits))


def card(name: str) -> ModelCard | None:
    """The card of the bundled model ``name``, or None when it has none."""
    entry = bundled().get(name)
    if entry is None or entry.card is None:
        return None
    return read_card(name, entry.card.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Choice:
    """One row of the "which model to pick" table (``[choose]`` in zoo/cards/text.toml)."""

    images: str  # what the user's images suffer from
    model: str  # the bundled model to pick
    why: str


def choices() -> list[Choice]:
    """Which bundled model to pick for which images, in the order of ``text.toml``."""
    table = tomllib.loads(CARD_TEXT.read_text(encoding="utf-8")).get("choose", {})
    return [Choice(row["images"], row["model"], " ".join(row["why"].split()))
            for row in table.get("rows", [])]


def unknown_model(name: str) -> UnknownModelError:
    names = sorted(bundled())
    return UnknownModelError(
        f"Unknown model {name!r}: not a bundled model ({', '.join(names) or 'none'}) "
        "and no such file. Pass a zoo name or the path of a .safetensors model.")


def resolve_model_uri(model: str | None) -> str:
    """The path or URI of ``model`` (a zoo name, a path or a URI); ``None`` means the default."""
    model = model or DEFAULT_MODEL
    entries = bundled()
    if model in entries:
        return str(entries[model].path)
    if storage.is_remote(model) or os.path.exists(storage.local_path(model)):
        return model
    raise unknown_model(model)


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


def macs_per_megapixel(uri: str, side: int = 64) -> float:
    """Giga multiply-adds the net of the model at ``uri`` spends per megapixel of input,
    counted on one forward pass over a ``side`` x ``side`` image of the net's planes (each
    convolution at the resolution it runs at: a U-Net's deeper levels on fewer pixels, an SR
    net's tail on more, an opponent net's trunk three times). A one-plane net restores a
    colour image plane by plane: three times this. Builds the net on CPU."""
    import torch

    net = load_model(uri).net
    macs = 0

    def count(module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal macs
        kernel = module.kernel_size[0] * module.kernel_size[1]
        # every position of every image in the batch (an opponent net's three planes)
        positions = output.numel() // output.shape[1]
        if isinstance(module, torch.nn.ConvTranspose2d):  # each input position scatters
            positions = _inputs[0].numel() // _inputs[0].shape[1]
        macs += positions * kernel * module.in_channels * module.out_channels // module.groups

    hooks = [m.register_forward_hook(count) for m in net.modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    try:
        with torch.no_grad():
            net(torch.zeros(1, getattr(net, "channels", 1), side, side))
    finally:
        for hook in hooks:
            hook.remove()
    return macs / (side * side) * 1e6 / 1e9


__all__ = [
    "bundled",
    "DEFAULT_MODEL",
    "ZOO_DIR",
    "Choice",
    "LoadedModel",
    "MeasuredRow",
    "ModelCard",
    "ZooEntry",
    "card",
    "choices",
    "describe",
    "get_model",
    "macs_per_megapixel",
    "read_card",
    "resolve_model_uri",
    "unknown_model",
]
