"""One job per output: the lease on OUTPUT/_restorer/lease.json."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from restorer.cli import main
from restorer.errors import OutputConflictError
from restorer.io import storage
from restorer.output.lease import Lease


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


# --- fencing: a job that lost its lease commits nothing more ---------------------------------

def test_a_taken_over_lease_fails_the_old_holders_next_check_naming_the_taker(tmp_path):
    from restorer.errors import LeaseLostError

    uri = str(tmp_path / "_restorer" / "lease.json")
    old = Lease(uri, heartbeat_seconds=3600)
    old.acquire()
    try:
        old.check()  # held: passes
        taker = Lease(uri, stale_seconds=0)  # the old holder's heartbeat counts as missed
        taker.acquire()
        with pytest.raises(LeaseLostError, match=taker.holder.job_id):
            old.check()
        taker.check()  # the taker holds it
        old.release()  # a fenced job leaves the taker's lease alone
        assert taker.read().job_id == taker.holder.job_id
        taker.release()
        assert not storage.exists(uri)
    finally:
        old.release()


def test_a_lease_file_replaced_by_another_job_is_a_lost_lease(tmp_path):
    from restorer.errors import LeaseLostError

    uri = tmp_path / "_restorer" / "lease.json"
    with Lease(str(uri), heartbeat_seconds=3600) as lease:
        intruder = dict(json.loads(uri.read_text()), job_id="intruder42", pid=4242,
                        heartbeat=time.time())
        uri.write_text(json.dumps(intruder))
        with pytest.raises(LeaseLostError, match="intruder42"):
            lease.check()
        assert lease.lost
    assert json.loads(uri.read_text())["job_id"] == "intruder42"  # not removed at the end


def test_the_heartbeat_finds_a_replaced_lease_and_never_writes_over_it(tmp_path):
    uri = tmp_path / "_restorer" / "lease.json"
    lease = Lease(str(uri), heartbeat_seconds=0.05)
    lease.acquire()
    try:
        # published whole, as a job writes it: the heartbeat reads it every 0.05 s
        storage.write_bytes(str(uri), json.dumps(
            dict(json.loads(uri.read_text()), job_id="intruder42")).encode())
        deadline = time.time() + 10
        while not lease.lost and time.time() < deadline:
            time.sleep(0.02)
        assert lease.lost
        time.sleep(0.2)
        assert json.loads(uri.read_text())["job_id"] == "intruder42"
    finally:
        lease.release()


def test_the_heartbeat_survives_errors_other_than_storage_errors(tmp_path, monkeypatch):
    """A botocore timeout surfacing as a plain OSError/TimeoutError must not end the
    heartbeat (the lease would go stale under a live job and be taken over)."""
    import restorer.output.lease as lease_module

    failures = {"left": 3}

    class Flaky:
        def __getattr__(self, name):
            real = getattr(storage, name)
            if not callable(real) or isinstance(real, type):
                return real

            def call(*args, **kwargs):
                if threading.current_thread().name == "restorer-lease" and failures["left"]:
                    failures["left"] -= 1
                    raise TimeoutError("Read timeout on endpoint URL")
                return real(*args, **kwargs)
            return call

    monkeypatch.setattr(lease_module, "storage", Flaky())
    uri = str(tmp_path / "_restorer" / "lease.json")
    with Lease(uri, heartbeat_seconds=0.05) as lease:
        first = json.loads(storage.read_bytes(uri))["heartbeat"]
        deadline = time.time() + 10
        while (json.loads(storage.read_bytes(uri))["heartbeat"] == first
               and time.time() < deadline):
            time.sleep(0.05)
        assert failures["left"] == 0
        assert json.loads(storage.read_bytes(uri))["heartbeat"] > first  # still beating
        assert not lease.lost


def test_two_takers_of_a_stale_lease_never_both_win(tmp_path, monkeypatch):
    """Both look at the stale lease before either claims it; exactly one takes it."""
    uri = str(tmp_path / "_restorer" / "lease.json")
    (tmp_path / "_restorer").mkdir()
    (tmp_path / "_restorer" / "lease.json").write_text(json.dumps({
        "job_id": "deadbeef", "host": "gone", "pid": 1, "started": time.time() - 999,
        "heartbeat": time.time() - 300}))
    barrier = threading.Barrier(2, timeout=10)
    real_state = Lease._state

    looked: set[int] = set()

    def state(self, generation):
        holder = real_state(self, generation)
        if threading.get_ident() not in looked:  # the first look of each taker
            looked.add(threading.get_ident())
            barrier.wait()  # both have judged the lease stale before either claims it
        return holder

    monkeypatch.setattr(Lease, "_state", state)
    outcomes: list = []

    def take():
        lease = Lease(uri, heartbeat_seconds=3600)
        try:
            lease.acquire()
            outcomes.append(lease)
        except OutputConflictError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if isinstance(o, Lease)]
    assert len(winners) == 1, outcomes
    assert winners[0].holder.job_id in str(next(o for o in outcomes if o is not winners[0]))
    winners[0].check()
    winners[0].release()


def test_overwrite_does_not_take_over_a_stale_lease_that_may_be_live(tmp_path):
    uri = tmp_path / "lease.json"
    uri.write_text(json.dumps({"job_id": "slowpoke", "host": "elsewhere", "pid": 7,
                               "started": time.time() - 999, "heartbeat": time.time() - 300}))
    with pytest.raises(OutputConflictError, match="--overwrite.*slowpoke"):
        Lease(str(uri), stale_seconds=120, overwrite=True).acquire()
    with Lease(str(uri), stale_seconds=120):  # a resume takes it over (and fences it)
        pass


def test_lease_fencing_on_s3(s3_server, bucket):
    from restorer.errors import LeaseLostError

    uri = f"s3://{bucket}/out/_restorer/lease.json"
    old = Lease(uri, heartbeat_seconds=0.05)
    old.acquire()
    try:
        taker = Lease(uri, stale_seconds=0)
        taker.acquire()
        with pytest.raises(LeaseLostError, match=taker.holder.job_id):
            old.check()
        time.sleep(0.3)  # the old heartbeat (an If-Match PUT) never writes over the taker's
        assert taker.read().job_id == taker.holder.job_id
        taker.release()
    finally:
        old.release()
    assert not storage.exists(uri)


@pytest.mark.slow
def test_a_job_whose_lease_is_replaced_commits_nothing_more_and_exits_1(
        ray_session, tmp_path, tiny_model):
    source = tmp_path / "in"
    _folder(source, 160)
    out = tmp_path / "out"
    ledger = out / "_restorer" / "ledger"
    lease_file = out / "_restorer" / "lease.json"
    results: dict = {}
    job = threading.Thread(target=lambda: results.update(result=CliRunner().invoke(
        main, ["restore", str(source), str(out), "--model", tiny_model, "--batch-size", "1"])))
    job.start()
    deadline = time.time() + 180
    while time.time() < deadline and not (ledger.exists() and len(list(ledger.iterdir())) >= 2):
        time.sleep(0.02)
    assert ledger.exists(), "the job committed nothing"
    holder = json.loads(lease_file.read_text())
    # published whole (temp + rename), as another job writes it: a plain write_text left the
    # running job a moment to read a half-written file (a CI run failed here once)
    storage.write_bytes(str(lease_file), json.dumps(dict(
        holder, job_id="intruder42", pid=4242, heartbeat=time.time())).encode())
    committed = len(list(ledger.iterdir()))
    job.join(timeout=300)
    result = results["result"]
    assert result.exit_code == 1, result.output
    assert "lost the lease" in result.output and "intruder42" in result.output
    # at most the one commit that had passed its check when the lease was replaced
    assert len(list(ledger.iterdir())) <= committed + 1
    assert len(list(ledger.iterdir())) < 10  # far from done: 160 images are ~10 units
    assert json.loads(lease_file.read_text())["job_id"] == "intruder42"
