"""Transient faults cost no image: the error classes, the unit policy, and a job through a
fault-injecting proxy (tests/fault_proxy.py) in front of the moto S3 server."""

from __future__ import annotations

import errno
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fault_proxy import FaultProxy
from PIL import Image

from restorer.errors import (
    MISSING,
    PERMANENT,
    TRANSIENT,
    ImageError,
    StorageError,
    TransientError,
    classify,
    is_device_fatal,
    retrying,
)
from restorer.io import storage
from restorer.io.codec import decode
from restorer.job.specs import RestoreSpec, spec_from_flags
from restorer.output.ledger import MISSING_RUNS
from restorer.output.records import DECODED_SCHEMA, RECORD_SCHEMA, _defaults
from restorer.pipeline import RestoreActor
from restorer.pipeline.driver import _close_unit
from restorer.pipeline.stages import read_and_decode
from restorer.report.summary import JobState


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _chained(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize("error, kind", [
    (ImageError("a.png is not an image"), PERMANENT),
    (OSError("image file is truncated"), PERMANENT),
    (ValueError("bad shape"), PERMANENT),
    (StorageError("Unsafe key '../x'"), PERMANENT),
    (TransientError("busy"), TRANSIENT),
    (ConnectionResetError(errno.ECONNRESET, "reset"), TRANSIENT),
    (TimeoutError("read timed out"), TRANSIENT),
    (OSError(errno.EBUSY, "Please reduce your request rate."), TRANSIENT),  # s3fs's SlowDown
    (_chained(StorageError("s3://b/k: cannot read"), ConnectionResetError()), TRANSIENT),
    (_client_error("SlowDown", 503), TRANSIENT),
    (_client_error("InternalError", 500), TRANSIENT),
    (_client_error("AccessDenied", 403), PERMANENT),
    (_client_error("NoSuchKey", 404), MISSING),
    (_chained(StorageError("s3://b/k does not exist"), FileNotFoundError("k")), MISSING),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), TRANSIENT),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), TRANSIENT),
])
def test_classify(error, kind):
    assert classify(error) == kind


def test_botocore_connection_errors_are_transient():
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    for error in (EndpointConnectionError(endpoint_url="http://x"),
                  ConnectionClosedError(endpoint_url="http://x"),
                  ReadTimeoutError(endpoint_url="http://x"), NoCredentialsError()):
        assert classify(error) == TRANSIENT, error


