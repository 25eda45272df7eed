"""Submitting specs through the Jobs API of a real, token-protected Ray head.

The head is started here with ``ray start --head --block`` on free ports, its own temp dir and
its own token file, and stopped by its process id (never ``ray stop``, which would stop every
Ray on the machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port
from PIL import Image

from restorer.errors import JobError, ModelError, SpecError
from restorer.launch import submit as jobs_api
from restorer.launch.local import load_spec

HEAD_START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 120


def _on_head(test):
    """Marks a test that uses the Ray head (Ray's log tailing warns about aiohttp's ssl=None)."""
    for mark in (pytest.mark.slow,
                 pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")):
        test = mark(test)
    return test


def _write_images(folder: Path, count: int, size: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img{i:03d}.png" for i in range(count)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / name)
    return names


def _write_spec(path: Path, input_uri: str, output_uri: str, model: str = "",
                extra: str = "") -> Path:
    path.write_text(f"""kind = "restore"
name = "{path.stem}"
[input]
uri = "{input_uri}"
[output]
uri = "{output_uri}"
[model]
name = "{model}"
tile = 64
[resources]
workers = 1
gpus_per_worker = 0
cpus_per_worker = 0.5
threads_per_worker = 1
batch_size = 4
{extra}""")
    return path


def _train_spec(data: str, storage_path: str) -> str:
    return f"""kind = "train"
