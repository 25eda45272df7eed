"""The wings of README's Layout: each wing (sub-package of restorer) imports only the wings on
its floor or below; only the CLI imports click; only the pipeline, training and launch wings
import Ray; the Ray-free wings import where Ray is not installed (imports inside functions
count too)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import restorer

FLOORS = {
    0: ["errors"],
    1: ["image"],  # arrays only: pixels, audit, flat, tiling, metrics, degrade
    2: ["io", "nets"],
    3: ["weights"],
    4: ["job"],
    5: ["output"],
    6: ["report"],
    7: ["pipeline"],
    8: ["quality"],
    9: ["train"],
    10: ["launch"],
    11: ["cli"],
}
FLOOR = {name: floor for floor, names in FLOORS.items() for name in names}
RAY_WINGS = {"pipeline", "train", "launch"}  # STYLE: the pipeline, training and launch layers
# Run on a GPU box with PyTorch and no Ray (the brief): the nets, the training core and the
# zoo's recipes, the actor class called directly, model files.
RAY_FREE = ["restorer.nets", "restorer.train.core", "restorer.train.recipes",
            "restorer.pipeline.actor", "restorer.weights.checkpoint", "restorer.weights.zoo",
            "restorer.quality.evaluate", "restorer.image.degrade", "restorer.job.sizing"]
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


def test_every_wing_has_a_floor_and_the_top_level_holds_only_wings():
    assert sorted({top for top, _ in _modules()} - set(FLOOR)) == []
    loose = sorted(p.name for p in ROOT.glob("*.py")
                   if p.stem not in ("__init__", "__main__", *FLOOR))
    assert loose == [], f"modules outside every wing: {loose}"


@pytest.mark.parametrize("top,path", list(_modules()), ids=lambda v: str(v))
def test_modules_import_only_their_floor_or_below(top, path):
    above = set()
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "click":
            assert top == "cli", f"{path.name} imports click; only restorer.cli may"
        if parts[0] == "ray":
            assert top in RAY_WINGS, (f"{path.relative_to(ROOT)} imports ray; only the wings "
                                      f"{sorted(RAY_WINGS)} may")
        if parts[0] == "restorer" and len(parts) > 1 and parts[1] in FLOOR:
            if FLOOR[parts[1]] > FLOOR[top]:
                above.add(f"restorer.{parts[1]} (floor {FLOOR[parts[1]]})")
    assert not above, f"{path.relative_to(ROOT)} (floor {FLOOR[top]}) imports {sorted(above)}"


def test_the_ray_free_parts_import_without_ray():
    """A bare GPU box has torch and no Ray: Ray is made unimportable in a fresh interpreter."""
    code = ("import sys, importlib\nsys.modules['ray'] = None\n"
            f"for name in {RAY_FREE!r}:\n    importlib.import_module(name)\n"
            "assert 'ray' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_each_wing_names_its_public_faces_and_they_resolve():
    import importlib

    for wing in [name for names in FLOORS.values() for name in names]:
        module = importlib.import_module(f"restorer.{wing}")
        if wing in ("errors", "cli", "nets"):
            continue  # a module; the Click group; the nets' registry (its own faces)
        assert module.__doc__ and module.__all__, f"restorer.{wing} names no faces"
        if wing in RAY_WINGS:
            continue  # resolving imports Ray and torch: checked by their own tests
        for name in module.__all__:
            assert getattr(module, name) is not None, f"restorer.{wing}.{name}"


def test_the_documented_public_names_keep_working():
    """README's public names: ``restorer.restore``, and ``restore``, ``run_restore``,
    ``RestoreActor`` from ``restorer.pipeline`` (each the one object of its module)."""
    import restorer.pipeline
    from restorer.pipeline import RestoreActor, restore, run_restore
    from restorer.pipeline.actor import RestoreActor as actor_class
    from restorer.pipeline.driver import restore as driver_restore
    from restorer.pipeline.driver import run_restore as driver_run

    assert restorer.restore is restore is driver_restore
    assert run_restore is driver_run and RestoreActor is actor_class
    with pytest.raises(AttributeError, match="no attribute 'listing_dataset'"):
        restorer.pipeline.listing_dataset  # noqa: B018 - a former re-export, gone
