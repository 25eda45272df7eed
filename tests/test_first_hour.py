"""What a new user meets first: exit codes, inputs people pass, a truthful summary, progress
and a quiet console (issue: the first hour of a new user)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from restorer.cli import main
from restorer.errors import SpecError
from restorer.job.progress import Progress
from restorer.job.sizing import size_workers
from restorer.pipeline.actor import cpu_has_bf16


def _images(folder: Path, names: list[str], seed: int = 0, size: tuple[int, int] = (24, 20)):
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(path)


def _json(output: str) -> dict:
    """The first JSON document in a command's output (Ray may print lines after it)."""
    return json.JSONDecoder().raw_decode(output, output.index("{"))[0]


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the code under test asks for Ray (``runtime.ensure_ray``)."""
    import restorer.pipeline.runtime

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was asked for")

    monkeypatch.setattr(restorer.pipeline.runtime, "ensure_ray", refuse)


# --- exit codes: usage and spec problems are 2, before Ray starts ----------------------------

def test_output_missing_is_usage_error():
    result = CliRunner().invoke(main, ["restore", "only-one-argument"])
    assert result.exit_code == 2 and "INPUT" in result.output


def test_unknown_model_exits_2_naming_the_bundled_ones(tmp_path):
    _images(tmp_path / "in", ["a.png"])
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "o"),
                                       "--model", "no-such-model"])
    assert result.exit_code == 2, result.output
    assert "no-such-model" in result.output and "restore-default" in result.output
    assert not (tmp_path / "o").exists()


def test_train_missing_or_empty_data_exits_2_before_ray(tmp_path, no_ray):
    spec = tmp_path / "train.toml"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    for data, words in ((tmp_path / "nowhere", "does not exist"), (empty, "holds no images")):
        spec.write_text(f'kind = "train"\nname = "t"\n[net]\narch = "dncnn"\nchannels = 1\n'
                        f'[data]\nuri = "{data}"\n[output]\nstorage_path = "{tmp_path / "ck"}"\n')
        result = CliRunner().invoke(main, ["train", str(spec)])
        assert result.exit_code == 2, result.output
        assert str(data) in result.output and words in result.output


def test_empty_input_says_so_and_exits_0_without_ray(tmp_path, no_ray):
    (tmp_path / "in" / "deeper").mkdir(parents=True)
    (tmp_path / "in" / "deeper" / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert f"no images found under {tmp_path / 'in'}" in result.output
    assert not (tmp_path / "o").exists()


def test_several_inputs_must_be_files(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "folder").mkdir()
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "a.png"),
                                       str(tmp_path / "folder"), str(tmp_path / "o")])
    assert result.exit_code == 2 and "is a folder" in result.output
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "a.png"),
                                       str(tmp_path / "gone.png"), str(tmp_path / "o")])
    assert result.exit_code == 2 and "gone.png does not exist" in result.output


def test_gpus_on_an_embedded_ray_are_refused_with_the_fix():
    with pytest.raises(SpecError, match="no autoscaler.*--gpus-per-worker 0"):
        size_workers(1, 1.0, 0.0, 0, total_cpus=2, total_gpus=0, node_cpus=2, nodes=1,
                     can_autoscale=False)
    # a cluster that can autoscale may wait for GPU nodes
    assert size_workers(1, 1.0, 0.0, 0, total_cpus=2, total_gpus=0, node_cpus=2, nodes=1
                        ).gpus_per_worker == 1.0


def test_refused_cpu_plan_without_reserve_names_the_real_limit():
    with pytest.raises(SpecError) as error:
        size_workers(3, 0.0, 1.0, 0, total_cpus=2, total_gpus=0, node_cpus=2, nodes=1,
                     reserve_cpus=0.0)
    assert "fewer than 0" not in str(error.value)
    assert "need more than the cluster's 2 CPUs" in str(error.value)


def test_dry_run_without_calibration_times_the_model(tmp_path, monkeypatch, tiny_model):
    import restorer.quality.bench

    monkeypatch.setattr(restorer.quality.bench, "CALIBRATION", tmp_path / "none" / "calibration.json")
    _images(tmp_path / "in", [f"{i}.png" for i in range(3)], size=(40, 50))
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "o"),
                                       "--model", tiny_model, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = _json(result.output)
    assert plan["images"] == 3 and plan["estimated_seconds"] > 0
    assert "quick timing" in plan["calibration_from"]
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "o"),
                                       "--model", tiny_model, "--dry-run"])
    assert " h on " not in result.output and "estimated" in result.output
    assert "no calibration" not in result.output


# --- progress and console ---------------------------------------------------------------------

def test_progress_logs_done_total_rate_and_time_left_without_a_tty(caplog):
    with caplog.at_level(logging.INFO, logger="restorer.job.progress"):
        progress = Progress("restore", total=100, interval=0.0, tty=False)
        progress.update(5)
        progress._first = (progress._first[0] - 10.0, 5)  # as if the first came 10 s ago
        progress.update(20, failed=1)
        progress.close()
    line = caplog.records[-1].getMessage()
    assert line.startswith("restore: 25/100 images (25%), 2.")  # 20 images in 10 s
    assert "about 38 s left" in line and "failed 1" in line


def test_progress_draws_a_bar_on_a_tty(capsys):
    with Progress("restore", total=4, tty=True) as progress:
        progress.update(3)
    err = capsys.readouterr().err
    assert "restore" in err and "3/4" in err


def test_quiet_console_drops_only_known_harmless_ray_lines():
    script = (
        "import os\n"
        "from restorer.job.console import quiet_ray\n"
        "quiet_ray()\n"
        "os.write(2, b'[2026 E 1 1] core_worker.cc:2465: Actor with class name: X has "
        "constructor arguments in the object store and max_restarts > 0. If...\\n')\n"
        "os.write(2, b'(PlacementGroupCleaner pid=1) Failed to query Ray Train Controller "
        "actor state\\n')\n"
        "os.write(2, b'a real error line\\n')\n"
        "os.write(2, b'bar 10%\\rbar 20%\\r')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=True)
    assert "a real error line" in result.stderr and "bar 20%" in result.stderr
    assert "constructor arguments" not in result.stderr
    assert "Failed to query Ray Train Controller" not in result.stderr


def test_inspect_says_none_under_empty_headings(tmp_path):
    meta = tmp_path / "out" / "_restorer"
    meta.mkdir(parents=True)
    (meta / "job.json").write_text(json.dumps({"fingerprint": {}, "spec": {}}))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for heading in ("errors:", "flagged", "top 0 by"):
        index = next(i for i, line in enumerate(lines) if line.startswith(heading))
        assert lines[index + 1].strip() == "none", result.output


# --- jobs on Ray: inputs people pass, a truthful summary --------------------------------------

@pytest.mark.slow
def test_one_file_several_files_and_a_rerun(ray_session, tmp_path, tiny_model):
    _images(tmp_path / "in", ["photo.png", "other.png", "sub/deep.png"])
    runner = CliRunner()
    result = runner.invoke(main, ["restore", str(tmp_path / "in" / "photo.png"),
                                  str(tmp_path / "one"), "--model", tiny_model, "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["_restorer", "photo.png"]
    summary = _json(result.output)
    assert summary["input_bytes"] == (tmp_path / "in" / "photo.png").stat().st_size
    assert summary["steady_images_per_second"] is None  # one image: no steady state to measure

    result = runner.invoke(main, ["restore", str(tmp_path / "in" / "photo.png"),
                                  str(tmp_path / "in" / "sub" / "deep.png"),
                                  str(tmp_path / "two"), "--model", tiny_model, "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "two" / "photo.png").exists()
    assert (tmp_path / "two" / "sub" / "deep.png").exists()
    assert not (tmp_path / "two" / "other.png").exists()

    # a rerun with nothing to do: no images processed, no rate, never a negative one
    result = runner.invoke(main, ["restore", str(tmp_path / "in" / "photo.png"),
                                  str(tmp_path / "one"), "--model", tiny_model, "--json"])
    summary = _json(result.output)
    assert (summary["succeeded"], summary["skipped"]) == (0, 1)
    assert summary["images_per_second"] is None and summary["steady_images_per_second"] is None


@pytest.mark.slow
def test_output_inside_input_is_left_out_of_the_listing(ray_session, tmp_path, tiny_model,
                                                        caplog):
    _images(tmp_path / "in", ["a.png", "b.png", "c/d.png"])
    out = tmp_path / "in" / "restored"
    runner = CliRunner()
    for _ in range(2):
        result = runner.invoke(main, ["restore", str(tmp_path / "in"), str(out),
                                      "--model", tiny_model, "--json"])
        assert result.exit_code == 0, result.output
        summary = _json(result.output)
        assert summary["total"] == 3, summary
    assert not (out / "restored").exists()
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "a.png", "b.png", "c/d.png"]


@pytest.mark.slow
def test_summary_resolves_the_default_model_and_its_settings(ray_session, tmp_path):
    _images(tmp_path / "in", ["a.png", "b.png"], size=(20, 28))
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "o"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    summary = _json(result.output)
    model = summary["spec"]["model"]
    assert model["name"] == "restore-default"
    assert model["overlap"] == summary["fingerprint"]["overlap"] > 0  # the receptive field
    assert model["tile"] == summary["fingerprint"]["tile"] >= 4 * model["overlap"]
    # resolved on this CPU: bf16 where it has native bf16, else fp32
    cpu = "bf16" if cpu_has_bf16() else "fp32"
    assert model["precision"] == summary["fingerprint"]["precision"] == cpu
    assert summary["input_bytes"] == sum(p.stat().st_size for p in (tmp_path / "in").iterdir())
    job = json.loads((tmp_path / "o" / "_restorer" / "job.json").read_text())
    assert job["fingerprint_version"] == 2 and job["fingerprint"] == summary["fingerprint"]
    # a blind denoiser: its actors fill clean flat regions (restorer.image.flat), part of the
    # outputs
    assert summary["fingerprint"]["flat_fill"] == "noise-9"
    assert summary["spec"]["model"]["flat_fill"] == "auto"


@pytest.mark.slow
def test_fingerprint_mismatch_and_gpus_on_embedded_ray_exit_2(ray_session, tmp_path,
                                                              tiny_model):
    _images(tmp_path / "in", ["a.png"])
    runner = CliRunner()
    args = ["restore", str(tmp_path / "in"), str(tmp_path / "o"), "--model", tiny_model,
            "--tile", "64"]
    assert runner.invoke(main, args).exit_code == 0
    result = runner.invoke(main, [*args, "--tile", "96"])
    assert result.exit_code == 2 and "tile: 64 -> 96" in result.output, result.output
    result = runner.invoke(main, [*args, "--gpus-per-worker", "1"])
    assert result.exit_code == 2 and "--gpus-per-worker 0" in result.output, result.output


@pytest.mark.slow
def test_an_fp32_output_of_a_cpu_resumes_only_at_fp32_where_auto_became_bf16(
        ray_session, tmp_path, tiny_model):
    """Outputs made on CPUs before bf16 became their default hold precision fp32: a plain
    rerun on a bf16 CPU is refused naming it (README's remedy: --precision fp32)."""
    _images(tmp_path / "in", ["a.png"])
    args = ["restore", str(tmp_path / "in"), str(tmp_path / "o"), "--model", tiny_model]
    assert CliRunner().invoke(main, [*args, "--precision", "fp32"]).exit_code == 0
    result = CliRunner().invoke(main, [*args, "--json"])
    if cpu_has_bf16():
        assert result.exit_code == 2, result.output
        assert "precision: 'fp32' -> 'bf16'" in result.output  # what differs, and the fix
        assert "--precision fp32" in result.output
        result = CliRunner().invoke(main, [*args, "--precision", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    summary = _json(result.output)
    assert summary["resumed"] and summary["skipped"] == 1


@pytest.mark.slow
def test_outputs_of_the_previous_fingerprint_version_resume(ray_session, tmp_path, tiny_model,
                                                             caplog):
    """job.json files written before fingerprints were resolved (version 1) held tile and
    overlap as configured; such outputs resume with the same flags and are upgraded."""
    _images(tmp_path / "in", ["a.png", "b.png"])
    args = ["restore", str(tmp_path / "in"), str(tmp_path / "o"), "--model", tiny_model]
    assert CliRunner().invoke(main, args).exit_code == 0
    job_path = tmp_path / "o" / "_restorer" / "job.json"
    job = json.loads(job_path.read_text())
    job.pop("fingerprint_version")
    job["fingerprint"].pop("edge_padding")
    job["fingerprint"].update(overlap=0, precision="auto", tile=256)  # as version 1 wrote it
    job_path.write_text(json.dumps(job))
    result = CliRunner().invoke(main, [*args, "--tile", "256", "--json"])
    assert result.exit_code == 0, result.output
    summary = _json(result.output)
    assert summary["resumed"] and (summary["skipped"], summary["succeeded"]) == (2, 0)
    assert "padded image edges by replication" in caplog.text  # what changed, and the remedy
    upgraded = json.loads(job_path.read_text())
    assert upgraded["fingerprint_version"] == 2
    assert upgraded["fingerprint"]["edge_padding"] == "reflect"


@pytest.mark.slow
def test_train_gpus_on_embedded_ray_exit_2(ray_session, tmp_path):
    _images(tmp_path / "data", ["a.png", "b.png"], size=(64, 64))
    spec = tmp_path / "train.toml"
    spec.write_text(f'kind = "train"\nname = "t"\n[net]\narch = "dncnn"\nchannels = 1\n'
                    f'[data]\nuri = "{tmp_path / "data"}"\n'
                    f'[output]\nstorage_path = "{tmp_path / "ck"}"\n')
    result = CliRunner().invoke(main, ["train", str(spec), "--gpus-per-worker", "1"])
    assert result.exit_code == 2, result.output
    assert "--gpus-per-worker 0" in result.output
    assert not (tmp_path / "ck").exists()
