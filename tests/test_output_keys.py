"""Output keys are unique across the whole job, whatever the input layout: manifest rows and
shard rows listed by different tasks (chunks), and manifests whose URIs span buckets."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from restorer.job.specs import RestoreSpec, spec_from_flags
from restorer.pipeline import sources
from restorer.pipeline.graph import source_config
from restorer.pipeline.sources import (
    MANIFEST_CHUNK_ROWS,
    SHARD_CHUNK_ROWS,
    expand,
    listing_tasks,
)
from restorer.pipeline.sources.claims import OutputClaims


def _listed(uri: str, layout: str, **flags):
    """Every row (key -> (status, error class, message)) as the job lists it, and the tasks."""
    spec = spec_from_flags(RestoreSpec, input=uri, output="out", **flags)
    config = source_config(spec, layout)
    tasks = listing_tasks(uri, config)
    config = sources.plan_outputs(tasks, config)
    rows = [r for task in tasks for unit in expand(task, config) for r in unit]
    return rows, tasks


def test_a_manifest_collision_across_chunks_fails_both_rows(tmp_path):
    uris = [f"/data/img{i:04d}.png" for i in range(1100)]
    uris[10] = "/data/dup.png"
    uris[710] = "/data/dup.jpg"  # 700 rows apart: another 512-row chunk, the same output
    manifest = tmp_path / "todo.parquet"
    pq.write_table(pa.table({"uri": uris}), manifest)
    rows, tasks = _listed(str(manifest), "manifest", format="png")
    assert len(tasks) == 3 and MANIFEST_CHUNK_ROWS == 512
    failed = {r["key"]: r for r in rows if r["status"] == "failed"}
    assert set(failed) == {"data/dup.png", "data/dup.jpg"}
    for row in failed.values():
        assert row["error_class"] == "OutputCollision"
        assert "data/dup.png" in row["message"] and "data/dup.jpg" in row["message"]
    assert sum(r["status"] == "" for r in rows) == 1098


def test_a_manifest_key_column_naming_one_key_twice_fails_both(tmp_path):
    uris = [f"/data/img{i:04d}.png" for i in range(600)]
    keys = [f"k/{i:04d}.png" for i in range(600)]
    keys[599] = keys[0]
    manifest = tmp_path / "todo.parquet"
    pq.write_table(pa.table({"uri": uris, "key": keys}), manifest)
    rows, _ = _listed(str(manifest), "manifest")
    assert [(r["uri"], r["error_class"]) for r in rows if r["status"] == "failed"] == [
        ("/data/img0000.png", "OutputCollision"), ("/data/img0599.png", "OutputCollision")]


def test_manifest_uris_spanning_buckets_keep_the_bucket_in_their_keys(tmp_path):
    manifest = tmp_path / "todo.txt"
    manifest.write_text("s3://one/x.png\ns3://two/x.png\ns3://two/y.png\n")
    rows, _ = _listed(str(manifest), "manifest")
    assert sorted((r["key"], r["status"]) for r in rows) == [
        ("one/x.png", ""), ("two/x.png", ""), ("two/y.png", "")]
    single = tmp_path / "single.txt"  # one bucket: keys as before (no bucket)
    single.write_text("s3://one/x.png\ns3://one/y.png\n")
    rows, _ = _listed(str(single), "manifest")
    assert sorted(r["key"] for r in rows) == ["x.png", "y.png"]


def test_an_older_job_of_a_manifest_spanning_buckets_is_not_resumed_with_other_keys(tmp_path):
    from restorer.errors import JobError
    from restorer.pipeline.sources import refuse_older_units

    manifest = tmp_path / "todo.txt"
    manifest.write_text("s3://one/x.png\ns3://two/x.png\n")
    out = tmp_path / "out"
    (out / "_restorer").mkdir(parents=True)
    (out / "_restorer" / "job.json").write_text(json.dumps({"ledger_format_version": 3}))
    spec = spec_from_flags(RestoreSpec, input=str(manifest), output=str(out))
    config = source_config(spec, "manifest")
    tasks = listing_tasks(str(manifest), config)
    with pytest.raises(JobError, match="span buckets"):
        refuse_older_units(spec, tasks, sources.plan_outputs(tasks, config))


def _png(value: int) -> bytes:
    sink = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(sink, format="PNG")
    return sink.getvalue()


def test_a_shard_collision_across_chunks_fails_both_rows(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = [f"s/{i:03d}.png" for i in range(150)]
    keys[140] = "s/005.jpg"  # chunks of 64 rows: 5 and 140 fall in different tasks
    pq.write_table(pa.table({"key": keys, "bytes": [_png(i) for i in range(150)]}),
                   shards / "part-0.parquet")
    pq.write_table(pa.table({"key": ["s/006.png"], "bytes": [_png(1)]}),
                   shards / "part-1.parquet")  # another shard: the same output as row 6
    rows, tasks = _listed(str(shards), "parquet", format="png")
    assert len(tasks) == 4 and SHARD_CHUNK_ROWS == 64
    failed = sorted((r["key"], r["uri"]) for r in rows if r["status"] == "failed")
    assert failed == [("s/005.jpg", "part-0.parquet#140"), ("s/005.png", "part-0.parquet#5"),
                      ("s/006.png", "part-0.parquet#6"), ("s/006.png", "part-1.parquet#0")]
    assert {r["error_class"] for r in rows if r["status"] == "failed"} == {"OutputCollision"}


def test_the_collision_table_holds_no_rows_in_memory(tmp_path):
    """The tally lives in SQLite (on disk): only the colliding outputs come back."""
    claims = OutputClaims()
    try:
        claims.tally({"key": f"{i}.png", "out_key": f"{i % 50000}.png", "status": ""}
                     for i in range(50001))
        assert list(claims.shared()) == [("0.png", ("0.png", "50000.png"))]
    finally:
        claims.close()


@pytest.mark.slow
def test_a_job_over_a_manifest_flags_both_rows_of_a_collision_across_chunks(
        ray_session, tmp_path, tiny_model, monkeypatch):
    """End to end: the listing tasks (in Ray) get the driver's findings; neither colliding
    row is written, both are error records, every other image is restored."""
    monkeypatch.setattr("restorer.pipeline.sources.manifest.MANIFEST_CHUNK_ROWS", 4)  # 12 rows: 3 listing tasks
    folder = tmp_path / "in"
    folder.mkdir()
    uris = []
    for i in range(12):
        name = "same.jpg" if i == 9 else ("same.png" if i == 1 else f"{i:02d}.png")
        Image.fromarray(np.full((16, 16), i * 9, np.uint8)).save(folder / name)
        uris.append(str(folder / name))
    manifest = tmp_path / "todo.parquet"
    pq.write_table(pa.table({"uri": uris}), manifest)
    from restorer.pipeline import restore

    out = tmp_path / "out"
    summary = restore(str(manifest), str(out), model=tiny_model, format="png",
                      input_layout="manifest")
    assert summary["succeeded"] == 10 and summary["failed"] == 2
    errors = pq.read_table(out / "_restorer" / "errors.parquet").to_pylist()
    assert sorted(e["key"].rsplit("/", 1)[1] for e in errors) == ["same.jpg", "same.png"]
    assert {e["error_class"] for e in errors} == {"OutputCollision"}
    assert not list(out.rglob("same.png"))

