"""One job per output: the lease on OUTPUT/_restorer/lease.json."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from restorer import storage
from restorer.cli import main
from restorer.errors import OutputConflictError
from restorer.lease import Lease


def test_second_lease_on_a_live_output_is_refused_naming_the_holder(tmp_path):
    uri = str(tmp_path / "_restorer" / "lease.json")
    with Lease(uri, heartbeat_seconds=0.2) as first:
        with pytest.raises(OutputConflictError) as error:
            Lease(uri).acquire()
        message = str(error.value)
        assert first.holder.job_id in message and str(first.holder.pid) in message
        beat = first.read().heartbeat
        time.sleep(0.6)
        assert first.read().heartbeat > beat  # the heartbeat renews it
    assert not storage.exists(uri)  # released at the end
    with Lease(uri):  # and free for the next job
        pass


def test_a_stale_lease_is_taken_over(tmp_path, caplog):
    uri = str(tmp_path / "lease.json")
    dead = {"job_id": "deadbeef", "host": "gone", "pid": 1, "started": time.time() - 999,
            "heartbeat": time.time() - 300}
    (tmp_path / "lease.json").write_text(json.dumps(dead))
    with Lease(uri, stale_seconds=120) as lease:
        assert lease.read().job_id == lease.holder.job_id
    assert "taking over" in caplog.text and "deadbeef" in caplog.text


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    holder = {"job_id": "killed0", "host": socket.gethostname(), "pid": int(gone.stdout),
              "started": time.time() - 5, "heartbeat": time.time() - 1}
    (tmp_path / "lease.json").write_text(json.dumps(holder))
    with Lease(str(tmp_path / "lease.json"), stale_seconds=120):
        pass
    assert "its process is gone" in caplog.text and "killed0" in caplog.text


def test_lease_on_s3_is_create_only(s3_server, bucket):
    uri = f"s3://{bucket}/out/_restorer/lease.json"
    first = Lease(uri)
    with first, pytest.raises(OutputConflictError, match=first.holder.job_id):
        Lease(uri).acquire()
    assert not storage.exists(uri)


def _folder(root, count):
    rng = np.random.default_rng(3)
    root.mkdir()
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(
            root / f"{index:03d}.png")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_real_jobs_on_one_output(ray_session, tmp_path, tiny_model, where, request):
    """A job runs in a thread; a second job started on its output meanwhile exits 2 naming
    the first, and `--overwrite` is refused too; after the first ends, the output is free."""
    source = tmp_path / "in"
    _folder(source, 24)
    if where == "s3":
        request.getfixturevalue("s3_server")
        output = f"s3://{request.getfixturevalue('bucket')}/two-jobs/"
    else:
        output = str(tmp_path / "out")
    lease_uri = storage.join(output, "_restorer/lease.json")
    from restorer.pipeline import restore

    results: dict = {}
    first = threading.Thread(target=lambda: results.update(
        summary=restore(str(source), output, model=tiny_model, batch_size=2)))
    first.start()
    deadline = time.time() + 120
    while not storage.exists(lease_uri) and time.time() < deadline:
        time.sleep(0.05)
    assert storage.exists(lease_uri), "the first job never took the lease"
    holder = json.loads(storage.read_bytes(lease_uri))["job_id"]
    runner = CliRunner()
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(main, ["restore", str(source), output, "--model", tiny_model,
                                      *extra])
        assert result.exit_code == 2, result.output
        assert "Another job is writing" in result.output and holder in result.output
    first.join(timeout=300)
    assert results["summary"]["succeeded"] == 24
    assert not storage.exists(lease_uri)
    result = runner.invoke(main, ["restore", str(source), output, "--model", tiny_model])
    assert result.exit_code == 0, result.output  # free again: a rerun resumes (all done)
