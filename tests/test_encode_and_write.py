"""encode_and_write (no Ray): a batch's outputs are published together, each with its own
retries, and every row keeps its own record."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from restorer.errors import TransientError
from restorer.io import codec, storage
from restorer.output.records import RESTORED_SCHEMA, to_table
from restorer.pipeline.stages import encode_and_write


def restored_batch(count: int):
    rows = [{"key": f"img{i}.png", "out_key": f"img{i}.png", "format": "png", "unit": "u",
             "unit_size": count, "status": "restored", "height": 6, "width": 9, "channels": 3,
             "bits": 8, "out_height": 6, "out_width": 9,
             "pixels": np.full((6, 9, 3), 20 * i, np.uint8)} for i in range(count)]
    return to_table(rows, RESTORED_SCHEMA)


def test_a_batch_publishes_its_outputs_at_once(tmp_path, monkeypatch):
    # Four publishes must be under way together to pass the barrier: one after the other,
    # the first waits alone and breaks it (and with it every later publish).
    barrier = threading.Barrier(4, timeout=20)
    write = storage.write_bytes

    def write_when_four_wait(uri, data, options=storage.StorageOptions(), create=False):
        barrier.wait()
        write(uri, data, options, create)

    monkeypatch.setattr(storage, "write_bytes", write_when_four_wait)
    records = encode_and_write(restored_batch(8), str(tmp_path), codec.EncodeOptions("png"),
                               storage.StorageOptions()).to_pylist()
    assert [r["status"] for r in records] == ["ok"] * 8, records[0]["message"]
    for i, record in enumerate(records):
        image = codec.decode((tmp_path / f"img{i}.png").read_bytes()).pixels
        assert (image == 20 * i).all() and record["out_bytes"] > 0 and record["write_seconds"] > 0


def test_each_publish_retries_on_its_own(tmp_path, monkeypatch):
    write = storage.write_bytes
    failed = set()

    def flaky(uri, data, options=storage.StorageOptions(), create=False):
        if uri.endswith("img2.png") and uri not in failed:
            failed.add(uri)
            raise TransientError("the store dropped the connection")
        if uri.endswith("img5.png"):
            raise PermissionError("no")
        write(uri, data, options, create)

    monkeypatch.setattr(storage, "write_bytes", flaky)
    monkeypatch.setattr("restorer.errors.backoff_delays", lambda n, *a, **k: [0.0] * n)
    records = encode_and_write(restored_batch(6), str(tmp_path), codec.EncodeOptions("png"),
                               storage.StorageOptions()).to_pylist()
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "ok", "ok", "failed"]
    assert [r["retries"] for r in records] == [0, 0, 1, 0, 0, 0]
    assert records[5]["stage"] == "write" and records[5]["error_class"] == "PermissionError"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"img{i}.png" for i in range(5)]


@pytest.mark.parametrize("layout", ["parquet"])
def test_parquet_layout_keeps_the_bytes_in_the_record(tmp_path, layout):
    records = encode_and_write(restored_batch(3), str(tmp_path), codec.EncodeOptions("png"),
                               storage.StorageOptions(), layout=layout).to_pylist()
    assert all(r["status"] == "ok" and r["encoded"] for r in records)
    assert list(tmp_path.iterdir()) == []