name = "tiny-train"
[net]
arch = "dncnn"
channels = 1
num_features = 8
num_layers = 4
[data]
uri = "{data}"
[optim]
steps = 4
batch_size = 4
patch_size = 32
[validation]
every = 2
[output]
storage_path = "{storage_path}"
[resources]
workers = 1
gpus_per_worker = 0
"""


def _stop_head(process: subprocess.Popen) -> None:
    """SIGTERM the blocking `ray start` (it stops what it started), then SIGKILL its group.

    The head runs in a session of its own, so its process group holds only what it started.
    """
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # leftovers; raylet has reaped its workers


@pytest.fixture(scope="module")
def head():
    """A token-protected Ray head (2 CPUs, 300 MB object store); yields its dashboard URL.

    The shared in-process Ray is shut down first, as ``exclusive_ray`` does, so that only one
    cluster runs at a time. This process sees the head's token through RAY_AUTH_TOKEN_PATH.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    run_dir = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: socket paths
    token_file = run_dir / "token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    dashboard_port = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard_port,
             "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # Token mode with this head's own token; on SIGTERM stop at once instead of draining the
    # node for 30 s (Ray 2.60's default for `ray start --block`).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block",
               "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(300 * 2**20),
               "--temp-dir", str(run_dir / "ray"), "--disable-usage-stats"]
    for flag, port in ports.items():
        command += [flag, str(port)]
    url = f"http://127.0.0.1:{dashboard_port}"
    with open(run_dir / "head.log", "wb") as head_log:
        process = subprocess.Popen(command, env=env, stdout=head_log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            patch.delenv(name, raising=False)
        patch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
        try:
            deadline = time.monotonic() + HEAD_START_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    pytest.fail("ray start exited with code "
                                f"{process.returncode}:\n{(run_dir / 'head.log').read_text()}")
                try:
                    jobs_api.list_jobs(url)
                    break
                except jobs_api.ClusterError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            yield url
        finally:
            _stop_head(process)
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("submit") / "in"
    return folder, _write_images(folder, 6, 48)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@_on_head
def test_submit_follow_restore_job(head, small_folder, tiny_model, tmp_path, monkeypatch,
                                   exclusive_ray):
    folder, names = small_folder
    monkeypatch.chdir(tmp_path)  # the output is relative: submit makes it absolute
    # resources.address names another cluster: the job must run on the one it is sent to.
    spec = _write_spec(tmp_path / "small-restore.toml", str(folder), "out", model=tiny_model,
                       extra='address = "ray://elsewhere:10001"\n')
    job_id = jobs_api.submit(spec, head, overrides={"limit": 5, "workers": None})
    assert job_id.startswith("small-restore-")
    chunks: list[str] = []
    job = jobs_api.follow(head, job_id, write=chunks.append)
    logs = "".join(chunks)
    assert (job.status, job.driver_exit_code) == ("SUCCEEDED", 0), logs
    assert "restored 5 of 5 images" in logs
    written = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert written == names[:5]
    summary = json.loads((tmp_path / "out" / "_restorer" / "summary.json").read_text())
    assert summary["succeeded"] == 5
    # The job ran the shipped copy of the local model, and says which model it was.
    sha = hashlib.sha256(Path(tiny_model).read_bytes()).hexdigest()
    assert summary["model_sha256"] == job.metadata["model_sha256"] == sha
    assert job.metadata["kind"] == "restore" and job.metadata["spec"] == spec.name
    assert job.metadata["output.uri"] == str(tmp_path / "out")
    assert job.metadata["model"] == str(Path(tiny_model).resolve())
    assert job.entrypoint == "python -m restorer run small-restore.toml"

    assert job_id in [j.job_id for j in jobs_api.list_jobs(head)]
    assert jobs_api.job_status(head, job_id).status == "SUCCEEDED"
    assert "restored 5 of 5 images" in "".join(jobs_api.job_logs(head, job_id))
    followed = "".join(jobs_api.job_logs(head, job_id, follow=True))
    assert "restored 5 of 5 images" in followed


@_on_head
def test_bad_specs_submit_nothing(head, small_folder, tmp_path, exclusive_ray):
    folder, _ = small_folder
    before = len(jobs_api.list_jobs(head))
    typo = _write_spec(tmp_path / "typo.toml", str(folder), str(tmp_path / "out"),
                       extra="[limits]\nmax_pixel = 3\n")
    with pytest.raises(SpecError, match="max_pixel"):
        jobs_api.submit(typo, head)
    good = _write_spec(tmp_path / "good.toml", str(folder), str(tmp_path / "out"))
    with pytest.raises(SpecError, match="gpus_per_worker"):
        jobs_api.submit(good, head, overrides={"gpus_per_worker": -3.0})
    with pytest.raises(SpecError, match="cannot be overridden"):
        jobs_api.submit(good, head, overrides={"address": "auto"})
    with pytest.raises(ModelError, match="Unknown model"):
        jobs_api.submit(good, head, overrides={"model": "no-such-model"})
    with pytest.raises(SpecError, match="does not exist"):
        jobs_api.submit(tmp_path / "missing.toml", head)
    assert len(jobs_api.list_jobs(head)) == before


@_on_head
def test_stop_a_running_job(head, tmp_path, exclusive_ray):
    folder = tmp_path / "many"
    _write_images(folder, 400, 64, seed=1)
    output = tmp_path / "out"
    spec = _write_spec(tmp_path / "long.toml", str(folder), str(output))  # the default model
    job_id = jobs_api.submit(spec, head, stop_grace_s=60)
    _wait_for(lambda: "worker plan" in next(jobs_api.job_logs(head, job_id)), JOB_TIMEOUT_S,
              "the job to start restoring")
    job = jobs_api.stop_job(head, job_id, wait=JOB_TIMEOUT_S)
    logs = next(jobs_api.job_logs(head, job_id))
    assert job.status == "STOPPED", logs
    # SIGTERM reached `restorer run`, which drained and recorded the stop before exiting.
    assert "SIGTERM: stopping" in logs
    summary = json.loads((output / "_restorer" / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert len(list(output.glob("*.png"))) < 400
    # Stopping a job that has ended changes nothing.
    assert jobs_api.stop_job(head, job_id).status == "STOPPED"


@_on_head
def test_submit_train_job(head, tmp_path, monkeypatch, exclusive_ray):
    from restorer.io.samples import write_samples

    write_samples(str(tmp_path / "data"), sigma=0)
    monkeypatch.chdir(tmp_path)  # both paths are relative: submit makes them absolute
    spec = tmp_path / "tiny-train.toml"
    spec.write_text(_train_spec("data", "ckpt"))
    job_id = jobs_api.submit(spec, head)
    chunks: list[str] = []
    job = jobs_api.follow(head, job_id, write=chunks.append)
    assert (job.status, job.metadata["kind"]) == ("SUCCEEDED", "train"), "".join(chunks)
    summary = json.loads((tmp_path / "ckpt" / "tiny-train" / "summary.json").read_text())
    assert summary["steps"] == 4
    assert (tmp_path / "ckpt" / "tiny-train" / "model.safetensors").exists()


@_on_head
def test_token_and_address_errors(head, small_folder, tmp_path, monkeypatch, exclusive_ray):
    wrong = "0" * 64
    monkeypatch.setenv("RAY_AUTH_TOKEN", wrong)
    with pytest.raises(jobs_api.AuthError, match="rejected the token from RAY_AUTH_TOKEN") as e:
        jobs_api.list_jobs(head)
    assert wrong not in str(e.value) and head in str(e.value)
    monkeypatch.delenv("RAY_AUTH_TOKEN")

    empty = tmp_path / "empty-token"
    empty.write_text("")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(empty))
    with pytest.raises(jobs_api.AuthError, match="is empty"):
        jobs_api.list_jobs(head)
    monkeypatch.undo()

    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(jobs_api.ClusterError, match=f"Cannot reach the Ray Jobs API at {nobody}"):
        jobs_api.list_jobs(nobody)
    with pytest.raises(jobs_api.ClusterError, match="not the address of a Ray dashboard"):
        jobs_api.list_jobs("ray://127.0.0.1:10001")
    # An explicit address wins over RAY_ADDRESS, which is only the default.
    monkeypatch.setenv("RAY_ADDRESS", nobody)
    assert isinstance(jobs_api.list_jobs(head), list)
    with pytest.raises(jobs_api.ClusterError, match=nobody):
        jobs_api.list_jobs()
    monkeypatch.delenv("RAY_ADDRESS")

    with pytest.raises(JobError, match="No job 'no-such-job'"):
        jobs_api.job_status(head, "no-such-job")
    with pytest.raises(JobError, match="No job 'no-such-job'"):
        jobs_api.job_logs(head, "no-such-job")
    with pytest.raises(JobError, match="No job 'no-such-job'"):
        jobs_api.stop_job(head, "no-such-job")


# --- without a cluster ---------------------------------------------------------------------------

def test_dashboard_url(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert jobs_api.dashboard_url("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert jobs_api.dashboard_url("https://ray.example:443/") == "https://ray.example:443"
    for address in ("ray://127.0.0.1:10001", "auto", "localhost"):
        with pytest.raises(jobs_api.ClusterError, match="not the address of a Ray dashboard"):
            jobs_api.dashboard_url(address)
    with pytest.raises(jobs_api.ClusterError, match="No Ray cluster address"):
        jobs_api.dashboard_url()
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert jobs_api.dashboard_url() == "http://10.0.0.1:8265"
    assert jobs_api.dashboard_url("10.0.0.2:8265") == "http://10.0.0.2:8265"


def test_token_is_found_in_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert jobs_api._token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs_api._token() == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    path = tmp_path / "token"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert jobs_api._token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-variable")
    assert jobs_api._token() == ("from-variable", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(jobs_api.AuthError, match="cannot be read"):
        jobs_api._token()  # an unreadable token file is an error, as in Ray, not a fall-through


def test_spec_is_checked_before_the_cluster_is_contacted(small_folder, tmp_path):
    folder, _ = small_folder
    nobody = f"http://127.0.0.1:{free_port()}"
    spec = _write_spec(tmp_path / "s.toml", str(folder), str(tmp_path / "out"))
    with pytest.raises(SpecError, match="gpus_per_worker"):
        jobs_api.submit(spec, nobody, overrides={"gpus_per_worker": -3.0})
    with pytest.raises(ModelError, match="Unknown model"):
        jobs_api.submit(spec, nobody, overrides={"model": "no-such-model"})
    with pytest.raises(jobs_api.ClusterError, match=f"Cannot reach the Ray Jobs API at {nobody}"):
        jobs_api.submit(spec, nobody)


def test_shipped_spec_is_resolved(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = _write_spec(tmp_path / "s.toml", "in dir", "out", model=tiny_model,
                       extra='address = "ray://elsewhere:10001"\n')
    prepared = jobs_api._prepare(spec, {"workers": 2, "limit": 3})
    shipped = tmp_path / "shipped.toml"
    shipped.write_text(jobs_api.spec_toml(prepared.spec))
    resolved = load_spec(shipped)
    assert resolved == prepared.spec
    assert (resolved.input.uri, resolved.output.uri) == (str(tmp_path / "in dir"),
                                                         str(tmp_path / "out"))
    assert (resolved.resources.workers, resolved.input.limit) == (2, 3)
    assert resolved.resources.address == ""  # runs on the cluster it is submitted to
    assert resolved.model.name == prepared.shipped_model == "models/tiny.safetensors"
    assert prepared.model_sha256 == hashlib.sha256(Path(tiny_model).read_bytes()).hexdigest()
    with pytest.raises(SpecError, match="cannot be overridden when submitting"):
        jobs_api._prepare(spec, {"address": "auto"})


def test_shipped_train_spec_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "t.toml"
    spec.write_text(_train_spec("data", "ckpt"))
    prepared = jobs_api._prepare(spec, {"workers": 1})
    assert prepared.model_uri == ""  # trained from scratch
    shipped = tmp_path / "shipped.toml"
    shipped.write_text(jobs_api.spec_toml(prepared.spec))
    resolved = load_spec(shipped)
    assert resolved == prepared.spec and resolved.net["num_features"] == 8
    assert (resolved.data.uri, resolved.output.storage_path) == (str(tmp_path / "data"),
                                                                 str(tmp_path / "ckpt"))


@_on_head
def test_cli_submit_follow_and_jobs_commands(head, small_folder, tmp_path, monkeypatch,
                                            exclusive_ray):
    from click.testing import CliRunner

    from restorer.cli import main

    folder, _ = small_folder
    monkeypatch.chdir(tmp_path)
    spec = _write_spec(tmp_path / "cli-restore.toml", str(folder), "cli-out")
    runner = CliRunner()
    result = runner.invoke(main, ["submit", str(spec), "--address", head, "--limit", "3",
                                  "--follow"])
    assert result.exit_code == 0, result.output
    assert "restored 3 of 3 images" in result.output and "SUCCEEDED" in result.output
    job_id = result.output.split()[1].rstrip(";")
    listed = runner.invoke(main, ["jobs", "list", "--address", head])
    assert job_id in listed.output
    status = runner.invoke(main, ["jobs", "status", job_id, "--address", head])
    assert json.loads(status.output)["status"] == "SUCCEEDED"
    logs = runner.invoke(main, ["jobs", "logs", job_id, "--address", head])
    assert "restored 3 of 3 images" in logs.output
    bad = runner.invoke(main, ["submit", str(tmp_path / "missing.toml"), "--address", head])
    assert bad.exit_code == 2
