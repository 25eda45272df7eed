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
    from restorer.pipeline.runtime import shadowing_folder

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

    import restorer.pipeline.runtime
    from restorer.cli import main
    from restorer.pipeline import restore

    _images(tmp_path / "in", 5)
    first = restore(str(tmp_path / "in"), str(tmp_path / "out"), model=tiny_model, tile=64)
    assert first["succeeded"] == 5

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    # as in a fresh `restorer` process: no Ray in it, and none may start
    monkeypatch.setattr(ray_session, "is_initialized", lambda: False)
    monkeypatch.setattr(restorer.pipeline.runtime, "ensure_ray", refuse)
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


# --- progress and rates: at least every 10 s, and right when everything arrives at once -------

class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "restorer.job.progress"]


def test_progress_logs_every_interval_while_no_result_comes(caplog):
    from restorer.job.progress import Progress

    clock = FakeClock()
    with caplog.at_level("INFO", logger="restorer.job.progress"):
        progress = Progress("restore", total=32, interval=10.0, tty=False, clock=clock)
        for _ in range(25):  # 25 s of silence, ticked every second as the driver does
            clock.now += 1.0
            progress.tick()
    lines = _progress_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[-1] == "restore: 0/32 images (0%), waiting for the first results (20 s so far)"


def test_progress_rate_and_time_left_count_from_the_first_result(caplog):
    from restorer.job.progress import Progress

    clock = FakeClock()
    with caplog.at_level("INFO", logger="restorer.job.progress"):
        progress = Progress("restore", total=64, interval=0.0, tty=False, clock=clock)
        clock.now += 60.0  # a minute of start-up, then a batch of 16
        progress.update(16)
        first = _progress_lines(caplog)[-1]
        clock.now += 10.0  # 8 more in the next 10 s: 0.8 images/s, 40 left
        progress.update(8)
    assert first == "restore: 16/64 images (25%), first results after 1 min 00 s; measuring the rate"
    assert _progress_lines(caplog)[-1] == ("restore: 24/64 images (38%), 0.80 images/s, "
                                           "about 50 s left")


def test_progress_gives_no_rate_from_one_burst(caplog):
    from restorer.job.progress import Progress

    clock = FakeClock()
    with caplog.at_level("INFO", logger="restorer.job.progress"):
        progress = Progress("restore", total=32, interval=0.0, tty=False, clock=clock)
        clock.now += 74.76
        progress.update(16)
        clock.now += 0.03  # the rest of the images 30 ms later: no pace to tell from that
        progress.update(16)
    assert "images/s" not in _progress_lines(caplog)[-1]
    assert "left" not in _progress_lines(caplog)[-1]


def test_progress_bar_on_a_tty_shows_the_rate_after_start_up(capsys):
    from restorer.job.progress import Progress

    clock = FakeClock()
    with Progress("restore", total=64, tty=True, clock=clock) as progress:
        clock.now += 60.0
        progress.update(16)
        clock.now += 10.0
        progress.update(8)
    err = capsys.readouterr().err
    assert "24/64" in err and "0.80 images/s, about 50 s left" in err


def test_progress_moves_with_images_restored_in_batches_still_on_the_workers(caplog):
    """A batch of 16 on a slow model: the count moves image by image from the workers' count
    (never back, never past the total), while ``done`` counts the records that came."""
    from restorer.job.progress import Progress

    clock = FakeClock()
    with caplog.at_level("INFO", logger="restorer.job.progress"):
        progress = Progress("restore", total=32, interval=0.0, tty=False, clock=clock)
        clock.now += 30.0
        progress.ahead(3)  # three images of the first batch restored
        assert _progress_lines(caplog)[-1].startswith("restore: 3/32 images (9%)")
        clock.now += 3.0
        progress.ahead(6)
        progress.ahead(2)  # an answer about fewer (a batch ended meanwhile): not back
        assert (progress.shown, progress.done) == (6, 0)
        clock.now += 7.0
        progress.update(16)  # the batch's records came
        progress.ahead(4)  # and four of the next batch are restored
        assert (progress.shown, progress.done) == (20, 16)
        # from the first image: 17 more in 10 s; 12 left at 1.7 images/s
        assert _progress_lines(caplog)[-1] == ("restore: 20/32 images (62%), 1.70 images/s, "
                                               "about 7 s left")
        progress.ahead(100)
        assert progress.shown == 32


