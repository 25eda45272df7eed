"""One classifier for every stage: memory, device and disk faults are transient (the unit stays
open, exit 5) wherever they happen; one that repeats for an image in ``limits.transient_runs``
runs is quarantined with its history. Without Ray."""

from __future__ import annotations

import errno
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import record

from restorer.errors import PERMANENT, TRANSIENT, ImageError, classify
from restorer.io import codec
from restorer.job.specs import RestoreSpec, spec_from_flags
from restorer.output.records import PLAN_FIELDS, RESTORED_SCHEMA, to_table
from restorer.pipeline import stages

TRANSIENT_FAULTS = {
    "MemoryError": MemoryError(),
    "cpu allocator": RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. "
                                  "DefaultCPUAllocator: not enough memory: you tried to "
                                  "allocate 68719476736 bytes."),
    "cudnn": RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    "cuda oom": RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "ENOSPC": OSError(errno.ENOSPC, "No space left on device"),
    "EDQUOT": OSError(errno.EDQUOT, "Disk quota exceeded"),
    "EIO": OSError(errno.EIO, "Input/output error"),
    "ESTALE": OSError(errno.ESTALE, "Stale file handle"),
    "wrapped": ImageError("x.png: could not decode"),
}
TRANSIENT_FAULTS["wrapped"].__cause__ = MemoryError()


@pytest.mark.parametrize("name", sorted(TRANSIENT_FAULTS))
def test_memory_device_and_disk_faults_are_transient(name):
    assert classify(TRANSIENT_FAULTS[name]) == TRANSIENT


def test_bad_bytes_stay_permanent():
    assert classify(ImageError("x.png is corrupt or truncated")) == PERMANENT
    assert classify(OSError("broken data stream when reading image file")) == PERMANENT
    assert classify(RuntimeError("Given groups=1, weight of size [8, 1, 3, 3]")) == PERMANENT


def _planned(key: str, data: bytes) -> pa.Table:
    row = {name: ("" if pa.types.is_string(kind) else b"" if pa.types.is_binary(kind)
                  or pa.types.is_large_binary(kind) else 0) for name, kind in PLAN_FIELDS}
    row.update(key=key, out_key=key, format="png", unit="u", unit_size=1, data=data,
               size=len(data))
    return pa.Table.from_pylist([row], schema=pa.schema(PLAN_FIELDS))


@pytest.mark.parametrize("fault", [MemoryError(), OSError(errno.EIO, "Input/output error")])
def test_a_decoder_running_out_of_memory_leaves_the_image_transient(monkeypatch, fault):
    def decode(*args, **kwargs):
        raise fault

    monkeypatch.setattr(codec, "decode", decode)
    out = stages.read_and_decode(_planned("a.png", b"\x89PNG...."), None, 10**8, 10**9)
    row = out.to_pylist()[0]
    assert (row["status"], row["stage"]) == ("transient", "decode")


def test_a_decoder_failing_on_bad_bytes_still_quarantines():
    out = stages.read_and_decode(_planned("a.png", b"not an image"), None, 10**8, 10**9)
    assert out.to_pylist()[0]["status"] == "failed"


def test_an_encoder_on_a_full_disk_leaves_the_image_transient(monkeypatch, tmp_path):
    def encode(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(codec, "encode", encode)
    row = {f.name: ("" if pa.types.is_string(f.type) else b"" if pa.types.is_binary(f.type)
                    or pa.types.is_large_binary(f.type) else 0) for f in RESTORED_SCHEMA}
    row.update(key="a.png", out_key="a.png", format="png", unit="u", unit_size=1,
               status="restored", pixels=np.zeros((4, 4, 1), np.uint8).tobytes(), height=4,
               width=4, channels=1, bits=8, out_height=4, out_width=4)
    out = stages.encode_and_write(to_table([row], RESTORED_SCHEMA), str(tmp_path),
                                  codec.EncodeOptions("png"), None)
    assert (out.to_pylist()[0]["status"], out.to_pylist()[0]["stage"]) == ("transient", "write")


def test_a_fault_repeating_in_n_runs_quarantines_the_image_with_its_history(tmp_path):
    from restorer.output.digest import Digest
    from restorer.pipeline.driver import _close_unit
    from restorer.report.summary import JobState

    spec = spec_from_flags(RestoreSpec, input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                           transient_runs=3)
    history = tmp_path / "out" / "_restorer" / "transient" / "unit-u1.json"
    ledger = tmp_path / "out" / "_restorer" / "ledger" / "unit-u1.parquet"

    def run(number: int) -> tuple[bool, JobState, list[dict]]:
        from restorer.output.ledger import transient_units

        state = JobState(spec, "m", "sha", {}, digest=Digest(run=f"run{number}"))
        state.transient_units = transient_units(spec)
        records = [record("ok.png", "u1", unit_size=2),
                   record("bad.png", "u1", unit_size=2, status="transient", stage="restore",
                          error_class="OutOfMemoryError", message=f"CUDA out of memory {number}")]
        state.transient = 1
        return _close_unit(spec, state, "u1", records, False), state, records

    for number in (1, 2):  # two runs: the unit stays open, the faults are remembered
        committed, state, _ = run(number)
        assert not committed and state.incomplete_units == 1 and not ledger.exists()
        faults = json.loads(history.read_text())["keys"]["bad.png"]
        assert [f["run"] for f in faults] == [f"run{i}" for i in range(1, number + 1)]
    committed, state, records = run(3)  # the third: quarantined, the unit commits
    assert committed and ledger.exists() and not history.exists()
    assert (state.failed, state.transient) == (1, 0)
    bad = next(r for r in records if r["key"] == "bad.png")
    assert bad["status"] == "failed" and "failed transiently in 3 runs" in bad["message"]
    for number in (1, 2, 3):
        assert f"run run{number}: restore OutOfMemoryError: CUDA out of memory {number}" in \
            bad["message"]
    errors = pq.read_table(tmp_path / "out" / "_restorer" / "errors.parquet").to_pylist()
    assert [(e["key"], e["error_class"]) for e in errors] == [("bad.png", "OutOfMemoryError")]


def test_an_image_that_recovers_leaves_no_history(tmp_path):
    from restorer.output.digest import Digest
    from restorer.output.ledger import transient_units
    from restorer.pipeline.driver import _close_unit
    from restorer.report.summary import JobState

    spec = spec_from_flags(RestoreSpec, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    state = JobState(spec, "m", "sha", {}, digest=Digest(run="r1"))
    assert not _close_unit(spec, state, "u1", [record("a.png", "u1", status="transient",
                                                      stage="read", message="timeout")], False)
    state = JobState(spec, "m", "sha", {}, digest=Digest(run="r2"))
    state.transient_units = transient_units(spec)
    assert state.transient_units == {"u1"}
    assert _close_unit(spec, state, "u1", [record("a.png", "u1")], False)
    assert not (tmp_path / "out" / "_restorer" / "transient" / "unit-u1.json").exists()
