"""Restore jobs on Ray Data: list -> read+decode -> restore -> encode+write -> commit.

The graph, top to bottom (:func:`run_restore`):

1. **List** (listing tasks, streaming; see :mod:`restorer.sources`): input keys become rows,
   grouped into *work units* of up to 64 keys of one folder (or one hash partition of a flat
   folder). Unit boundaries depend on the keys alone, so a rerun over the same input makes the
   same units. Two inputs that would write one output key become error records here, and
   neither is written.
2. **Read + decode** (CPU tasks, :func:`read_and_decode`): bytes -> pixels; any failure becomes
   an error record on that row and the row flows on.
3. **Restore** (a pool of :class:`RestoreActor`, one model per actor on its GPU or CPU): tiles
   of one shape are batched across the images of a batch.
4. **Encode + write** (CPU tasks, :func:`encode_and_write`): each output is published atomically
   at ``OUTPUT/<key with the output extension>``.
5. **Commit** (driver): when every row of a unit has come back, the unit's records are written
   as one Parquet file ``_restorer/ledger/unit-<id>.parquet`` (and its failures to
   ``_restorer/errors.parquet/unit-<id>.parquet``). A rerun skips committed units, so each
   output is produced exactly once per job; work lost to a crash is bounded by the units that
   were in flight.

``OUTPUT/_restorer/job.json`` holds the spec and the job fingerprint; ``summary.json`` is
written at the end of every run, from the runs' digests (``_restorer/digests/``,
:mod:`restorer.digest`), not from a re-read of the ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from restorer import codec, storage
from restorer.digest import FLUSH_SECONDS, Digest, flag, job_digest, unit_records
from restorer.digest import write as write_digest
from restorer.errors import (
    MISSING,
    PERMANENT,
    TRANSIENT,
    ImageError,
    JobError,
    JobStopped,
    ModelError,
    OutputConflictError,
    RestorerError,
    StorageError,
    backoff_delays,
    classify,
    is_device_fatal,
    retrying,
)
from restorer.jobs import RestoreSpec, digest, replace_field, spec_from_flags, spec_to_dict
from restorer.lease import Lease
from restorer.progress import Progress
from restorer.sources import (
    ListingTask,
    SourceConfig,
    count_inputs,
    detect_layout,
    expand,
    known_total,
    listing_tasks,
    units_changed,
)

if TYPE_CHECKING:
    import torch

# torch (and the modules that need it: models, tiling) is imported where the restore actor and
# the driver use it, not here: the read/decode and encode/write tasks import this module in
# every Ray worker that runs them, and importing torch costs each such process ~1.7 s of CPU.
log = logging.getLogger(__name__)

META_DIR = "_restorer"
LEDGER_FORMAT_VERSION = 3  # 2: a flat folder of more than FLAT_PARTITION_KEYS files is cut
# into units per hash partition (version 1 cut its sorted whole listing), and runs keep digests;
# 3: a flat S3 prefix is cut in key order, as it streams (sources.units_changed)
FINGERPRINT_VERSION = 2  # 2: tile, overlap and precision resolved (as the actors run them)
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
]
RESTORED_FIELDS = DECODED_FIELDS + [
    ("out_height", pa.int32()), ("out_width", pa.int32()), ("tiles", pa.int32()),
    ("model_seconds", pa.float64()), ("change_mean", pa.float32()),
    ("change_p99", pa.float32()), ("noise_in", pa.float32()), ("noise_out", pa.float32()),
    ("residual_structure", pa.float32()),  # restorer.audit: 0 noise-like ... 1 image structure
]
RECORD_FIELDS = [f for f in RESTORED_FIELDS if f[0] not in ("pixels", "alpha", "icc", "exif",
                                                            "data", "size")] + [
    ("out_bytes", pa.int64()), ("sha256", pa.string()), ("write_seconds", pa.float64()),
    ("encoded", pa.large_binary()),  # parquet output layout only: the image, for the shard
    ("replaced", pa.int32()),  # 1 if a resumed job found (and replaced) this output already
]
DECODED_SCHEMA = pa.schema(DECODED_FIELDS)
RESTORED_SCHEMA = pa.schema(RESTORED_FIELDS)
RECORD_SCHEMA = pa.schema(RECORD_FIELDS)
ERROR_COLUMNS = ["key", "unit", "stage", "error_class", "message"]


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


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts; keys not in ``schema`` are ignored, missing ones get defaults) as a table,
    built column by column; pixel columns are copied once (see :func:`_binary_column`)."""
    defaults = _defaults([(f.name, f.type) for f in schema])
    columns = []
    for f in schema:
        values = [r.get(f.name, defaults[f.name]) for r in rows]
        if f.name in _PIXEL_COLUMNS and all(v is not None for v in values):
            columns.append(_binary_column(values))
        else:
            columns.append(pa.array(values, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


_PIXEL_COLUMNS = ("pixels", "alpha")  # large: carried between stages without Python bytes


def _binary_column(values: list[Any]) -> pa.Array:
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


def _rows(batch: pa.Table) -> list[dict[str, Any]]:
    """``batch.to_pylist()``, except that pixel columns come as read-only Arrow buffers that
    share the batch's memory instead of copies in ``bytes``."""
    pixel_columns = [name for name in _PIXEL_COLUMNS if name in batch.column_names]
    rows = batch.drop_columns(pixel_columns).to_pylist()
    for name in pixel_columns:
        for row, value in zip(rows, batch.column(name)):
            row[name] = value.as_buffer() if value.is_valid else None
    return rows


# A row's status after a failure, by its class (restorer.errors.classify): "failed" rows are
# quarantined (committed with their unit); "transient" and "missing" rows keep their unit open
# for the next run (see _close_unit).
FAILED_STATUS = {PERMANENT: "failed", TRANSIENT: "transient", MISSING: "missing"}
RETRY_ATTEMPTS = 3  # tries per image and stage, on top of botocore's and s3fs's own retries;
# once an image of a batch still fails transiently, the rest of that batch get one try each
# (the store is down: a task should not spend minutes per image waiting for it)


def _fail(row: dict[str, Any], stage: str, error: BaseException,
          kind: str | None = None) -> dict[str, Any]:
    """Record ``error`` on ``row``; ``kind`` (default: :func:`classify`) picks the status."""
    row.update(status=FAILED_STATUS[kind or classify(error)], stage=stage,
               error_class=type(error).__name__, message=str(error)[:2000])
    row["retries"] = row.get("retries", 0) + getattr(error, "retries", 0)
    return row


# --- 1. listing: see restorer.sources ------------------------------------------------------

# --- 2. read + decode (CPU tasks) ------------------------------------------------------------

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
                rows.append(_fail(row, "read", e))
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
                           status="decoded")
            except Exception as e:  # noqa: BLE001 - any decoder failure quarantines one image
                _fail(row, "decode", e, PERMANENT)
        rows.append(row)
    return _table(rows, DECODED_SCHEMA)


def _pixels(row: dict[str, Any], name: str = "pixels", channels: int | None = None,
            height: int | None = None, width: int | None = None) -> np.ndarray:
    dtype = np.uint16 if row["bits"] == 16 else np.uint8
    shape = (height or row["height"], width or row["width"], channels or row["channels"])
    return np.frombuffer(row[name], dtype=dtype).reshape(shape)


# --- 3. restore (actor pool) -----------------------------------------------------------------

def noise_sigma(plane: torch.Tensor) -> torch.Tensor:
    """Std of white Gaussian noise in ``plane`` (HW), by Donoho's robust estimator: the median
    absolute finest-scale diagonal Haar coefficient over 0.6745 (``skimage``'s
    ``estimate_sigma`` does the same with a db2 wavelet, on the CPU). Image edges inflate it a
    little; a plane under 8 pixels on a side gives 0."""
    height, width = (plane.shape[0] // 2) * 2, (plane.shape[1] // 2) * 2
    if min(height, width) < 8:
        return plane.new_zeros(())
    x = plane[:height, :width].float()
    diagonal = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2
    return diagonal.abs().median() / 0.6745


def _p99(values: torch.Tensor) -> torch.Tensor:
    """The 99th percentile of a 1-D tensor, nearest rank: one selection (``kthvalue``), not
    ``torch.quantile``'s full sort (a third of the actor's time per image with a small net)."""
    return values.kthvalue(max(1, math.ceil(0.99 * values.numel()))).values


def tile_settings(net: torch.nn.Module, tile: int, overlap: int) -> tuple[int, int]:
    """(tile, overlap) that the actor uses for ``net`` given the configured ones.

    Overlap 0 means the net's receptive field, rounded up to 8; a given overlap is raised to
    cover the receptive field. The tile is raised to 4x the overlap, rounded up to the net's
    alignment (:func:`restorer.tiling.effective_tile`); 0 (whole images) stays 0.
    """
    from restorer.tiling import effective_tile

    receptive_field = net.receptive_field
    halo = receptive_field // 2
    overlap = max(overlap, 2 * halo + 1) if overlap else 8 * math.ceil((receptive_field + 1) / 8)
    return effective_tile(tile, overlap, getattr(net, "alignment", 1)), overlap


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """The precision actors really run: ``auto`` is bf16 on GPUs; on CPUs always fp32."""
    if not on_gpu:
        return "fp32"
    return "bf16" if precision == "auto" else precision


class RestoreActor:
    """Holds one model on one device and restores batches of images.

    Use it in the project's pipeline or in your own Ray Data pipeline::

        ds = ray.data.read_images("s3://bucket/in/")  # an "image" column of HWC uint8 arrays
        ds = ds.map_batches(RestoreActor, fn_constructor_kwargs={"model": "denoise-gray"},
                            compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1,
                            batch_size=16)

    Given a batch with an ``image`` column (numpy format), it returns the batch with restored
    images in that column. Gray nets restore each plane of an RGB image on its own; color nets
    restore a gray image as three equal planes and return their mean. Precision: fp32 on CPU;
    bf16 autocast and channels_last on CUDA unless ``precision="fp32"``. A super-resolution
    net (``scale`` > 1) returns images ``scale`` times larger.

    Tiles overlap by the net's receptive field (``overlap=0``) and start on multiples of its
    ``alignment`` (see :mod:`restorer.tiling`). A ``tile`` below 4x the overlap is raised to
    that, rounded up to the alignment, and logged: with a large receptive field (a default
    4-level U-Net needs 112 px of overlap) 256 px tiles would compute each pixel about three
    times. :attr:`tile` is the tile used; job fingerprints keep the configured one.
    """

    def __init__(self, model: str | None = None, tile: int = 256, overlap: int = 0,
                 precision: str = "auto", channels_last: bool = True, strength: float = 1.0,
                 tile_batch: int = 0, threads: int = 0, device: str = "auto",
                 storage_options: storage.StorageOptions = storage.StorageOptions(),
                 compile: bool = False, model_sha256: str = ""):
        import torch

        from restorer.models import get_model

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        loaded = get_model(model, storage_options)
        if model_sha256 and loaded.sha256 != model_sha256:
            raise ModelError(f"Model {model} on this worker has sha256 {loaded.sha256[:12]}, "
                             f"not the job's {model_sha256[:12]}: the file changed after the "
                             "job started, or the nodes see different files; give every node "
                             "the same model (an s3:// URI or a bundled name)")
        self.model_sha256 = loaded.sha256
        self.net = loaded.net.to(self.device).eval()
        self.channels = self.net.channels
        self.scale = getattr(self.net, "scale", 1)
        self.halo = self.net.receptive_field // 2
        self.alignment = getattr(self.net, "alignment", 1)
        self.tile, self.overlap = tile_settings(self.net, tile, overlap)
        if self.tile != tile:
            log.info("RestoreActor: tile %d raised to %d (4x the overlap of %d px, a multiple of "
                     "the net's alignment %d) so that tiles do not mostly recompute their "
                     "neighbours", tile, self.tile, self.overlap, self.alignment)
        self._tile_batches: dict[tuple[int, int], int] = {}
        self.tile_batch = tile_batch or self._auto_tile_batch
        self.strength = strength
        self.channels_last = channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net = torch.compile(self.net, dynamic=False)  # one graph per tile shape
        if self.device.type != "cuda" or precision == "fp32":
            self.autocast_dtype = None
        elif precision == "fp16":
            self.autocast_dtype = torch.float16
        else:
            self.autocast_dtype = torch.bfloat16
        log.info("RestoreActor: %s on %s (tile %d, overlap %d, threads %d)", loaded.source,
                 self.device, self.tile, self.overlap, torch.get_num_threads())

    def _auto_tile_batch(self, height: int, width: int) -> int:
        """Tiles per forward pass when ``tile_batch`` is 0, from the tile's pixels.

        CPU: about 64k pixels per pass (measured: batches of 8 256x256 tiles run ~35% slower
        per image than 1 on a 2-core machine, as activations leave the cache). CUDA: half
        the free memory (read once per tile shape) over an activation estimate of 3 live
        feature maps per pixel, rounded down to a power of two and capped at 256. Fixed per
        shape, so batches keep their shapes (no cuDNN re-tuning, the same arithmetic for the
        same image).
        """
        import torch

        if (height, width) in self._tile_batches:
            return self._tile_batches[height, width]
        pixels = height * width
        if self.device.type != "cuda":
            size = max(1, 65536 // pixels)
        else:
            free, _ = torch.cuda.mem_get_info(self.device)
            width_features = max((m.out_channels for m in self.net.modules()
                                  if isinstance(m, torch.nn.Conv2d)), default=64)
            bytes_per_pixel = 3 * width_features * (2 if self.autocast_dtype else 4)
            fits = free // 2 // (bytes_per_pixel * pixels * self.scale ** 2)
            size = 2 ** int(math.log2(max(1, min(256, fits))))
        self._tile_batches[height, width] = size
        return size

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            if self.autocast_dtype is None:
                return self.net(batch)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self.net(batch)

    def _to_tensor(self, array: np.ndarray) -> torch.Tensor:
        import torch

        peak = 65535.0 if array.dtype == np.uint16 else 255.0
        # frombuffer arrays are read-only; torch wants writable memory, so copy (cheap vs the net)
        tensor = torch.from_numpy(array.astype(np.float32 if array.dtype == np.uint16
                                               else np.uint8, copy=True))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.permute(2, 0, 1).float().div_(peak)

    def restore_arrays(self, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[dict]]:
        """Restore HWC uint8/uint16 arrays; returns same-dtype arrays and per-image stats."""
        import torch

        with torch.inference_mode():
            return self._restore_arrays(arrays)

    def _restore_arrays(self, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[dict]]:
        import torch

        from restorer.tiling import run_tiled

        tensors = [self._to_tensor(a) for a in arrays]
        planes: list[torch.Tensor] = []
        owners: list[tuple[int, int]] = []  # (image index, how many net inputs it became)
        for index, tensor in enumerate(tensors):
            if self.channels == 1:
                parts = [plane[None] for plane in tensor]
            elif tensor.shape[0] == 1:
                parts = [tensor.expand(self.channels, -1, -1)]
            else:
                parts = [tensor]
            planes.extend(parts)
            owners.append((index, len(parts)))
        restored = run_tiled(planes, self._forward, self.tile, self.overlap, self.halo,
                             self.scale, self.tile_batch, self.alignment)
        results, changes, cursor = [], [], 0
        for (index, count), source in zip(owners, tensors):
            parts = restored[cursor:cursor + count]
            cursor += count
            out = torch.cat(parts, 0) if self.channels == 1 else parts[0]
            if out.shape[0] != source.shape[0]:
                out = out.mean(0, keepdim=True)
            if self.strength < 1.0:
                base = source if self.scale == 1 else torch.nn.functional.interpolate(
                    source[None], scale_factor=self.scale, mode="bicubic")[0]
                out = base + self.strength * (out - base)
            out = out.clamp_(0, 1)
            changes.append(self._change(source, out))
            # Round and narrow on the device: 1/4 (8-bit) of the float bytes cross to the host.
            if arrays[index].dtype == np.uint16:
                pixels = (out * 65535.0).round_().to(torch.int32)
            else:
                pixels = (out * 255.0).round_().to(torch.uint8)
            array = pixels.permute(1, 2, 0).to("cpu").numpy()
            results.append(array.astype(arrays[index].dtype, copy=False))
        names = ("change_mean", "change_p99", "noise_in", "noise_out", "residual_structure")
        values = torch.stack(changes).tolist() if changes else []  # one sync for the batch
        return results, [dict(zip(names, row)) for row in values]

    def _change(self, source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What the model did, cheaply and on the device: |output - input| (mean, 99th
        percentile) on a <=256px strided view, and the noise level of input and output on a
        central <=256px crop of the first plane (:func:`noise_sigma`), all in 8-bit levels,
        and the structure of the residual on that crop (0-1, :func:`residual_structure`; a
        crop, not the strided view, which would alias the pixel-scale detail it looks for);
        a tensor of those five values."""
        import torch

        from restorer.audit import residual_structure

        if self.scale > 1:
            out = torch.nn.functional.avg_pool2d(out[None], self.scale)[0]
        step = max(1, math.ceil(max(source.shape[-2:]) / 256))
        diff = (out[:, ::step, ::step] - source[:, ::step, ::step]).abs().flatten() * 255.0
        height, width = source.shape[-2:]
        y0, x0 = max(0, (height - 256) // 2), max(0, (width - 256) // 2)
        crops = [image[:, y0:y0 + 256, x0:x0 + 256] for image in (source, out)]
        noise = [noise_sigma(crop[0]) * 255.0 for crop in crops]
        structure = residual_structure(crops[0][None], crops[1][None])[0]
        return torch.stack([diff.mean(), _p99(diff), *noise, structure]).float()

    def __call__(self, batch):
        if isinstance(batch, dict):  # a user's pipeline: numpy batches with an "image" column
            arrays = [np.asarray(a) for a in batch["image"]]
            arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
            restored, _ = self.restore_arrays(arrays)
            batch["image"] = np.array([r[..., 0] if r.shape[-1] == 1 and a.ndim == 2 else r
                                       for r, a in zip(restored, batch["image"])] + [None],
                                      dtype=object)[:-1]
            return batch
        rows = _rows(batch)
        ready = [r for r in rows if r["status"] == "decoded"]
        started = time.perf_counter()
        try:
            self._restore_rows(ready)
        except Exception as e:  # noqa: BLE001 - find the image at fault, one by one
            self._survive(e)
            for row in ready:
                try:
                    self._restore_rows([row])
                except Exception as e:  # noqa: BLE001 - OOM: transient; others: quarantine
                    self._survive(e)
                    _fail(row, "restore", e)
                    row["pixels"] = row["alpha"] = b""
        seconds = (time.perf_counter() - started) / max(1, len(ready))
        for row in ready:
            row["model_seconds"] = seconds
        return _table(rows, RESTORED_SCHEMA)

    def _survive(self, error: Exception) -> None:
        """After a failed batch: free cached device memory (an out-of-memory error), or end
        this process on a CUDA error that leaves the device context unusable, so that Ray
        restarts the actor (Ray Data's actor pools restart actors and retry their batches)
        instead of it failing every later batch."""
        if self.device.type != "cuda":
            return
        if is_device_fatal(error):
            log.error("RestoreActor: device error %s: %s; restarting this actor",
                      type(error).__name__, error)
            os._exit(1)
        import torch

        torch.cuda.empty_cache()

    def _restore_rows(self, rows: list[dict[str, Any]]) -> None:
        from restorer.tiling import plan_tiles

        if not rows:
            return
        arrays = [_pixels(r) for r in rows]
        restored, stats = self.restore_arrays(arrays)
        for row, array, stat in zip(rows, restored, stats):
            row.update(stat, pixels=array, out_height=array.shape[0],
                       out_width=array.shape[1], status="restored",
                       tiles=plan_tiles(row["height"], row["width"], self.tile, self.overlap,
                                        self.alignment).count)


# --- 4. encode + write (CPU tasks) -----------------------------------------------------------

def encode_and_write(batch: pa.Table, output_uri: str, options: codec.EncodeOptions,
                     storage_options: storage.StorageOptions, layout: str = "files",
                     resumed: bool = False) -> pa.Table:
    """Ray Data task: encode each restored row and publish it atomically under the output.

    With the ``parquet`` output layout the encoded image goes back in the record instead, and
    the driver writes it into the unit's shard when the unit commits. In a ``resumed`` job an
    output that already exists (written before a crash, its unit never committed) is replaced
    and counted, so the summary reports the work that was redone.
    """
    records = []
    attempts = RETRY_ATTEMPTS
    for row in _rows(batch):
        if row["status"] == "restored":
            started = time.perf_counter()
            try:
                pixels = _pixels(row, height=row["out_height"], width=row["out_width"])
                alpha = None
                if row["alpha"]:
                    alpha = _pixels(row, "alpha", channels=1)[..., 0]
                    if alpha.shape != pixels.shape[:2]:
                        alpha = _resize_plane(alpha, pixels.shape[1], pixels.shape[0])
                data = codec.encode(pixels, alpha, row["format"], row["icc"] or None,
                                    row["exif"] or None, options)
            except Exception as e:  # noqa: BLE001 - one image's failure is its record
                records.append(_fail(row, "write", e, PERMANENT))
                continue
            try:
                if layout == "parquet":
                    row["encoded"] = data
                else:
                    target = storage.join(output_uri, row["out_key"])

                    def publish(target=target, data=data) -> int:
                        replaced = int(resumed and storage.exists(target, storage_options))
                        storage.write_bytes(target, data, storage_options)
                        return replaced

                    row["replaced"], retries = retrying(publish, attempts,
                                                        what=f"write {row['out_key']}")
                    row["retries"] += retries
                row.update(status="ok", out_bytes=len(data),
                           sha256=hashlib.sha256(data).hexdigest(),
                           write_seconds=time.perf_counter() - started)
            except Exception as e:  # noqa: BLE001 - classified: quarantine, retry or wait
                if _fail(row, "write", e)["status"] == "transient":
                    attempts = 1
        elif row["status"] not in ("failed", "skipped", "transient", "missing"):
            _fail(row, "restore", RestorerError(f"row arrived with status {row['status']!r}"))
        records.append(row)
    return _table(records, RECORD_SCHEMA)


def _resize_plane(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(plane).resize((width, height), Image.BICUBIC))


# --- 5. the job: output folder, ledger, commit, summary --------------------------------------

@dataclass
class JobState:
    spec: RestoreSpec
    model_uri: str
    model_sha256: str
    fingerprint: dict[str, Any]
    started: float = field(default_factory=time.time)
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    skipped_units: int = 0
    committed_units: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    megapixels: float = 0.0
    first_result: float | None = None  # when the first records reached the driver
    first_count: int = 0  # records in that first batch
    last_result: float | None = None
    errors_by_class: dict[str, int] = field(default_factory=dict)
    notes: int = 0
    replaced: int = 0  # outputs found already written (in units a crash left uncommitted)
    abandoned: int = 0  # images in units left open by a stop
    retries: int = 0  # transient failures retried (reads, writes) in this run
    transient: int = 0  # images still failing transiently: their units stay for the next run
    missing: int = 0  # inputs that vanished: their units wait MISSING_RUNS runs, then commit
    incomplete_units: int = 0  # units left uncommitted for those
    digest: Digest = field(default_factory=Digest)  # what this run committed, in brief


def meta_uri(spec: RestoreSpec, *parts: str) -> str:
    return storage.join(spec.output.uri, "/".join((META_DIR, *parts)))


def prepare_output(spec: RestoreSpec, fingerprint: dict[str, Any], model_uri: str,
                   legacy_fingerprint: dict[str, Any] | None = None) -> bool:
    """Claim the output for this job, or refuse it if it holds a different job.

    Returns whether the output already held this job (a resume). Fingerprints carry a version:
    version 2 holds resolved settings (tile, overlap, precision as the actors ran them);
    outputs of earlier versions held them as configured, so they are compared with
    ``legacy_fingerprint`` (the spec's unresolved settings) and resume when those match.
    """
    options = spec.storage.options()
    job_uri = meta_uri(spec, "job.json")
    resumed = storage.exists(job_uri, options)
    if resumed:
        previous = json.loads(storage.read_bytes(job_uri, options))
        if previous.get("ledger_format_version", 0) > LEDGER_FORMAT_VERSION:
            raise JobError(f"{spec.output.uri} was written by a newer restorer (ledger format "
                           f"{previous['ledger_format_version']}); upgrade restorer")
        old = previous.get("fingerprint", {})
        ours = fingerprint
        if previous.get("fingerprint_version", 1) < FINGERPRINT_VERSION and legacy_fingerprint:
            ours = legacy_fingerprint  # compare like with like; job.json is upgraded below
            log.warning("%s was started by an earlier restorer (fingerprint version %s), which "
                        "padded image edges by replication; images restored from now on use "
                        "reflection (better borders). Resuming; pass --overwrite to redo every "
                        "image the same way", spec.output.uri,
                        previous.get("fingerprint_version", 1))
        changed = sorted(k for k in set(old) | set(ours) if old.get(k) != ours.get(k))
        if changed and not spec.output.overwrite:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {ours.get(k)!r}" for k in changed)
            raise OutputConflictError(
                f"{spec.output.uri} holds a job with different settings ({details}); use the "
                "same settings (or --model the old model file) to resume, another output, or "
                "--overwrite to redo everything")
    elif ([n for n in storage.list_names(spec.output.uri, options) if n != META_DIR]
          and not spec.output.overwrite):
        raise OutputConflictError(f"Output {spec.output.uri} is not empty and holds no restorer "
                                  "job; choose an empty output or pass --overwrite")
    if spec.output.overwrite:
        storage.delete(meta_uri(spec, "ledger"), options, recursive=True)
        storage.delete(meta_uri(spec, "errors.parquet"), options, recursive=True)
        storage.delete(meta_uri(spec, "digests"), options, recursive=True)
    record = {"ledger_format_version": LEDGER_FORMAT_VERSION,
              "fingerprint_version": FINGERPRINT_VERSION, "fingerprint": fingerprint,
              "fingerprint_sha256": digest(fingerprint), "model": model_uri,
              "spec": spec_to_dict(spec), "created": time.time()}
    storage.write_bytes(job_uri, json.dumps(record, indent=2).encode(), options)
    return resumed


def committed_units(spec: RestoreSpec) -> tuple[set[str], set[str]]:
    """(units with a ledger record, units with error records) in the output."""
    options = spec.storage.options()

    def ids(folder: str) -> set[str]:
        return {n[len("unit-"):-len(".parquet")] for n in storage.list_names(
            meta_uri(spec, folder), options) if n.startswith("unit-") and n.endswith(".parquet")}

    return ids("ledger"), ids("errors.parquet")


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def commit_unit(spec: RestoreSpec, unit: str, records: list[dict[str, Any]],
                had_errors: bool) -> None:
    """Commit a unit: its shard (parquet layout), its errors, then the ledger entry.

    Each file is published atomically and the ledger entry comes last, so a unit with a ledger
    entry is complete; a crash before it means the unit is redone, overwriting the same keys.
    The ledger entry is created once (a conditional create; see :func:`storage.write_bytes`):
    finding another run's entry for the unit means two jobs write into one output, and is an
    error. Only a unit redone for its errors (``had_errors``, ``--retry-failed``) replaces its
    entry.
    """
    options = spec.storage.options()
    if spec.output.layout == "parquet":
        shard = pa.table({
            "key": [r["out_key"] or r["key"] for r in records],
            "bytes": pa.array([r["encoded"] for r in records], pa.large_binary()),
            "status": [r["status"] for r in records],
            "error": [r["message"] for r in records],
            "source_key": [r["key"] for r in records],
        })
        storage.write_bytes(storage.join(spec.output.uri, f"part-{unit}.parquet"),
                            _parquet_bytes(shard), options)
    errors = [r for r in records if r["status"] != "ok"]
    error_uri = meta_uri(spec, "errors.parquet", f"unit-{unit}.parquet")
    if errors:
        table = pa.Table.from_pylist([{c: r[c] for c in ERROR_COLUMNS} for r in errors])
        storage.write_bytes(error_uri, _parquet_bytes(table), options)
    elif had_errors:
        storage.delete(error_uri, options)
    ledger = pa.Table.from_pylist([dict(r, encoded=b"") for r in records], schema=RECORD_SCHEMA)
    storage.write_bytes(meta_uri(spec, "ledger", f"unit-{unit}.parquet"), _parquet_bytes(ledger),
                        options, create=not had_errors)


def _account(state: JobState, record: dict[str, Any]) -> None:
    state.input_bytes += record["in_bytes"]
    state.retries += record["retries"]
    if record["status"] == "ok":
        state.succeeded += 1
        state.output_bytes += record["out_bytes"]
        state.megapixels += record["width"] * record["height"] / 1e6
    elif record["status"] == "transient":
        state.transient += 1
    elif record["status"] == "missing":
        state.missing += 1
    else:
        state.failed += 1
        state.errors_by_class[record["error_class"]] = (
            state.errors_by_class.get(record["error_class"], 0) + 1)
    state.notes += bool(record["note"])
    state.replaced += record["replaced"]


def _summary(state: JobState, elapsed: float) -> dict[str, Any]:
    """The run's figures. Rates count the images this run processed (restored or failed), not
    the units it skipped; a run that processed none has no rate (``None``). The steady rate
    runs from the first processed records to the last, so Ray's and the actors' start-up is
    left out; it needs at least two batches of results."""
    processed = state.succeeded + state.failed
    steady = None
    if state.first_result is not None and state.last_result is not None:
        span = state.last_result - state.first_result
        if span > 0 and processed > state.first_count:
            steady = round((processed - state.first_count) / span, 3)
    status = "failed_images" if state.failed else "ok"
    if state.incomplete_units:
        status = "incomplete"
    return {
        "status": status,
        "total": state.total, "succeeded": state.succeeded, "failed": state.failed,
        "skipped": state.skipped, "skipped_units": state.skipped_units,
        "committed_units": state.committed_units,
        "elapsed_seconds": round(elapsed, 3),
        "startup_seconds": (round(state.first_result - state.started, 3)
                            if state.first_result is not None else None),
        "images_per_second": round(processed / elapsed, 3) if processed and elapsed > 0 else None,
        "steady_images_per_second": steady,
        "megapixels": round(state.megapixels, 3), "input_bytes": state.input_bytes,
        "output_bytes": state.output_bytes, "errors_by_class": state.errors_by_class,
        "images_with_notes": state.notes,
        "replaced_outputs": state.replaced, "abandoned_images": state.abandoned,
        "retries": state.retries, "transient_failures": state.transient,
        "missing_inputs": state.missing, "incomplete_units": state.incomplete_units,
        "model": state.model_uri, "model_sha256": state.model_sha256,
        "fingerprint": state.fingerprint, "spec": spec_to_dict(state.spec),
        "input": state.spec.input.uri, "output": state.spec.output.uri,
    }


def source_config(spec: RestoreSpec, layout: str) -> SourceConfig:
    return SourceConfig(layout, spec.input.extensions, spec.input.include, spec.input.exclude,
                        spec.output.format, spec.input.key_column, spec.input.bytes_column,
                        spec.input.uri_column, spec.storage.options(),
                        skip_prefix=output_inside_input(spec))


def output_inside_input(spec: RestoreSpec) -> str:
    """The output's key prefix inside the input folder ("" when it lies elsewhere)."""
    import os

    source, target = spec.input.uri, spec.output.uri
    if storage.is_remote(source) != storage.is_remote(target):
        return ""
    if storage.is_remote(source):
        source, target = source.rstrip("/") + "/", target.rstrip("/") + "/"
        return target[len(source):] if target.startswith(source) and target != source else ""
    source = os.path.realpath(storage.local_path(source))
    target = os.path.realpath(storage.local_path(target))
    if target != source and target.startswith(source.rstrip(os.sep) + os.sep):
        return os.path.relpath(target, source).replace(os.sep, "/") + "/"
    return ""


def _expand_task(row: dict[str, Any], config: SourceConfig,
                 done: frozenset[str]) -> Iterator[dict[str, Any]]:
    """The rows of one listing task, unit by unit (a generator: :func:`_expand_tasks` hands
    them on in small tables as they are made)."""
    task = ListingTask(**{f.name: row[f.name] for f in dataclasses.fields(ListingTask)})
    delays = backoff_delays(RETRY_ATTEMPTS)
    yielded = 0  # units handed on; a retried listing skips them (units come in a stable order)
    for attempt in range(RETRY_ATTEMPTS):
        try:
            for index, unit in enumerate(expand(task, config, done)):
                if index >= yielded:
                    yield from unit
                    yielded += 1
            return
        except Exception as e:  # classified here; permanent ones are re-raised
            if attempt == RETRY_ATTEMPTS - 1 or classify(e) != TRANSIENT:
                raise
            log.info("list %s: %s: %s; retry %d of %d in %.1f s", task.uri, type(e).__name__,
                     e, attempt + 1, RETRY_ATTEMPTS - 1, delays[attempt])
            time.sleep(delays[attempt])


def _expand_tasks(batch: pa.Table, config: SourceConfig,
                  done: frozenset[str]) -> Iterator[pa.Table]:
    """Ray Data map_batches: the rows of each listing task in ``batch``, in tables of up to 32
    rows as they are made (fused with the repartition after it, these leave the task at once)."""
    for row in batch.to_pylist():
        rows: list[dict[str, Any]] = []
        for listed in _expand_task(row, config, done):
            rows.append(listed)
            if len(rows) >= 32:
                yield pa.Table.from_pylist(rows)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows)


def listing_dataset(tasks: list[ListingTask], config: SourceConfig, done: frozenset[str]) -> Any:
    """The listing stage: one Ray task per listing task, its rows flowing on as they are made."""
    import ray.data

    ds = ray.data.from_items([dataclasses.asdict(task) for task in tasks],
                             override_num_blocks=max(1, len(tasks)))
    ds = ds.map_batches(_expand_tasks, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"config": config, "done": done}, num_cpus=0.25)
    if config.layout == "files":
        # A folder is listed by one task, whatever its size: cut its rows into blocks so that
        # many decode tasks share them. Manifests and shards are listed in chunks.
        # Ray Data fuses map_batches (not flat_map) with this repartition: its blocks of 32
        # rows leave the listing task as they are made, instead of at its end (a flat_map's
        # output waits for 128 MiB of rows: a flat S3 prefix would be listed whole first).
        ds = ds.repartition(target_num_rows_per_block=32)
    return ds


def build_pipeline(spec: RestoreSpec, plan, tasks: list, config: SourceConfig,
                   done: frozenset[str], resumed: bool = False, model_sha256: str = "") -> Any:
    """The Ray Data graph of a restore job (the one pipeline builder).

    With ``input.limit`` the (small) listing runs in the driver; otherwise each listing task
    runs in a Ray task and its rows stream on in small blocks, so decoding starts while
    listing goes on.
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    from restorer.console import configure_ray_data

    configure_ray_data()
    options = spec.storage.options()
    encode_options = codec.EncodeOptions(spec.output.format, spec.output.jpeg_quality,
                                         spec.output.png_compress_level)
    if spec.input.limit:
        rows: list[dict[str, Any]] = []
        for task in tasks:
            for unit in expand(task, config, done):
                real = sum(1 for r in unit if r["status"] != "skipped") or unit[0]["unit_size"]
                if len(rows) + real > spec.input.limit:
                    unit = _truncate_unit(unit, spec.input.limit - len(rows), done)
                rows.extend(unit)
                if sum(1 if r["status"] != "skipped" else r["unit_size"] for r in rows) >= \
                        spec.input.limit:
                    break
            else:
                continue
            break
        ds = ray.data.from_items(rows or [], override_num_blocks=max(1, math.ceil(len(rows) / 8)))
    else:
        ds = listing_dataset(tasks, config, done)
    ds = ds.map_batches(
        read_and_decode, batch_format="pyarrow", batch_size=8, num_cpus=0.5,
        fn_kwargs={"storage_options": options, "max_pixels": spec.limits.max_pixels,
                   "max_input_bytes": spec.limits.max_input_mb * 1024 * 1024})
    # OpenMP threads that spin between parallel regions take the cores that decode and encode
    # need: on a 2-core machine a CPU actor with 2 torch threads used ~9x the CPU per image of
    # a small net (and ~2x of the default U-Net) for the same or a longer wall time.
    actor_env = {} if plan.gpus_per_worker else {"runtime_env": {"env_vars": {
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}}
    ds = ds.map_batches(
        RestoreActor, batch_format="pyarrow", batch_size=spec.resources.batch_size,
        compute=ActorPoolStrategy(size=plan.workers), num_cpus=plan.cpus_per_worker,
        num_gpus=plan.gpus_per_worker, **actor_env,
        fn_constructor_kwargs={
            "model": spec.model.name or None, "tile": spec.model.tile,
            "overlap": spec.model.overlap, "precision": spec.model.precision,
            "channels_last": spec.model.channels_last, "strength": spec.model.strength,
            "tile_batch": spec.resources.tile_batch, "threads": plan.threads_per_worker,
            "storage_options": options, "compile": spec.model.compile,
            "model_sha256": model_sha256})
    return ds.map_batches(
        encode_and_write, batch_format="pyarrow", batch_size=8, num_cpus=0.5,
        fn_kwargs={"output_uri": spec.output.uri, "options": encode_options,
                   "storage_options": options, "layout": spec.output.layout,
                   "resumed": resumed})


def _truncate_unit(unit: list[dict[str, Any]], count: int,
                   done: frozenset[str]) -> list[dict[str, Any]]:
    """The first ``count`` rows of a unit, as a unit of their own (``--limit``), or its
    ``skipped`` marker row when an earlier run with the same limit committed it."""
    from restorer.sources import _unit_id

    rows = [r for r in unit if r["status"] != "skipped"][:count]
    unit_id = _unit_id([r["key"] for r in rows])
    if rows and unit_id in done:
        return [dict(rows[0], key="", uri="", data=b"", size=0, out_key="", format="",
                     status="skipped", unit=unit_id, unit_size=len(rows))]
    for r in rows:
        r["unit"], r["unit_size"] = unit_id, len(rows)
    return rows


def run_restore(spec: RestoreSpec) -> dict[str, Any]:
    """Run a restore job to the end; returns (and writes) its summary.

    Everything that can fail for the whole job (spec, model, input listing, output access) is
    checked before Ray starts or any image is touched; settings left to ``auto``/0 (model,
    tile, overlap, precision) are resolved before they enter the fingerprint, so a resume on
    other hardware cannot mix outputs made differently.
    """
    from restorer.models import DEFAULT_MODEL, get_model, resolve_model_uri

    spec = spec.validate()
    options = spec.storage.options()
    if not spec.model.name:
        spec = replace_field(spec, "model", "name", DEFAULT_MODEL)
    model_uri = resolve_model_uri(spec.model.name)
    model_sha256 = hashlib.sha256(storage.read_bytes(model_uri, options)).hexdigest()
    net = get_model(model_uri, options).net  # fail here, before any work, if it is unusable
    _refuse_input_as_output(spec)
    layout = detect_layout(spec.input.uri, spec.input.layout, options)
    config = source_config(spec, layout)
    if config.skip_prefix:
        log.warning("the output %s lies inside the input; it is left out of the listing",
                    spec.output.uri)
    tasks = listing_tasks(spec.input.uri, config)
    if (layout == "files" and not storage.is_remote(spec.input.uri)
            and storage.is_dir(spec.input.uri)
            and not storage.has_local_file(spec.input.uri, spec.input.extensions,
                                           skip_dirs=(META_DIR,))):
        log.warning("no images found under %s (extensions %s)", spec.input.uri,
                    " ".join(spec.input.extensions))
        state = JobState(spec, model_uri, model_sha256, {})
        return dict(_summary(state, time.time() - state.started), status="empty")

    if (not storage.exists(meta_uri(spec, "job.json"), options)  # a bad bucket fails here
            and not spec.output.overwrite
            and [n for n in storage.list_names(spec.output.uri, options) if n != META_DIR]):
        raise OutputConflictError(f"Output {spec.output.uri} is not empty and holds no restorer "
                                  "job; choose an empty output or pass --overwrite")
    lease = Lease(meta_uri(spec, "lease.json"), options, spec.limits.lease_stale_seconds)
    with lease:  # one job per output, from before anything is written until the end
        return _run_leased(spec, model_uri, model_sha256, net, layout, config, tasks)


def _run_leased(spec: RestoreSpec, model_uri: str, model_sha256: str, net: torch.nn.Module,
                layout: str, config: SourceConfig, tasks: list[ListingTask]) -> dict[str, Any]:
    from restorer.runtime import cluster_shape, ensure_ray, plan_workers

    embedded = ensure_ray(spec.resources.address, spec.resources.num_cpus,
                          spec.resources.object_store_mb)
    plan = plan_workers(spec.resources.workers, spec.resources.gpus_per_worker,
                        spec.resources.cpus_per_worker, spec.resources.threads_per_worker,
                        *cluster_shape(), can_autoscale=not embedded)
    log.info("worker plan: %s", plan)
    legacy_fingerprint = spec.fingerprint(model_sha256)  # outputs of restorer before 0.2
    tile, overlap = tile_settings(net, spec.model.tile, spec.model.overlap)
    spec = replace_field(spec, "model", "tile", tile)
    spec = replace_field(spec, "model", "overlap", overlap)
    spec = replace_field(spec, "model", "precision",
                         resolve_precision(spec.model.precision, plan.gpus_per_worker > 0))
    # Since fingerprint version 2, images are padded by reflection at their bottom/right edges
    # (version 1 replicated edge pixels): part of how outputs are made.
    fingerprint = {**spec.fingerprint(model_sha256), "edge_padding": "reflect"}
    state = JobState(spec, model_uri, model_sha256, fingerprint)
    _refuse_older_units(spec, tasks, config)
    resumed = (prepare_output(spec, fingerprint, model_uri, legacy_fingerprint)
               and not spec.output.overwrite)
    done, with_errors = committed_units(spec)
    if spec.output.overwrite:
        done = set()
    elif spec.output.retry_failed:
        done -= with_errors
    log.info("input %s (%s layout): %d listing tasks; %d units already committed",
             spec.input.uri, layout, len(tasks), len(done))

    total = known_total(tasks)
    if spec.input.limit:
        total = min(total or spec.input.limit, spec.input.limit)
    with _stop_on_signals() as stop, Progress("restore", total) as progress:
        if total is None and layout == "files" and not storage.is_remote(spec.input.uri):
            _count_in_background(tasks, config, progress)
        _execute(spec, state, build_pipeline(spec, plan, tasks, config, frozenset(done),
                                             resumed, model_sha256),
                 with_errors, stop, progress)
    state.total = state.succeeded + state.failed + state.skipped
    summary = _summary(state, time.time() - state.started)
    summary["resumed"] = resumed
    if state.total == 0:
        summary["status"] = "empty"
    if stop.is_set():
        # The stop must end within the pod's grace period: the summary comes from the counters
        # held here, without re-reading the ledger; `restorer inspect OUTPUT --report` rebuilds
        # the whole-job figures and the report page later.
        summary["status"] = "stopped"
        summary["report"] = None
        _write_run_digest(spec, state.digest)  # its counters are in hand: nothing is re-read
        retrying(lambda: storage.write_bytes(meta_uri(spec, "summary.json"),
                                             json.dumps(summary, indent=2).encode(),
                                             spec.storage.options()),
                 2, what="write summary.json")
    else:
        _audit(spec, summary, state.digest)
    if summary["status"] == "incomplete":
        log.warning("%d units (%d images failing transiently, %d inputs missing) were left "
                    "uncommitted; rerun the same command to finish them",
                    state.incomplete_units, state.transient, state.missing)
    if stop.is_set():
        raise JobStopped(f"Stopped after committing {state.committed_units} units "
                         f"({state.abandoned} images in unfinished units abandoned); rerun "
                         "the same command to finish the job")
    return summary


def _refuse_older_units(spec: RestoreSpec, tasks: list[ListingTask],
                        config: SourceConfig) -> None:
    """Refuse to resume an output of an older ledger format whose units this restorer would
    cut differently: resuming would redo (and count twice) committed images."""
    job_uri = meta_uri(spec, "job.json")
    options = spec.storage.options()
    if spec.output.overwrite or not storage.exists(job_uri, options):
        return
    version = json.loads(storage.read_bytes(job_uri, options)).get("ledger_format_version", 0)
    why = units_changed(version, tasks, config) if version < LEDGER_FORMAT_VERSION else ""
    if why:
        raise JobError(f"{spec.output.uri} holds a job of ledger format {version}: {why}; "
                       "finish it with the restorer that started it, or pass --overwrite to "
                       "redo it")


def _count_in_background(tasks: list[ListingTask], config: SourceConfig,
                         progress: Progress) -> None:
    """Give a local folder's progress bar its total once a counting walk has finished."""
    def count() -> None:
        try:
            progress.set_total(count_inputs(tasks, config))
        except (OSError, RestorerError) as e:  # progress only: the listing reports errors
            log.debug("could not count the inputs: %s", e)

    threading.Thread(target=count, name="restorer-count", daemon=True).start()


def _audit(spec: RestoreSpec, summary: dict[str, Any], run: Digest | None = None) -> None:
    """Count the whole job (every run so far) and flag outliers into the summary from the runs'
    digests (:mod:`restorer.digest`: one GET per run, plus the ledger units no digest covers),
    never by reading every ledger unit file; write summary.json, then the report page.

    A report that cannot be written is logged, never a failed job.
    """
    from restorer.report import MIN_RECORDS, MIN_SPREAD, OUTLIER_K, write_report

    options = spec.storage.options()
    if run is not None:
        _write_run_digest(spec, run)
    job = job_digest(spec.output.uri, options)
    summary["job"] = {"records": job.records, "succeeded": job.succeeded, "failed": job.failed}
    summary["flagged"] = flag(job, OUTLIER_K, MIN_SPREAD, MIN_RECORDS, limit=20)[0]
    summary["report"] = storage.join(spec.output.uri, f"{META_DIR}/report.html")
    storage.write_bytes(meta_uri(spec, "summary.json"), json.dumps(summary, indent=2).encode(),
                        options)
    try:
        write_report(spec.output.uri, options, digest=job)
    except (RestorerError, OSError, ValueError) as e:
        log.warning("could not write the report page: %s", e)
        summary["report"] = None


def _write_run_digest(spec: RestoreSpec, run: Digest) -> None:
    """Publish this run's digest (its committed units only). One that cannot be written is
    logged: the units it covers are in the ledger, and :func:`restorer.digest.job_digest` reads
    them back once later."""
    run.finished = time.time()
    try:
        retrying(lambda: write_digest(spec.output.uri, run, spec.storage.options()), 2,
                 what=f"write digest of run {run.run}")
    except Exception as e:
        if classify(e) != TRANSIENT:
            raise
        log.warning("could not write this run's digest (%s: %s); the next report reads its "
                    "units from the ledger", type(e).__name__, e)


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGTERM (pre-emption, ``restorer jobs stop``) and a first Ctrl-C (SIGINT) into a
    stop request while running: the driver commits the units that are complete and returns. A
    second Ctrl-C aborts at once (``KeyboardInterrupt``); a rerun still resumes."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        log.warning("%s: draining; committed units stay committed, open units are abandoned "
                    "and redone by the next run%s", signal.Signals(signum).name,
                    " (Ctrl-C again to abort now)" if signum == signal.SIGINT else "")
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _refuse_input_as_output(spec: RestoreSpec) -> None:
    import os

    if storage.is_remote(spec.input.uri) or storage.is_remote(spec.output.uri):
        same = spec.input.uri.rstrip("/") == spec.output.uri.rstrip("/")
    else:
        same = (os.path.realpath(storage.local_path(spec.input.uri))
                == os.path.realpath(storage.local_path(spec.output.uri)))
    if same:
        raise OutputConflictError(f"Output {spec.output.uri} is the input; outputs would overwrite inputs. "
                       "Choose another output")


def _execute(spec: RestoreSpec, state: JobState, ds: Any, with_errors: set[str],
             stop: threading.Event | None = None, progress: Progress | None = None) -> None:
    """Consume the pipeline's records in the driver and commit units as they complete.

    Only the units in flight are held here, so driver memory does not grow with the job.
    """
    open_units: dict[str, list[dict[str, Any]]] = {}
    flushed = time.time()
    for batch in _results(ds, stop):
        processed = 0
        for record in batch.to_pylist():
            if record["status"] == "skipped":
                state.skipped += record["unit_size"]
                state.skipped_units += 1
                if progress is not None:
                    progress.update(record["unit_size"])
                continue
            processed += 1
            _account(state, record)
            unit = open_units.setdefault(record["unit"], [])
            unit.append(record)
            if len(unit) == record["unit_size"]:
                redone = record["unit"] in with_errors
                committed = _close_unit(spec, state, record["unit"], unit, redone)
                del open_units[record["unit"]]
                if committed and (redone or time.time() - flushed > FLUSH_SECONDS):
                    _write_run_digest(spec, state.digest)
                    flushed = time.time()
        if processed:
            now = time.time()
            if state.first_result is None:
                state.first_result, state.first_count = now, processed
            state.last_result = now
            if progress is not None:
                progress.update(processed, failed=state.failed)
        if stop is not None and stop.is_set():
            break
    if stop is not None and stop.is_set():
        state.abandoned = sum(len(rows) for rows in open_units.values())
        return
    if open_units:
        raise JobError(f"{len(open_units)} work units did not complete; rerun to finish them")


def _results(ds: Any, stop: threading.Event | None) -> Iterator[pa.Table]:
    """The pipeline's record batches; on a stop request this returns within a fraction of a
    second, even while no batch is coming (a slow or stalled store), so that a stop ends
    within a pod's grace period. The batches are pulled by a daemon thread."""
    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    if stop is None:
        yield from batches
        return
    results: queue.Queue = queue.Queue(maxsize=4)
    end = object()

    def pull() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        results.put(batch, timeout=0.2)
                        break
                if stop.is_set():
                    return
            results.put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread, raised there
            results.put(e)

    threading.Thread(target=pull, name="restorer-results", daemon=True).start()
    while not stop.is_set():
        try:
            item = results.get(timeout=0.2)
        except queue.Empty:
            continue
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


MISSING_RUNS = 2  # runs in which a vanished input keeps its unit open before quarantine


def _close_unit(spec: RestoreSpec, state: JobState, unit: str, records: list[dict[str, Any]],
                had_errors: bool) -> bool:
    """Commit a complete unit and add its records to the run's digest; return whether it was
    committed. Not committed: a unit where an image in it failed transiently (then the unit stays
    uncommitted and the next run redoes it) or its input vanished (``missing``): that unit
    stays open for :data:`MISSING_RUNS` runs, counted in ``_restorer/missing/unit-<id>.json``,
    and is committed with those images quarantined in the run after. A commit that still fails
    transiently after its retries leaves the unit for the next run too. A unit redone by
    ``--retry-failed`` (``had_errors``) takes its earlier records out of the digests' sums
    (one unit file read, before it is replaced)."""
    if any(r["status"] == "transient" for r in records):
        state.incomplete_units += 1
        return False
    missing = [r for r in records if r["status"] == "missing"]
    counter = meta_uri(spec, "missing", f"unit-{unit}.json")
    options = spec.storage.options()
    if missing:
        runs, _ = retrying(lambda: json.loads(storage.read_bytes(counter, options))["runs"]
                           if storage.exists(counter, options) else 0, what=f"read {counter}")
        if runs < MISSING_RUNS:
            body = {"runs": runs + 1, "keys": [r["key"] for r in missing]}
            retrying(lambda: storage.write_bytes(counter, json.dumps(body).encode(), options),
                     what=f"write {counter}")
            state.incomplete_units += 1
            return False
        for record in missing:  # gone for MISSING_RUNS runs and this one: quarantine
            record.update(status="failed", message=f"{record['message']} (missing in "
                                                   f"{runs + 1} runs)"[:2000])
            state.missing -= 1
            state.failed += 1
            state.errors_by_class[record["error_class"]] = (
                state.errors_by_class.get(record["error_class"], 0) + 1)
    earlier = _earlier_records(spec, unit) if had_errors else None
    try:
        retrying(lambda: commit_unit(spec, unit, records, had_errors), RETRY_ATTEMPTS,
                 what=f"commit unit {unit}")
    except Exception as e:
        if classify(e) != TRANSIENT:
            raise
        log.warning("unit %s was not committed (%s: %s); the next run redoes it", unit,
                    type(e).__name__, e)
        state.incomplete_units += 1
        return False
    state.committed_units += 1
    if earlier is not None:  # --retry-failed: its earlier records leave the job's digest
        state.digest.retract(earlier, unit)
    for record in records:  # committed records only: a stop or a retry leaves open units out
        state.digest.add(record)
    state.digest.commit(unit, len(records))
    if missing:
        retrying(lambda: storage.delete(counter, options), what=f"delete {counter}")
    return True


def _earlier_records(spec: RestoreSpec, unit: str) -> list[dict[str, Any]] | None:
    """The ledger records of ``unit`` before it is redone (None: it has no ledger entry, so no
    digest counted it)."""
    try:
        records, _ = retrying(lambda: unit_records(spec.output.uri, unit,
                                                   spec.storage.options()),
                              what=f"read unit {unit}")
    except StorageError:
        return None
    return records


def restore(input: str, output: str, model: str | None = None, **options: Any) -> dict[str, Any]:
    """Restore every image under ``input`` into ``output``; returns the job summary.

    ``options`` are spec fields by name (``tile=256, format="png", workers=2, limit=100,
    overwrite=True, ...``; see ``jobs/README.md``). Runs on the connected Ray cluster, or starts
    an embedded one.
    """
    spec = spec_from_flags(RestoreSpec, input=input, output=output, model=model, **options)
    return run_restore(spec)
