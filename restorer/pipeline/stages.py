"""The CPU stages of a restore job, run as Ray Data tasks: read + decode, encode + write.

Both take and return Arrow batches of :mod:`restorer.output.records` rows; one image's failure
becomes its row's error record and the others flow on. Reads and writes are retried on transient
failures (:func:`restorer.errors.retrying`). Many Ray worker processes run these tasks, so
nothing here imports torch (~1.7 s of CPU per process).
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from restorer.errors import (
    PERMANENT,
    TRANSIENT,
    ImageError,
    RestorerError,
    classify,
    retrying,
)
from restorer.io import codec, storage
from restorer.output.records import (
    DECODED_SCHEMA,
    RECORD_SCHEMA,
    RETRY_ATTEMPTS,
    fail,
    pixels_of,
    to_rows,
    to_table,
)


def read_and_decode(batch: pa.Table, storage_options: storage.StorageOptions, max_pixels: int,
                    max_input_bytes: int) -> pa.Table:
    """Ray Data task: read and decode each row; failures become error records on the row.

    Reads are retried on transient failures (:func:`restorer.errors.retrying`); a read that
    still fails leaves a ``transient`` (or ``missing``) row, which is not quarantined.
    """
    rows = []
    attempts = RETRY_ATTEMPTS
    for row in batch.to_pylist():
        if row["status"] == "":
            try:
                if row["size"] > max_input_bytes:
                    raise ImageError(f"{row['key']} is {row['size']} bytes, above "
                                     f"limits.max_input_mb; raise it if the file is genuine")
                data = row.pop("data")
                if not data:
                    data, row["retries"] = retrying(
                        lambda uri=row["uri"]: storage.read_bytes(uri, storage_options),
                        attempts, what=f"read {row['key']}")
                row["in_bytes"] = len(data)
            except Exception as e:  # noqa: BLE001 - classified: quarantine, retry or wait
                rows.append(fail(row, "read", e))
                if row["status"] == "transient":
                    attempts = 1
                continue
            try:
                image = codec.decode(data, max_pixels=max_pixels, name=row["key"])
                row.update(pixels=image.pixels.tobytes(), height=image.pixels.shape[0],
                           width=image.pixels.shape[1], channels=image.pixels.shape[2],
                           bits=image.pixels.dtype.itemsize * 8,
                           alpha=b"" if image.alpha is None else image.alpha.tobytes(),
                           icc=image.icc or b"", exif=image.exif or b"",
                           src_format=image.format, src_mode=image.mode, note=image.note,
                           src_quality=image.jpeg.quality if image.jpeg else 0,
                           src_subsampling=image.jpeg.subsampling if image.jpeg else "",
                           status="decoded")
            except Exception as e:  # noqa: BLE001 - bad bytes quarantine; memory: transient
                fail(row, "decode", e, _kind(e))
        rows.append(row)
    return to_table(rows, DECODED_SCHEMA)


PUBLISH_THREADS = 8  # outputs of a batch published at once (their fsyncs overlap)


def encode_and_write(batch: pa.Table, output_uri: str, options: codec.EncodeOptions,
                     storage_options: storage.StorageOptions, layout: str = "files",
                     resumed: bool = False) -> pa.Table:
    """Ray Data task: encode each restored row and publish it atomically under the output.

    With the ``parquet`` output layout the encoded image goes back in the record instead, and
    the driver writes it into the unit's shard when the unit commits. In a ``resumed`` job an
    output that already exists (written before a crash, its unit never committed) is replaced
    and counted, so the summary reports the work that was redone.

    The batch's images are encoded one by one, then published together by up to
    :data:`PUBLISH_THREADS` threads: a local publish waits on the disk (the file is synced
    before its rename), and waits that overlap cost a batch about one; on S3 the PUTs overlap.
    Each publish is retried on transient failures on its own; as they run at once, a store
    that is down costs the batch about one image's retries.
    """
    rows = to_rows(batch)
    encoded: dict[int, tuple[bytes, float]] = {}  # row index -> (bytes, seconds to encode)
    for index, row in enumerate(rows):
        if row["status"] == "restored":
            started = time.perf_counter()
            try:
                pixels = pixels_of(row, height=row["out_height"], width=row["out_width"])
                alpha = None
                if row["alpha"]:
                    alpha = pixels_of(row, "alpha", channels=1)[..., 0]
                    if alpha.shape != pixels.shape[:2]:
                        alpha = _resize_plane(alpha, pixels.shape[1], pixels.shape[0])
                source_jpeg = None
                if row["src_quality"]:  # a JPEG source: by default its settings are matched
                    source_jpeg = codec.JpegSettings(row["src_quality"], row["src_subsampling"])
                data = codec.encode(pixels, alpha, row["format"], row["icc"] or None,
                                    row["exif"] or None, options, source_jpeg)
                encoded[index] = (data, time.perf_counter() - started)
            except Exception as e:  # noqa: BLE001 - one image's failure is its record
                fail(row, "write", e, _kind(e))
        elif row["status"] not in ("failed", "skipped", "transient", "missing"):
            fail(row, "restore", RestorerError(f"row arrived with status {row['status']!r}"))

    def publish(row: dict[str, Any], data: bytes) -> tuple[int, int, float]:
        """(replaced, retries, seconds) of one output's publish."""
        target = storage.join(output_uri, row["out_key"])

        def put() -> int:
            replaced = int(resumed and storage.exists(target, storage_options))
            storage.write_bytes(target, data, storage_options)
            return replaced

        started = time.perf_counter()
        replaced, retries = retrying(put, RETRY_ATTEMPTS, what=f"write {row['out_key']}")
        return replaced, retries, time.perf_counter() - started

    if layout == "parquet" or not encoded:
        outcomes = {index: None for index in encoded}
    else:
        with ThreadPoolExecutor(min(PUBLISH_THREADS, len(encoded))) as pool:
            outcomes = {index: pool.submit(publish, rows[index], data)
                        for index, (data, _) in encoded.items()}
    for index, (data, seconds) in encoded.items():
        row = rows[index]
        try:
            if outcomes[index] is None:
                row["encoded"] = data
            else:
                row["replaced"], retries, published = outcomes[index].result()
                row["retries"] += retries
                seconds += published
            row.update(status="ok", out_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                       write_seconds=seconds)  # this image's encode and publish
        except Exception as e:  # noqa: BLE001 - classified: quarantine, retry or wait
            fail(row, "write", e)
    return to_table(rows, RECORD_SCHEMA)


def _kind(error: BaseException) -> str:
    """How a decoder's or an encoder's failure counts: the one classifier's answer
    (:func:`restorer.errors.classify`: memory, device and disk faults are transient), except
    that nothing a codec raises means the input is *missing*: that is permanent."""
    return TRANSIENT if classify(error) == TRANSIENT else PERMANENT


def _resize_plane(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(plane).resize((width, height), Image.BICUBIC))