def test_progress_bar_on_a_tty_moves_within_a_batch(capsys):
    from restorer.job.progress import Progress

    clock = FakeClock()
    with Progress("restore", total=16, tty=True, clock=clock) as progress:
        clock.now += 5.0
        progress.ahead(5)
        assert progress._bar.n == 5
        progress.update(16)
        assert progress._bar.n == 16
    assert "16/16" in capsys.readouterr().err


def test_the_registry_counts_the_images_restored_in_batches_in_flight():
    from restorer.pipeline.poison import PoisonRegistry

    registry = PoisonRegistry()
    registry.begin("a")
    registry.restored("a", 3)
    registry.begin("b")
    registry.restored("b", 2)
    assert registry.restored_in_flight() == 5
    registry.end("a")  # its records are on their way to the driver
    assert registry.restored_in_flight() == 2
    registry.begin("b")  # b's actor died: the new attempt restores them again
    assert registry.restored_in_flight() == 0
    registry.restored("gone", 4)  # a late report of an ended batch is ignored
    assert registry.restored_in_flight() == 0


@pytest.mark.slow
def test_a_job_of_one_batch_shows_its_images_restored_one_by_one(ray_session, tmp_path,
                                                                 monkeypatch, caplog):
    """Eight photos in one batch of 8 on the default U-Net: their records reach the driver all
    at once at the end, yet the log counts them while the batch is restored."""
    import functools

    import restorer.pipeline.driver as pipeline
    from restorer.job.progress import Progress

    rng = np.random.default_rng(0)
    source = tmp_path / "in"
    source.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (192, 192, 3), dtype=np.uint8)).save(
            source / f"{i}.png")
    monkeypatch.setattr(pipeline, "Progress", functools.partial(Progress, interval=0.0,
                                                                tty=False))
    with caplog.at_level("INFO", logger="restorer.job.progress"):
        summary = pipeline.restore(str(source), str(tmp_path / "out"), tile=64,
                                   batch_size=8, workers=1)
    assert summary["succeeded"] == 8
    counts = [int(line.split(": ")[1].split("/")[0]) for line in _progress_lines(caplog)]
    assert counts == sorted(counts) and counts[-1] == 8, counts
    assert set(counts) & set(range(1, 8)), counts  # within the batch, before its records came


def _state(**times):
    from restorer.job.specs import RestoreSpec, spec_from_flags
    from restorer.report.summary import JobState

    state = JobState(spec_from_flags(RestoreSpec, input="in", output="out"), "m", "0" * 64, {},
                     started=0.0)
    for name, value in times.items():
        setattr(state, name, value)
    return state


def test_summary_has_no_steady_rate_from_results_that_came_at_once():
    from restorer.report.summary import summarize

    # as reported: every image reached the driver in batches 30 ms apart, at the end
    state = _state(succeeded=32, first_result=74.763, first_count=8, last_result=74.79,
                   arrivals=4)
    summary = summarize(state, 74.792)
    assert summary["startup_seconds"] == 74.763
    assert summary["steady_images_per_second"] is None
    assert summary["images_per_second"] == round(32 / 74.792, 3)
    # spread results: the rate after the first batch
    state = _state(succeeded=76, first_result=10.0, first_count=16, last_result=40.0,
                   arrivals=5)
    assert summarize(state, 41.0)["steady_images_per_second"] == 2.0


def test_printed_summary_never_says_none_images_per_second():
    from click.testing import CliRunner

    import restorer.cli.base as base
    from restorer.report.summary import summarize

    state = _state(succeeded=32, first_result=74.763, first_count=16, last_result=74.79,
                   arrivals=2)
    summary = dict(summarize(state, 74.792), report=None)

    @base.main.command("show-summary-for-test")
    def show():
        base.print_summary(summary, as_json=False)

    try:
        output = CliRunner().invoke(base.main, ["show-summary-for-test"]).output
    finally:
        base.main.commands.pop("show-summary-for-test")
    assert "None" not in output and "no rate" not in output, output
    assert "0.43 images/s (the first results came after 74.8 s)" in output, output


