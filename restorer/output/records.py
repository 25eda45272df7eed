"""The rows that flow between the stages of a restore job, and the records the ledger keeps.

A row starts as a listing's plan (:data:`PLAN_FIELDS`: key, output key, work unit, status),
gains pixels when it is decoded (:data:`DECODED_FIELDS`), the model's measures when it is
restored (:data:`RESTORED_FIELDS`), and becomes a ledger record when it is written
(:data:`RECORD_FIELDS`: pixels dropped; output size and sha256 added). Batches travel between
stages as Arrow tables; pixel columns are carried in one buffer per batch
(:func:`binary_column`, :func:`to_rows`), never as Python ``bytes``.

A failure at any stage is recorded on its row (:func:`fail`) and the row flows on; its status
says whether the image is quarantined (``failed``), redone by the next run (``transient``) or
waited for (``missing``: the input vanished).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from restorer.errors import MISSING, PERMANENT, TRANSIENT, classify

PLAN_FIELDS = [
    ("key", pa.string()), ("uri", pa.string()), ("out_key", pa.string()),
    ("format", pa.string()), ("unit", pa.string()), ("unit_size", pa.int32()),
    ("status", pa.string()), ("stage", pa.string()), ("error_class", pa.string()),
    ("message", pa.string()), ("size", pa.int64()), ("data", pa.large_binary()),
]
DECODED_FIELDS = PLAN_FIELDS + [
    ("pixels", pa.large_binary()), ("height", pa.int32()), ("width", pa.int32()),
    ("channels", pa.int32()), ("bits", pa.int32()), ("alpha", pa.large_binary()),
    ("icc", pa.binary()), ("exif", pa.binary()), ("src_format", pa.string()),
    ("src_mode", pa.string()), ("note", pa.string()), ("in_bytes", pa.int64()),
    ("retries", pa.int32()),  # transient failures retried for this image in this run
    # a JPEG source's settings (restorer.io.codec.JpegSettings), for the encode stage to match;
    # 0 and "" for other sources
    ("src_quality", pa.int32()), ("src_subsampling", pa.string()),
]
RESTORED_FIELDS = DECODED_FIELDS + [
    ("out_height", pa.int32()), ("out_width", pa.int32()), ("tiles", pa.int32()),
    ("model_seconds", pa.float64()), ("change_mean", pa.float32()),
    ("change_p99", pa.float32()), ("noise_in", pa.float32()), ("noise_out", pa.float32()),
    ("residual_structure", pa.float32()),  # image.audit: 0 noise-like ... 1 image structure
]
RECORD_FIELDS = [f for f in RESTORED_FIELDS if f[0] not in (
    "pixels", "alpha", "icc", "exif", "data", "size", "src_quality", "src_subsampling")] + [
    ("out_bytes", pa.int64()), ("sha256", pa.string()), ("write_seconds", pa.float64()),
    ("encoded", pa.large_binary()),  # parquet output layout only: the image, for the shard
    ("replaced", pa.int32()),  # 1 if a resumed job found (and replaced) this output already
]
DECODED_SCHEMA = pa.schema(DECODED_FIELDS)
RESTORED_SCHEMA = pa.schema(RESTORED_FIELDS)
RECORD_SCHEMA = pa.schema(RECORD_FIELDS)
ERROR_COLUMNS = ["key", "unit", "stage", "error_class", "message"]
PIXEL_COLUMNS = ("pixels", "alpha")  # large: carried between stages without Python bytes

# A row's status after a failure, by its class (restorer.errors.classify): "failed" rows are
# quarantined (committed with their unit); "transient" and "missing" rows keep their unit open
# for the next run (see restorer.pipeline.driver._close_unit).
FAILED_STATUS = {PERMANENT: "failed", TRANSIENT: "transient", MISSING: "missing"}
RETRY_ATTEMPTS = 3  # tries per image and stage, on top of botocore's and s3fs's own retries;
# once an image of a batch still fails transiently, the rest of that batch get one try each
# (the store is down: a task should not spend minutes per image waiting for it)


def _defaults(fields: list[tuple[str, pa.DataType]]) -> dict[str, Any]:
    values = {}
    for name, kind in fields:
        if pa.types.is_string(kind):
            values[name] = ""
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            values[name] = b""
        elif pa.types.is_floating(kind):
            values[name] = 0.0
        else:
            values[name] = 0
    return values


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts; keys not in ``schema`` are ignored, missing ones get defaults) as a table,
    built column by column; pixel columns are copied once (see :func:`binary_column`)."""
    defaults = _defaults([(f.name, f.type) for f in schema])
    columns = []
    for f in schema:
        values = [r.get(f.name, defaults[f.name]) for r in rows]
        if f.name in PIXEL_COLUMNS and all(v is not None for v in values):
            columns.append(binary_column(values))
        else:
            columns.append(pa.array(values, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def binary_column(values: list[Any]) -> pa.Array:
    """A ``large_binary`` array of ``values`` (bytes, Arrow buffers or numpy arrays, taken in C
    order), written once into one buffer: no ``bytes`` objects on the way."""
    arrays = [v if isinstance(v, np.ndarray) else np.frombuffer(v, np.uint8) for v in values]
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([a.nbytes for a in arrays], out=offsets[1:])
    data = np.empty(int(offsets[-1]), np.uint8)
    for array, start, end in zip(arrays, offsets[:-1], offsets[1:]):
        if end > start:
            data[start:end].view(array.dtype).reshape(array.shape)[...] = array
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(arrays),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def to_rows(batch: pa.Table) -> list[dict[str, Any]]:
    """``batch.to_pylist()``, except that pixel columns come as read-only Arrow buffers that
    share the batch's memory instead of copies in ``bytes``."""
    pixel_columns = [name for name in PIXEL_COLUMNS if name in batch.column_names]
    rows = batch.drop_columns(pixel_columns).to_pylist()
    for name in pixel_columns:
        for row, value in zip(rows, batch.column(name)):
            row[name] = value.as_buffer() if value.is_valid else None
    return rows


def fail(row: dict[str, Any], stage: str, error: BaseException,
          kind: str | None = None) -> dict[str, Any]:
    """Record ``error`` on ``row``; ``kind`` (default: :func:`classify`) picks the status."""
    row.update(status=FAILED_STATUS[kind or classify(error)], stage=stage,
               error_class=type(error).__name__, message=str(error)[:2000])
    row["retries"] = row.get("retries", 0) + getattr(error, "retries", 0)
    return row


def pixels_of(row: dict[str, Any], name: str = "pixels", channels: int | None = None,
            height: int | None = None, width: int | None = None) -> np.ndarray:
    dtype = np.uint16 if row["bits"] == 16 else np.uint8
    shape = (height or row["height"], width or row["width"], channels or row["channels"])
    return np.frombuffer(row[name], dtype=dtype).reshape(shape)
