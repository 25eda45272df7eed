"""Fault injection on one machine: a killed actor, a SIGKILLed job, a SIGTERMed job.

The killers are written here (process ids from Ray's state API, os.kill); Ray's private test
utilities change too often to lean on.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from restorer.io.codec import decode
from restorer.pipeline import restore

pytestmark = pytest.mark.slow


def _alive_actor_pids() -> list[int]:
    """Pids of the live Ray Data map workers (our RestoreActors), from the GCS actor table.

    ``ray.util.state`` needs the dashboard, which the test cluster does not run.
    """
    import ray._private.state

    return [a["Pid"] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"]]


def _images(folder, count, size=96):
    rng = np.random.default_rng(11)
    for i in range(count):
        sub = folder / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size + i % 7), dtype=np.uint8)).save(
            sub / f"img{i:04d}.png")


def _outputs(out):
    return {p.relative_to(out).as_posix(): p for p in out.rglob("*.png")
            if "_restorer" not in p.parts}


def _ledger_keys(out):
    return pq.read_table(out / "_restorer" / "ledger", columns=["key"]).column("key").to_pylist()


def _wait_for(predicate, timeout=120, step=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def _committed(out):
    folder = out / "_restorer" / "ledger"
    return len(os.listdir(folder)) if folder.exists() else 0


def test_killed_actor_job_completes_with_the_same_pixels(ray_session, tmp_path, tiny_model):
    source = tmp_path / "in"
    _images(source, 240)
    clean = restore(str(source), str(tmp_path / "clean"), model=tiny_model, tile=48,
                    batch_size=2)
    assert clean["succeeded"] == 240

    killed = []

    def killer():
        if not _wait_for(lambda: len(_outputs(tmp_path / "faulty")) >= 4):
            return
        for pid in _alive_actor_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=killer)
    thread.start()
    summary = restore(str(source), str(tmp_path / "faulty"), model=tiny_model, tile=48,
                      batch_size=2)
    thread.join()
    assert killed, "the job ended before an actor could be killed; make it longer"
    assert summary["succeeded"] == 240 and summary["failed"] == 0
    assert len(_outputs(tmp_path / "faulty")) == 240
    a, b = _outputs(tmp_path / "clean"), _outputs(tmp_path / "faulty")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(np.asarray(Image.open(a[key])), np.asarray(Image.open(b[key]))), key
    assert sorted(_ledger_keys(tmp_path / "faulty")) == sorted(a)


def _job(ray_session, source, out, model, *extra):
    address = ray_session.get_runtime_context().gcs_address
    return subprocess.Popen(
        [sys.executable, "-m", "restorer", "restore", str(source), str(out), "--model", model,
         "--tile", "48", "--batch-size", "2", "--address", address, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, RAY_AUTH_MODE="token"))


class _LocalOutput:
    def __init__(self, out):
        self.uri, self.out = str(out), out

    def committed(self) -> int:
        return _committed(self.out)

    def outputs(self) -> dict[str, bytes]:
        return {k: p.read_bytes() for k, p in _outputs(self.out).items()}

    def ledger(self) -> list[str]:
        return _ledger_keys(self.out)


class _S3Output:
    def __init__(self, bucket):
        import s3fs

        self.uri, self.root = f"s3://{bucket}/restored/", f"{bucket}/restored"
        self.fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)

    def committed(self) -> int:
        folder = f"{self.root}/_restorer/ledger"
        return len(self.fs.ls(folder)) if self.fs.exists(folder) else 0

    def outputs(self) -> dict[str, bytes]:
        keys = [k for k in self.fs.find(f"{self.root}/") if k.endswith(".png")
                and "/_restorer/" not in k]
        return {k.removeprefix(f"{self.root}/"): self.fs.cat_file(k) for k in keys}

    def ledger(self) -> list[str]:
        return pq.read_table(f"{self.root}/_restorer/ledger", filesystem=self.fs,
                             columns=["key"]).column("key").to_pylist()


def _settled(output, quiet=2.0, timeout=60):
    """The outputs once nothing has been written for ``quiet`` seconds (a killed job's Ray
    tasks may still be finishing writes)."""
    keys, since, deadline = set(output.outputs()), time.time(), time.time() + timeout
    while time.time() - since < quiet and time.time() < deadline:
        time.sleep(0.5)
        now = set(output.outputs())
        if now != keys:
            keys, since = now, time.time()
    return keys


def _sigkill_then_rerun(ray_session, tmp_path, tiny_model, output):
    source = tmp_path / "in"
    images = 300  # long enough that the results of every unit cannot all come between two polls
    _images(source, images)
    job = _job(ray_session, source, output.uri, tiny_model)
    try:
        assert _wait_for(lambda: output.committed() >= 1), "no unit committed in time"
        job.send_signal(signal.SIGKILL)
        job.wait(30)
    finally:
        job.kill()
    before = output.committed()
    written = _settled(output)
    committed = set(output.ledger())
    in_flight = written - committed  # written by units the kill left uncommitted

    summary = restore(str(source), output.uri, model=tiny_model, tile=48, batch_size=2)
    assert summary["resumed"] is True
    assert summary["skipped"] == len(committed)
    assert summary["succeeded"] + summary["skipped"] == images
    assert before < output.committed(), "the job finished before it was killed; make it longer"
    # redone work is bounded by what was in flight, and reported: every output the killed job
    # wrote outside a committed unit, and only those, is counted as replaced
    assert summary["replaced_outputs"] == len(in_flight), (summary, sorted(in_flight))
    blobs = output.outputs()
    assert len(blobs) == images
    for key, data in blobs.items():  # nothing truncated: every output decodes whole
        assert decode(data).pixels.shape[0] == 96, key
    ledger = output.ledger()
    assert len(ledger) == len(set(ledger)) == images  # every input recorded exactly once


def test_sigkilled_job_reruns_to_exactly_once(ray_session, tmp_path, tiny_model):
    _sigkill_then_rerun(ray_session, tmp_path, tiny_model, _LocalOutput(tmp_path / "out"))


def test_sigkilled_job_on_s3_reruns_to_exactly_once(ray_session, bucket, tmp_path, tiny_model):
    _sigkill_then_rerun(ray_session, tmp_path, tiny_model, _S3Output(bucket))


STOP_SECONDS = 10  # signal to exit, at most; a RayJob's stop grace is 60 s (Ray's default 3)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_drains_quickly_and_exits_4_then_rerun_finishes(ray_session, tmp_path,
                                                               tiny_model, sig):
    """SIGTERM (pre-emption, `restorer jobs stop`) or a Ctrl-C (SIGINT): the driver commits
    the complete units and writes a "stopped" summary from its counters (no ledger re-read)
    within STOP_SECONDS, exits 4, and a plain rerun finishes the job."""
    source, out = tmp_path / "in", tmp_path / "out"
    _images(source, 150)
    job = _job(ray_session, source, out, tiny_model)
    try:
        assert _wait_for(lambda: _committed(out) >= 1), "no unit committed in time"
        signalled = time.monotonic()
        job.send_signal(sig)
        output, _ = job.communicate(timeout=120)
        seconds = time.monotonic() - signalled
    finally:
        job.kill()
    assert job.returncode == 4, output[-3000:]
    # one calm paragraph: what is kept, what was in flight, the command to resume; no traceback
    assert "Traceback" not in output and "Ray is not initialized" not in output, output[-3000:]
    assert "SIGTERM handler is not set" not in output, output[-3000:]
    assert "Error:" not in output
    assert f"run:\n    restorer restore {source} {out} --model" in output, output
    in_flight = int(re.search(r"(\d+) images were in flight", output).group(1))
    assert seconds < STOP_SECONDS, f"{seconds:.1f} s from {sig.name} to exit"
    stopped = json.loads((out / "_restorer" / "summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["committed_units"] == _committed(out)
    assert "job" not in stopped  # the ledger was not re-read
    assert not (out / "_restorer" / "report.html").exists()
    from click.testing import CliRunner

    from restorer.cli import main

    rebuilt = CliRunner().invoke(main, ["inspect", str(out), "--report"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (out / "_restorer" / "report.html").exists()
    print(f"{sig.name}: {seconds:.2f} s from the signal to exit")
    assert stopped["in_flight_written"] == in_flight
    summary = restore(str(source), str(out), model=tiny_model, tile=48, batch_size=2)
    assert summary["succeeded"] + summary["skipped"] == 150
    assert summary["status"] == "ok"
    # the counts the stop gave are what the rerun found
    assert summary["replaced_outputs"] == in_flight, (summary["replaced_outputs"], in_flight)
    assert sorted(_ledger_keys(out)) == sorted(_outputs(out))


def test_killed_training_resumes_from_its_newest_checkpoint(ray_session, tmp_path):
    """A `restorer train` SIGKILLed after its third checkpoint: the rerun resumes at the newest
    complete checkpoint folder on disk (not Ray's older snapshot) and leaves output.keep
    folders."""
    from restorer.io.samples import write_samples
    from restorer.io.storage import StorageOptions
    from restorer.job.specs import spec_from_dict
    from restorer.train.checkpoints import checkpoint_folders
    from restorer.train.distributed import run_train

    write_samples(str(tmp_path / "train"), sigma=0)
    spec = {"kind": "train", "name": "killed",
            "net": {"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 4},
            "data": {"uri": str(tmp_path / "train")},
            "optim": {"steps": 40, "batch_size": 4, "patch_size": 32, "seed": 3},
            "validation": {"every": 2},
            "output": {"storage_path": str(tmp_path / "runs"), "keep": 2},
            "resources": {"workers": 2}}
    spec_file = tmp_path / "train.toml"
    spec_file.write_text(_toml(spec))
    run = str(tmp_path / "runs" / "killed")
    address = ray_session.get_runtime_context().gcs_address
    job = subprocess.Popen([sys.executable, "-m", "restorer", "train", str(spec_file),
                            "--address", address], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=dict(os.environ, RAY_AUTH_MODE="token"))

    def newest() -> int:
        found = checkpoint_folders(run, StorageOptions())
        return found[0][0] if found else 0

    try:
        assert _wait_for(lambda: newest() >= 6, timeout=300), "no third checkpoint in time"
        job.send_signal(signal.SIGKILL)
        job.wait(30)
    finally:
        job.kill()
    time.sleep(3)  # the killed driver's workers go with it
    step = newest()
    assert 6 <= step < 40, f"killed at step {step}; make the run longer"
    summary = run_train(spec_from_dict(spec))
    assert summary["steps"] == 40
    with open(os.path.join(run, "history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    resumed = [h for h in history if "resumed_from" in h]
    assert [h["resumed_from"] for h in resumed] == [step], resumed
    assert [h["step"] for h in history] == list(range(2, 41, 2))  # no step done twice
    folders = [d for d in os.listdir(run)
               if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run, d))]
    assert len(folders) == 2, folders  # output.keep: the killed run's orphans are gone
    print(f"killed at step {step}; resumed from {resumed[0]['resumed_from']}")


def _toml(spec: dict) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    for table, values in spec.items():
        if isinstance(values, dict):
            lines.append(f"[{table}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