def test_the_driver_logs_progress_while_the_first_batch_is_still_coming(tmp_path, caplog):
    """The result pump ticks the progress while no batch comes (a slow model's first batch)."""
    import threading
    import time

    import pyarrow as pa

    from restorer.job.progress import Progress
    from restorer.pipeline.driver import _execute

    class SlowDataset:
        def iter_batches(self, **kwargs):
            time.sleep(1.0)
            yield pa.Table.from_pylist([{"status": "skipped", "unit_size": 3, "unit": "u"}])

    state = _state()
    with caplog.at_level("INFO", logger="restorer.job.progress"):
        with Progress("restore", total=3, interval=0.0, tty=False) as progress:
            _execute(state.spec, state, SlowDataset(), set(), threading.Event(), progress)
    waiting = [line for line in _progress_lines(caplog) if "waiting for the first" in line]
    assert len(waiting) >= 3, _progress_lines(caplog)
    assert state.skipped == 3


# --- --dry-run estimates per model and image size ----------------------------------------------

def _dry_run_plan(folder: Path, *flags: str) -> dict:
    from click.testing import CliRunner

    from restorer.cli import main

    result = CliRunner().invoke(main, ["restore", str(folder), str(folder.parent / "out"),
                                       "--dry-run", "--json", "--gpus-per-worker", "0", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def test_dry_run_estimates_per_model_and_scales_with_pixels(tmp_path, monkeypatch, tiny_model):
    from restorer.quality import bench

    monkeypatch.setattr(bench, "CALIBRATION", tmp_path / "bench.json")
    from restorer.pipeline.actor import tile_settings
    from restorer.weights.zoo import get_model

    _images(tmp_path / "small", 4, size=(200, 150))
    model = get_model(tiny_model)
    bench.save_calibration({"megapixels_per_second_per_worker": 0.01, "machine": "m",
                            "date": "d", "device": "cpu", "model_sha256": model.sha256,
                            "tile": tile_settings(model.net, 256, 0)[0]})
    tiny = _dry_run_plan(tmp_path / "small", "--model", tiny_model)
    assert tiny["calibration_from"] == "m on d (cpu)"
    assert tiny["work_seconds"] == pytest.approx(4 * 0.03 / 0.01, rel=0.01)
    # an embedded Ray's start-up comes first
    assert tiny["estimated_seconds"] == pytest.approx(tiny["work_seconds"] + 10.0, rel=0.01)
    # another model with the same saved calibration: that one is not for it; it is timed here
    default = _dry_run_plan(tmp_path / "small", "--model", "restore-default")
    assert "quick timing" in default["calibration_from"]
    assert default["work_seconds"] != pytest.approx(tiny["work_seconds"], rel=0.2)
    # four times the pixels, four times the time
    _images(tmp_path / "large", 4, size=(400, 300))
    large = _dry_run_plan(tmp_path / "large", "--model", tiny_model)
    assert large["work_seconds"] == pytest.approx(4 * tiny["work_seconds"], rel=0.01)
    # one image keeps one of four workers busy: as long as on one worker
    _images(tmp_path / "one", 1, size=(400, 300))
    one = _dry_run_plan(tmp_path / "one", "--model", tiny_model, "--workers", "4")
    alone = _dry_run_plan(tmp_path / "one", "--model", tiny_model, "--workers", "1")
    assert one["busy_workers"] == 1 and one["work_seconds"] == alone["work_seconds"]
    assert one["work_seconds"] == pytest.approx(large["work_seconds"] / 4, rel=0.01)


def test_an_embedded_ray_is_always_a_new_one_of_its_own(monkeypatch):
    """Another Ray on the machine (`ray start`, a second job, a test cluster) is neither joined
    nor a reason to fail ("Found multiple active Ray instances"): the embedded Ray of `restorer
    restore` / `restorer train` asks for a new local one, with its CPUs and object store."""
    import ray

    import restorer.pipeline.runtime as runtime

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runtime.ensure_ray("", num_cpus=2, object_store_mb=100) is True
    assert calls[0]["address"] == "local"
    assert calls[0]["num_cpus"] == 2 and calls[0]["object_store_memory"] == 100 * 1024 * 1024
    calls.clear()
    assert runtime.ensure_ray("10.0.0.1:6379") is False  # a cluster named: joined, as asked
    assert calls[0]["address"] == "10.0.0.1:6379" and "num_cpus" not in calls[0]
