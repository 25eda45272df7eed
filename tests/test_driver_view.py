"""What a user of the driver and CLI sees (issue 29): a job run from the folder that holds a
clone, estimates per model and size, progress and rates, a calm stop, cheap refusals before
Ray, a quiet Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLI = str(Path(sys.executable).parent / "restorer")  # the console script a user runs


def _images(folder: Path, count: int, size: tuple[int, int] = (40, 36), seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(folder / f"{i:03d}.png")


def _clone_parent(tmp_path: Path) -> Path:
    """A folder holding a checkout named like the package, as `git clone ... restorer` makes
    it: a root without ``__init__.py``, the package folder (bare here) and ``jobs/``."""
    parent = tmp_path / "work"
    clone = parent / "restorer"
    (clone / "restorer").mkdir(parents=True)
    (clone / "jobs").mkdir()
    (clone / "jobs" / "README.md").write_text("job specs\n")
    (clone / "pyproject.toml").write_text('[project]\nname = "restorer"\n')
    return parent


def _run_from(folder: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("PYTHONPATH", None)
    return subprocess.run([CLI, *args], cwd=folder, capture_output=True, text=True,
                          timeout=timeout, env=env)


# --- a job runs from any working folder -------------------------------------------------------

@pytest.mark.slow
def test_a_job_runs_from_the_folder_that_holds_a_clone(exclusive_ray, tmp_path, tiny_model):
    """An embedded Ray started from the clone's parent: its workers import the installed
    package, not the clone's root folder (which Ray puts first on their sys.path)."""
    parent = _clone_parent(tmp_path)
    _images(parent / "data", 3)
    result = _run_from(parent, "restore", "data", "out", "--model", tiny_model,
                       "--num-cpus", "2", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unknown location" not in result.stderr
    assert sorted(p.name for p in (parent / "out").glob("*.png")) == ["000.png", "001.png",
                                                                    "002.png"]


@pytest.mark.slow
def test_a_job_on_a_connected_ray_runs_from_the_folder_that_holds_a_clone(
        ray_session, tmp_path, tiny_model):
    """The same from a driver that connects to a running Ray (``--address``)."""
    parent = _clone_parent(tmp_path)
    _images(parent / "data", 3)
    address = ray_session.get_runtime_context().gcs_address
    result = _run_from(parent, "restore", "data", "out", "--model", tiny_model,
                       "--address", address, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((parent / "out").glob("*.png"))) == 3, (result.stdout[-2000:], result.stderr[-3000:])


def test_shadowing_folder_names_only_a_foreign_folder_named_like_the_package(tmp_path,
                                                                             monkeypatch):
    from restorer.runtime import shadowing_folder

    monkeypatch.chdir(tmp_path)
    assert shadowing_folder() is None
    parent = _clone_parent(tmp_path)
    monkeypatch.chdir(parent)
    assert shadowing_folder() == str(parent)
    import restorer

    monkeypatch.chdir(Path(restorer.__file__).parent.parent)  # the checkout itself: it is ours
    assert shadowing_folder() is None


# --- checks that need no Ray come before Ray ---------------------------------------------------

@pytest.mark.slow
def test_a_refused_fingerprint_and_a_rerun_with_nothing_to_do_start_no_ray(
        ray_session, tmp_path, tiny_model, monkeypatch):
    from click.testing import CliRunner

    import restorer.runtime
    from restorer.cli import main
    from restorer.pipeline import restore

    _images(tmp_path / "in", 5)
    first = restore(str(tmp_path / "in"), str(tmp_path / "out"), model=tiny_model, tile=64)
    assert first["succeeded"] == 5

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    # as in a fresh `restorer` process: no Ray in it, and none may start
    monkeypatch.setattr(ray_session, "is_initialized", lambda: False)
    monkeypatch.setattr(restorer.runtime, "ensure_ray", refuse)
    args = ["restore", str(tmp_path / "in"), str(tmp_path / "out"), "--model", tiny_model]
    result = CliRunner().invoke(main, [*args, "--tile", "96"])
    assert result.exit_code == 2 and "tile: 64 -> 96" in result.output, result.output
    result = CliRunner().invoke(main, [*args, "--tile", "64", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert (summary["succeeded"], summary["skipped"], summary["status"]) == (0, 5, "ok")
    assert summary["resumed"] is True
    # a new input means work: then (and only then) Ray is asked for
    _images(tmp_path / "in" / "new", 1)
    result = CliRunner().invoke(main, [*args, "--tile", "64"])
    assert result.exit_code != 0 and "Ray was started" in str(result.exception), result.output


# --- the Python API: quiet, and README's actor snippet as written ------------------------------

def _readme_block(after: str) -> str:
    """The first ```python block of README.md after the line that starts with ``after``."""
    import restorer

    text = (Path(restorer.__file__).parent.parent / "README.md").read_text()
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return text[start:text.index("```", start)]


@pytest.mark.slow
def test_readme_actor_snippet_runs_as_written_and_keeps_file_names(exclusive_ray, tmp_path):
    snippet = _readme_block("The actor class works in your own Ray Data pipeline")
    rng = np.random.default_rng(3)
    (tmp_path / "photos").mkdir()
    for name, size in (("beach.png", (40, 48, 3)), ("street.jpg", (36, 30, 3))):
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(tmp_path / "photos" / name)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, RAY_AUTH_MODE="token"))
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(p.name for p in (tmp_path / "restored").iterdir())
    assert written == ["beach.png", "street.png"]
    assert Image.open(tmp_path / "restored" / "beach.png").size == (48, 40)


@pytest.mark.slow
def test_python_api_keeps_the_console_quiet(exclusive_ray, tmp_path, tiny_model):
    _images(tmp_path / "in", 3)
    script = ("import restorer\n"
              f"s = restorer.restore({str(tmp_path / 'in')!r}, {str(tmp_path / 'out')!r}, "
              f"model={tiny_model!r}, num_cpus=2)\n"
              "assert s['succeeded'] == 3, s\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, RAY_AUTH_MODE="token"))
    assert result.returncode == 0, result.stderr[-3000:]
    noise = [line for line in result.stderr.splitlines()
             if "core_worker" in line or "ray.data" in line or "Execution plan" in line
             or "streaming_executor" in line or "Running Dataset" in line]
    assert not noise, "\n".join(noise[:20])
