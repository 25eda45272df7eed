"""Committing work units and reading the ledger back, without Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import record

from restorer.errors import StorageError
from restorer.io import storage
from restorer.job.specs import RestoreSpec, spec_from_flags
from restorer.output.ledger import READ_AHEAD, commit_unit, table_batches


def test_a_ledger_entry_is_created_once_unless_the_unit_is_redone_for_errors(tmp_path):
    spec = spec_from_flags(RestoreSpec, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    ledger = tmp_path / "out" / "_restorer" / "ledger" / "unit-u1.parquet"
    commit_unit(spec, "u1", [record("a.png", "u1", write_seconds=0.5)], had_errors=False)
    # another run committing the same unit (two jobs in one output) is refused, and the
    # first run's entry stays
    with pytest.raises(StorageError, match="unit-u1.parquet already exists"):
        commit_unit(spec, "u1", [record("a.png", "u1", write_seconds=1.5)], had_errors=False)
    assert pq.read_table(ledger).column("write_seconds").to_pylist() == [0.5]
    # --retry-failed redoes a unit that had errors, and replaces its entry
    commit_unit(spec, "u1", [record("a.png", "u1", write_seconds=1.5)], had_errors=True)
    assert pq.read_table(ledger).column("write_seconds").to_pylist() == [1.5]


def test_ledger_folders_are_read_file_by_file(tmp_path, monkeypatch):
    folder = tmp_path / "ledger"
    folder.mkdir()
    for index in range(40):
        pq.write_table(pa.table({"key": [f"{index:02d}a", f"{index:02d}b"],
                                 "status": ["ok", "failed"]}), folder / f"unit-{index:02d}.parquet")
    pq.write_table(pa.table({"key": ["old"]}), folder / "unit-zz.parquet")  # no status column
    (folder / ".unit-41.parquet.tmp-0f").write_bytes(b"half a file from a running job")
    reads: list[str] = []
    read_bytes = storage.read_bytes

    def counting_read(uri, options):
        reads.append(uri)
        return read_bytes(uri, options)

    monkeypatch.setattr(storage, "read_bytes", counting_read)
    batches = table_batches(str(folder), ["key", "status"])
    rows = next(batches).to_pylist()
    # streamed: the first batch comes after at most READ_AHEAD + 1 files were asked for
    assert rows == [{"key": "00a", "status": "ok"}, {"key": "00b", "status": "failed"}]
    assert len(reads) <= READ_AHEAD + 1
    rows += [row for batch in batches for row in batch.to_pylist()]
    assert len(rows) == 81 and rows[-1] == {"key": "old"}
    assert [row["key"] for row in rows[:-1]] == sorted(row["key"] for row in rows[:-1])
    assert len(reads) == 41
