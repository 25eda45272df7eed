"""Packing image files into Parquet shards and unpacking shards back into files.

A shard is a Parquet file with a ``key`` column (relative path) and a ``bytes`` column (the
encoded image, untouched); restore jobs with ``--layout parquet`` also add ``status`` and
``error``. Packing streams: one folder is listed at a time and at most one shard is held in
memory. Unpacking refuses keys that would escape the output root.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from restorer.errors import SpecError, StorageError
from restorer.io import storage

log = logging.getLogger(__name__)


@dataclass
class ShardReport:
    shards: int = 0
    files: int = 0
    bytes: int = 0
    skipped: int = 0  # unpack: rows whose status is not ok, or unsafe keys


def _write_shard(uri: str, keys: list[str], blobs: list[bytes],
                 options: storage.StorageOptions) -> None:
    table = pa.table({"key": keys, "bytes": pa.array(blobs, pa.large_binary())})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none", row_group_size=256)
    storage.write_bytes(uri, sink.getvalue(), options)


def pack(source: str, target: str, rows_per_shard: int = 1000,
         options: storage.StorageOptions = storage.StorageOptions()) -> ShardReport:
    """Pack the images under ``source`` into ``target/shard-00000.parquet``, ...

    Shard names are numbered in listing order, so packing the same input again gives the same
    shards.
    """
    if rows_per_shard < 1:
        raise SpecError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    report = ShardReport()
    keys: list[str] = []
    blobs: list[bytes] = []

    def flush() -> None:
        uri = storage.join(target, f"shard-{report.shards:05d}.parquet")
        _write_shard(uri, keys, blobs, options)
        log.info("wrote %s (%d images)", uri, len(keys))
        report.shards += 1
        keys.clear()
        blobs.clear()

    for entries in storage.walk_files(source, options=options):
        for entry in entries:
            data = storage.read_bytes(entry.uri, options)
            keys.append(entry.key)
            blobs.append(data)
            report.files += 1
            report.bytes += len(data)
            if len(keys) >= rows_per_shard:
                flush()
    if keys:
        flush()
    return report


def unpack(source: str, target: str,
           options: storage.StorageOptions = storage.StorageOptions()) -> ShardReport:
    """Write every ``ok`` row of the shards under ``source`` to ``target/KEY``."""
    report = ShardReport()
    names = sorted(n for n in storage.list_names(source, options) if n.endswith(".parquet"))
    if not names:
        raise StorageError(f"No .parquet shards under {source}")
    for name in names:
        fs, path = storage.filesystem(storage.join(source, name), options)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            has_status = "status" in parquet.schema_arrow.names
            columns = ["key", "bytes"] + (["status"] if has_status else [])
            for batch in parquet.iter_batches(batch_size=64, columns=columns):
                for row in batch.to_pylist():
                    if has_status and row["status"] != "ok":
                        report.skipped += 1
                        continue
                    try:
                        uri = storage.join(target, row["key"])
                    except StorageError as e:
                        log.warning("%s: %s", name, e)
                        report.skipped += 1
                        continue
                    storage.write_bytes(uri, row["bytes"], options)
                    report.files += 1
                    report.bytes += len(row["bytes"])
        report.shards += 1
    return report
