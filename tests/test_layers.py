"""The floors of README's Layout: each module imports only modules on its floor or below, and
only the CLI imports click (imports inside functions count too)."""

import ast
from pathlib import Path

import pytest

import restorer

FLOORS = {
    1: ["nets", "tiling", "flat", "train", "degrade", "metrics", "pixels", "audit", "errors"],
    2: ["storage", "codec", "synth", "samples", "shards"],
    3: ["records", "jobs", "checkpoint", "unpickle", "convert", "progress", "console"],
    4: ["ledger", "digest", "sources", "lease", "models", "runtime"],
    5: ["pipeline", "graph", "stages", "actor", "poison", "summary", "train_job", "train_data",
        "train_checkpoints", "evaluate", "report", "inspect"],
    6: ["launch", "submit", "recipes", "bench", "plan"],
    7: ["cli"],
}
FLOOR = {name: floor for floor, names in FLOORS.items() for name in names}
ROOT = Path(restorer.__file__).parent


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] in ("__init__", "__main__"):
            continue
        yield parts[0], path


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            yield name


def test_every_module_has_a_floor():
    assert sorted({top for top, _ in _modules()} - set(FLOOR)) == []


@pytest.mark.parametrize("top,path", list(_modules()), ids=lambda v: str(v))
def test_modules_import_only_their_floor_or_below(top, path):
    above = set()
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "click":
            assert top == "cli", f"{path.name} imports click; only restorer.cli may"
        if parts[0] == "restorer" and len(parts) > 1 and parts[1] in FLOOR:
            if FLOOR[parts[1]] > FLOOR[top]:
                above.add(f"restorer.{parts[1]} (floor {FLOOR[parts[1]]})")
    assert not above, f"{path.relative_to(ROOT)} (floor {FLOOR[top]}) imports {sorted(above)}"