def test_device_fatal_is_a_cuda_error_but_not_out_of_memory():
    assert is_device_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_device_fatal(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert not is_device_fatal(ValueError("bad"))


def test_retrying_retries_transient_failures_only():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "done"

    assert retrying(flaky, attempts=4, sleep=waits.append) == ("done", 2)
    assert len(waits) == 2 and all(0 <= w <= 1.0 for w in waits)  # base 0.5: <= 0.5, <= 1

    def always():
        calls.append(1)
        raise TimeoutError("still down")

    calls.clear()
    with pytest.raises(TimeoutError) as raised:
        retrying(always, attempts=3, sleep=waits.append)
    assert len(calls) == 3 and raised.value.retries == 2

    def bad():
        calls.append(1)
        raise ImageError("bad bytes")

    calls.clear()
    with pytest.raises(ImageError):
        retrying(bad, attempts=5, sleep=waits.append)
    assert len(calls) == 1


# --- the unit policy ------------------------------------------------------------------------

def _record(key: str, status: str, unit: str = "u1", size: int = 2) -> dict:
    record = _defaults([(f.name, f.type) for f in RECORD_SCHEMA])
    record.update(key=key, out_key=key, unit=unit, unit_size=size, status=status)
    if status != "ok":
        record.update(stage="read", error_class="StorageError", message=f"{key}: {status}")
    return record


def _spec(tmp_path) -> RestoreSpec:
    return spec_from_flags(RestoreSpec, input=str(tmp_path / "in"), output=str(tmp_path / "out"))


def test_a_unit_with_a_transient_failure_is_not_committed(tmp_path):
    spec = _spec(tmp_path)
    state = JobState(spec, "m", "sha", {})
    _close_unit(spec, state, "u1", [_record("a.png", "ok"), _record("b.png", "transient")], False)
    assert not (tmp_path / "out" / "_restorer" / "ledger").exists()
    assert state.incomplete_units == 1 and state.committed_units == 0
    _close_unit(spec, state, "u1", [_record("a.png", "ok"), _record("b.png", "ok")], False)
    assert (tmp_path / "out" / "_restorer" / "ledger" / "unit-u1.parquet").exists()


def test_a_missing_input_waits_for_two_runs_then_is_quarantined(tmp_path):
    spec = _spec(tmp_path)
    counter = tmp_path / "out" / "_restorer" / "missing" / "unit-u1.json"
    ledger = tmp_path / "out" / "_restorer" / "ledger" / "unit-u1.parquet"
    for run in range(1, MISSING_RUNS + 1):
        state = JobState(spec, "m", "sha", {})
        _close_unit(spec, state, "u1", [_record("a.png", "ok"), _record("b.png", "missing")],
                    False)
        assert not ledger.exists(), run
        assert json.loads(counter.read_text()) == {"runs": run, "keys": ["b.png"]}
        assert state.incomplete_units == 1
    state = JobState(spec, "m", "sha", {})
    state.missing = 1  # as _account counted it
    _close_unit(spec, state, "u1", [_record("a.png", "ok"), _record("b.png", "missing")], False)
    assert ledger.exists() and not counter.exists()
    errors = pq.read_table(tmp_path / "out" / "_restorer" / "errors.parquet").to_pylist()
    assert [e["key"] for e in errors] == ["b.png"]
    assert "missing in 3 runs" in errors[0]["message"]
    assert state.failed == 1 and state.missing == 0 and state.committed_units == 1


def test_a_vanished_local_input_is_missing_not_failed(tmp_path):
    row = _defaults([(f.name, f.type) for f in DECODED_SCHEMA])
    row.update(key="gone.png", uri=str(tmp_path / "gone.png"), unit="u", unit_size=1, size=10)
    out = read_and_decode(pa.Table.from_pylist([row], schema=DECODED_SCHEMA),
                          storage.StorageOptions(), 10**8, 10**8).to_pylist()
    assert out[0]["status"] == "missing" and out[0]["stage"] == "read"


def test_out_of_memory_in_the_actor_is_transient(tiny_model):
    actor = RestoreActor(tiny_model, tile=48, device="cpu")

    class OutOfMemory(torch.nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    actor.net = OutOfMemory()
    row = _defaults([(f.name, f.type) for f in DECODED_SCHEMA])
    pixels = np.zeros((16, 16, 1), np.uint8)
    row.update(key="a.png", unit="u", unit_size=1, status="decoded", pixels=pixels.tobytes(),
               height=16, width=16, channels=1, bits=8)
    out = actor(pa.Table.from_pylist([row], schema=DECODED_SCHEMA)).to_pylist()
    assert out[0]["status"] == "transient" and out[0]["stage"] == "restore"


# --- the proxy, then a job through it ---------------------------------------------------------

@pytest.mark.s3
def test_the_proxy_injects_faults_that_storage_rides_out(s3_server, bucket):
    with FaultProxy(s3_server, rate=0.3, slow_seconds=0.2, seed=3) as proxy:
        options = storage.StorageOptions(endpoint_url=proxy.url)
        for i in range(12):
            storage.write_bytes(f"s3://{bucket}/k{i}", bytes([i]) * 100, options)
        assert [storage.read_bytes(f"s3://{bucket}/k{i}", options) for i in range(12)] == [
            bytes([i]) * 100 for i in range(12)]
        assert proxy.counts.faults >= 5, proxy.counts
        assert proxy.counts.slow_down and (proxy.counts.dropped_before
                                           + proxy.counts.dropped_after)
        proxy.outage(2.0)
        started = time.monotonic()
        assert storage.read_bytes(f"s3://{bucket}/k1", options) == bytes([1]) * 100
        assert time.monotonic() - started >= 1.5 and proxy.counts.outage >= 1


# The store is down (every connection reset) this long mid-job: longer than botocore's default
# retries ride out (the 30 s outage quarantined 8 of 40 images with them).
OUTAGE_SECONDS = 40


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.s3
def test_job_through_faults_and_an_outage_quarantines_nothing(ray_session, s3_server, bucket,
                                                              tmp_path, tiny_model):
    """~10% of requests fail (503 SlowDown, resets before and after the store acted, slow
    answers) and the store drops every connection for OUTAGE_SECONDS mid-job: no image is
    quarantined or missing; if the job ends incomplete, a plain rerun finishes it; every
    output decodes."""
    import io
    import threading

    import boto3
    import s3fs

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    rng = np.random.default_rng(5)
    count = 200
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(buffer, "PNG")
        client.put_object(Bucket=bucket, Key=f"in/d{i % 20:02d}/img{i:03d}.png",
                          Body=buffer.getvalue())
    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server},
                               use_listings_cache=False, skip_instance_cache=True)

    def committed() -> int:
        try:
            return len(direct.ls(f"{bucket}/out/_restorer/ledger", refresh=True))
        except FileNotFoundError:
            return 0

    from restorer.pipeline import run_restore

    with FaultProxy(s3_server, rate=0.1, slow_seconds=1.0, seed=7) as proxy:
        spec = spec_from_flags(RestoreSpec, input=f"s3://{bucket}/in/",
                               output=f"s3://{bucket}/out/", model=tiny_model, tile=48,
                               batch_size=4)
        spec = _with_endpoint(spec, proxy.url)

        outage = {}

        def start_outage() -> None:
            def wait() -> None:
                deadline = time.monotonic() + 600
                while committed() < 3 and time.monotonic() < deadline:
                    time.sleep(0.2)
                outage["at_units"] = committed()
                proxy.outage(OUTAGE_SECONDS, ("outage-drop",))

            threading.Thread(target=wait, daemon=True).start()

        start_outage()
        started = time.monotonic()
        summaries = [run_restore(spec)]
        first_seconds = time.monotonic() - started
        assert outage.get("at_units") is not None and outage["at_units"] < 20, \
            f"the outage did not start mid-job: {outage}"
        assert proxy.counts.outage > 0 and proxy.counts.slow_down > 0
        while summaries[-1]["status"] == "incomplete" and len(summaries) < 3:
            summaries.append(run_restore(spec))
        counts = proxy.counts
    for summary in summaries:
        assert summary["failed"] == 0, summary["errors_by_class"]
        assert summary["missing_inputs"] == 0
    assert summaries[-1]["status"] == "ok", [s["status"] for s in summaries]
    assert sum(s["succeeded"] for s in summaries) >= count
    ledger = pq.read_table(f"{bucket}/out/_restorer/ledger", filesystem=direct,
                           columns=["key", "status"]).to_pylist()
    assert sorted(r["key"] for r in ledger) == sorted(
        f"d{i % 20:02d}/img{i:03d}.png" for i in range(count))  # each input exactly once
    assert {r["status"] for r in ledger} == {"ok"}
    assert not direct.exists(f"{bucket}/out/_restorer/errors.parquet")
    outputs = [k for k in direct.find(f"{bucket}/out/") if k.endswith(".png")]
    assert len(outputs) == count
    for key in outputs:
        assert decode(direct.cat_file(key)).pixels.shape == (16, 16, 1), key
    print(f"fault job: first run {first_seconds:.0f} s, runs {[s['status'] for s in summaries]}"
          f", retries {[s['retries'] for s in summaries]}, transient "
          f"{[s['transient_failures'] for s in summaries]}, outage at unit "
          f"{outage['at_units']}, proxy {counts}")


def _with_endpoint(spec: RestoreSpec, url: str) -> RestoreSpec:
    import dataclasses

    return dataclasses.replace(spec, storage=dataclasses.replace(spec.storage, endpoint_url=url))
