"""What a person sees of `restorer train`: the README's example on a fresh machine, one line per
checkpoint on the driver (no worker copies), Ctrl-C that saves and says so, checkpoints by
time. Each test runs the CLI as a subprocess, as a user would."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from restorer.weights.zoo import get_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RAY_AUTH_MODE="token")


def _restorer(*args, cwd, **kwargs):
    return subprocess.run([sys.executable, "-m", "restorer", *args], check=False, cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=600, **kwargs)


def test_readme_example_trains_on_samples_with_one_line_per_checkpoint(exclusive_ray,
                                                                       tmp_path):
    made = _restorer("samples", "samples/noisy", "--clean", "samples/clean", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "train-samples.toml").write_text(
        (REPO / "jobs" / "train-samples.toml").read_text())

    run = _restorer("train", "jobs/train-samples.toml", cwd=tmp_path)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console
    assert "(pid=" not in console and "RayTrainWorker" not in console, console
    assert "Reporting training result" not in console and "ConnectionError" not in console
    written = re.findall(r"step (\d+): checkpoint written", console)
    assert written == ["100", "200", "300"], console  # each once, from the driver
    assert "trained samples-denoise to step 300" in console
    model = get_model(str(tmp_path / "checkpoints" / "samples-denoise" / "model.safetensors"))
    assert model.provenance["steps"] in (100, 200, 300)


def test_ctrl_c_checkpoints_says_where_and_the_rerun_resumes_there(ray_session, tmp_path):
    made = _restorer("samples", "noisy", "--clean", "clean", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    spec = (REPO / "jobs" / "train-samples.toml").read_text()
    spec = spec.replace('"samples/clean"', '"clean"').replace("steps = 300", "steps = 100000")
    spec = spec.replace("every = 100\n", "every = 100000\n").replace(
        "every_seconds = 120 ", "every_seconds = 2   ")
    (tmp_path / "long.toml").write_text(spec)
    address = ray_session.get_runtime_context().gcs_address
    job = subprocess.Popen([sys.executable, "-m", "restorer", "train", "long.toml",
                            "--address", address], cwd=tmp_path, env=ENV, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    try:
        deadline = time.time() + 300
        for line in job.stdout:  # wait for a checkpoint made by time, not by steps
            lines.append(line)
            if "checkpoint written (2 s since the last one" in line or time.time() > deadline:
                break
        job.send_signal(signal.SIGINT)
        rest, _ = job.communicate(timeout=180)
    finally:
        job.kill()
    console = "".join(lines) + rest
    assert job.returncode == 4, console
    assert "stopping: rank 0 writes a checkpoint" in console
    stopped = re.search(r"step (\d+): checkpoint written \(stop;", console)
    assert stopped, console
    step = int(stopped.group(1))
    said = re.search(r"stopped with the checkpoint of step (\d+) in\s+(\S+)", console)
    assert said and int(said.group(1)) == step, console
    meta = json.loads((tmp_path / said.group(2) / "meta.json").read_text())
    assert meta["step"] == step
    history = [json.loads(x) for x in (tmp_path / "checkpoints" / "samples-denoise" /
                                      "history.jsonl").read_text().splitlines()]
    assert len(history) >= 2 and all(h["step"] % 100000 for h in history)  # by time + stop

    (tmp_path / "long.toml").write_text(spec.replace("steps = 100000", f"steps = {step + 20}"))
    rerun = _restorer("train", "long.toml", "--address", address, cwd=tmp_path)
    console = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, console
    assert f"resumed at step {step} from" in console
    assert f"trained samples-denoise to step {step + 20}" in console
