"""Per-image audit of a restore job and its report page.

Two things, both read back from a job's ``OUTPUT/_restorer/`` folder after (or during) a run:

- :func:`flag_outliers` streams ledger records and flags the images whose change (mean and 99th
  percentile of ``|output - input|`` in 8-bit levels, measured by the restore actor) is far
  above the job's typical change: a net that hallucinated, a tile that blew up, an input unlike
  the others; and those whose residual (input - output) carries far more image structure than
  the job's typical image (``residual_structure``, :mod:`restorer.audit`): a net that smoothed
  away texture, text or fine detail along with the noise.
- :func:`write_report` writes ``OUTPUT/_restorer/report.html``: one static page (no server, no
  network, no external CSS or JS; crops embedded as ``data:`` URIs) with the summary,
  throughput, errors, flagged images, histograms of change and residual structure,
  input/output/amplified-residual crops and the spec and model provenance.

Both scan the ledger in Arrow batches of only the columns they need and keep bounded state
(reservoir samples, top-N heaps), so they work on jobs of millions of images.

What the ledger cannot tell: the *input's* noise level needs pixels, which only the actor sees.
The report estimates it (:func:`estimate_noise`) for the few sampled images it decodes anyway.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import itertools
import json
import logging
import math
import random
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from restorer import codec, storage
from restorer.digest import (
    DIGEST_DIR,
    MIN_SPREAD_STRUCTURE,
    MIN_STRUCTURE_CHANGE,
    STRUCTURE_STEP,
    Digest,
    histogram_values,
    job_digest,
    outlier_reasons,
)
from restorer.digest import flag as flag_from_digest
from restorer.errors import JobError, RestorerError

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = storage.StorageOptions()  # local paths, or S3 from the AWS environment
META_DIR = "_restorer"
REPORT_NAME = "report.html"

# An image is flagged when its change is above median + OUTLIER_K * spread of the job, where
# spread = max(1.4826 * MAD, MIN_SPREAD). 1.4826 * MAD estimates the standard deviation of a
# normal distribution without being moved by the outliers themselves; K = 5 is ~5 sigma, so a
# well-behaved job flags (almost) nothing, and MIN_SPREAD (8-bit levels) keeps a job of near
# identical images (MAD ~ 0) from flagging an image that changed by a fraction of a level more.
OUTLIER_K = 5.0
MIN_SPREAD = 0.5
# residual_structure (restorer.audit, 0-1) is flagged the same way, with its own floor of the
# spread, MIN_SPREAD_STRUCTURE = 0.05: a twentieth of its range (noise-like residuals score
# ~0.06 +- 0.03). An image changed by under MIN_STRUCTURE_CHANGE = 1 level on average is not
# flagged for it: a structured residual that small is invisible (clean images through a denoiser
# score 0.1-0.5 at 0-1.5 levels). Both live in restorer.digest, which flags from run digests.
OUTLIER_COLUMNS = ("change_mean", "change_p99", "residual_structure")
MIN_RECORDS = 3  # below this many successful images there is no "typical" change to compare to
RESERVOIR = 20_000  # values kept to estimate medians (exact below this many images)
CARRIED = ("unit", "uri", "out_key")  # record fields a flagged entry keeps when present

CROP = 192  # side of the before/after crops, in input pixels
MAX_CROP_DISPLAY = 384  # crops are shown at most this wide (super-resolution outputs are larger)
MAX_RESIDUAL_GAIN = 16.0  # the residual crop is amplified at most this much
MAX_SEARCH_PIXELS = 25_000_000  # above this the crop is centred instead of placed on the change
MAX_ERRORS_SHOWN = 200
READ_AHEAD = 8  # Parquet files of a folder read ahead while one is consumed (S3 latency)


# --- reading the ledger ----------------------------------------------------------------------

def meta_uri(output: str, *parts: str) -> str:
    """The URI of ``parts`` under ``OUTPUT/_restorer/``."""
    return storage.join(output, "/".join((META_DIR, *parts)))


def report_uri(output: str) -> str:
    """Where :func:`write_report` writes the page: ``OUTPUT/_restorer/report.html``."""
    return meta_uri(output, REPORT_NAME)


def table_batches(uri: str, columns: Sequence[str],
                  options: storage.StorageOptions = DEFAULT_OPTIONS
                  ) -> Iterator[pa.RecordBatch]:
    """Arrow batches of ``columns`` of the Parquet folder at ``uri`` (none if it is empty).

    The files (a ledger holds one per work unit) are read one at a time, in name order, with
    up to ``READ_AHEAD`` of them fetched ahead in threads, so memory stays flat however many
    files the folder holds. (A ``pyarrow.dataset`` scan holds on to about 80 KB per file it has
    read until the dataset is dropped, presumably each fragment's parsed metadata: 115 MiB for
    the 1,477 unit files of a 20,000-image job.) Hidden and temporary files
    (``.unit-x.parquet.tmp-...``, written by a running job) are skipped.
    Columns missing from a file (an older ledger) are left out of its batches.
    """
    names = [n for n in storage.list_names(uri, options)
             if n.endswith(".parquet") and not n.startswith((".", "_"))]

    def read(name: str) -> pa.Table:
        data = storage.read_bytes(storage.join(uri, name), options)
        parquet = pq.ParquetFile(pa.BufferReader(data))
        present = set(parquet.schema_arrow.names)
        return parquet.read(columns=[c for c in columns if c in present], use_threads=False)

    pool = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="parquet-read")
    pending: deque[Future[pa.Table]] = deque()
    try:
        for name in names:
            pending.append(pool.submit(read, name))
            if len(pending) > READ_AHEAD:
                yield from pending.popleft().result().to_batches()
        while pending:
            yield from pending.popleft().result().to_batches()
    finally:  # also when the caller stops early: drop the reads not started yet
        pool.shutdown(cancel_futures=True)


def ledger_records(output: str, columns: Sequence[str],
                   options: storage.StorageOptions = DEFAULT_OPTIONS
                   ) -> Iterator[dict[str, Any]]:
    """The job's ledger records (one dict per input, only ``columns``), streamed in batches."""
    for batch in table_batches(meta_uri(output, "ledger"), columns, options):
        yield from batch.to_pylist()


# --- outliers --------------------------------------------------------------------------------

class _Reservoir:
    """A uniform sample of at most ``size`` items of a stream (Vitter's algorithm R), seeded."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seen, self.items = size, 0, []
        self._random = random.Random(seed)

    def add(self, item: Any) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            index = self._random.randrange(self.seen)
            if index < self.size:
                self.items[index] = item


def _robust(values: Sequence[float], k: float, min_spread: float) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    median = float(np.median(array))
    spread = max(1.4826 * float(np.median(np.abs(array - median))), min_spread)
    return {"median": median, "spread": spread, "cutoff": median + k * spread}


def scan_outliers(records: Iterable[dict[str, Any]], k: float = OUTLIER_K,
                  min_spread: float = MIN_SPREAD, threshold: float | None = None,
                  limit: int = 100) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`flag_outliers` plus the statistics it compared against.

    Returns ``(flagged, stats)``; ``stats`` has ``images`` (successful records seen),
    ``change_mean`` and ``change_p99`` (each ``{median, spread, cutoff}`` in 8-bit levels, or
    None below ``MIN_RECORDS`` images), ``residual_structure`` (the same on its 0-1 scale, or
    None below ``MIN_RECORDS`` images that have it: ledgers written before it), ``k``,
    ``threshold``, ``sampled`` (whether medians come from a ``RESERVOIR`` sample) and
    ``truncated`` (whether more than ``limit`` images may be above a cutoff).
    """
    if k <= 0 or min_spread < 0 or limit < 1:
        raise ValueError(f"k = {k}, min_spread = {min_spread}, limit = {limit}: need k > 0, "
                         "min_spread >= 0 and limit >= 1")
    floors = {"change_mean": min_spread, "change_p99": min_spread,
              "residual_structure": MIN_SPREAD_STRUCTURE}
    samples = {name: _Reservoir(RESERVOIR) for name in OUTLIER_COLUMNS}
    # min-heaps of the `limit` largest values of each column
    tops: dict[str, list[tuple[float, int, dict[str, Any]]]] = {n: [] for n in OUTLIER_COLUMNS}
    for index, record in enumerate(records):
        if record.get("status", "ok") != "ok":
            continue
        mean, p99 = record.get("change_mean"), record.get("change_p99")
        if mean is None or p99 is None or not (math.isfinite(mean) and math.isfinite(p99)):
            continue
        structure = record.get("residual_structure")
        if structure is not None and not math.isfinite(structure):
            structure = None
        entry = {"key": record["key"], "change_mean": round(float(mean), 3),
                 "change_p99": round(float(p99), 3),
                 "residual_structure": None if structure is None else round(float(structure), 3),
                 **{f: record[f] for f in CARRIED if f in record}}
        for name in OUTLIER_COLUMNS:
            value = record.get(name) if name != "residual_structure" else structure
            if value is None:
                continue
            samples[name].add(float(value))
            if name == "residual_structure" and float(mean) < MIN_STRUCTURE_CHANGE:
                continue  # in the typical values, never a candidate (see MIN_STRUCTURE_CHANGE)
            heap = tops[name]
            if len(heap) < limit:
                heapq.heappush(heap, (float(value), index, entry))
            elif float(value) > heap[0][0]:
                heapq.heapreplace(heap, (float(value), index, entry))

    seen = samples["change_mean"].seen
    stats: dict[str, Any] = {"images": seen, "k": k, "min_spread": min_spread,
                             "threshold": threshold, "sampled": seen > RESERVOIR,
                             "truncated": False}
    for name in OUTLIER_COLUMNS:
        sample = samples[name]
        stats[name] = (_robust(sample.items, k, floors[name]) if sample.seen >= MIN_RECORDS
                       else None)
    flagged: dict[str, dict[str, Any]] = {}
    for heap in tops.values():
        for _, _, entry in heap:
            reasons = outlier_reasons(entry, stats, k, threshold)
            if reasons:
                flagged[entry["key"]] = dict(entry, reason="; ".join(reasons))
    for name, heap in tops.items():
        robust = stats[name]
        cutoff = min(robust["cutoff"] if robust else math.inf,
                     threshold if threshold is not None and name == "change_mean" else math.inf)
        if len(heap) == limit and heap[0][0] > cutoff:
            stats["truncated"] = True
    if stats["truncated"]:
        log.warning("more than %d images are above an outlier cutoff; only the %d highest of "
                    "each are listed (raise limit to see more)", limit, limit)
    ordered = sorted(flagged.values(), key=lambda e: (-e["change_mean"], e["key"]))
    return ordered[:limit], stats


def flag_outliers(records: Iterable[dict[str, Any]], k: float = OUTLIER_K,
                  min_spread: float = MIN_SPREAD, threshold: float | None = None,
                  limit: int = 100) -> list[dict[str, Any]]:
    """The images whose change, or the structure of what was removed, is far above the job's
    typical image, most changed first.

    ``records`` are ledger records (dicts with ``key``, ``change_mean``, ``change_p99`` and
    optionally ``residual_structure`` and ``status``), consumed once, as a stream: only a
    ``RESERVOIR`` sample of each column and the ``limit`` largest of each are kept, so
    millions of records are fine (medians are exact below ``RESERVOIR`` images). Failed
    records and records without a finite change are ignored.

    An image is flagged when, in 8-bit levels (0-255, whatever the image's bit depth):

    - ``change_mean`` or ``change_p99`` > median + ``k`` * max(1.4826 * MAD, ``min_spread``)
      of that column over the job (only with at least ``MIN_RECORDS`` images), or
    - ``residual_structure`` (0-1, :mod:`restorer.audit`) > median + ``k`` * max(1.4826 * MAD,
      ``MIN_SPREAD_STRUCTURE``) over the job's images that have it, and ``change_mean`` >=
      ``MIN_STRUCTURE_CHANGE``: the model removed detail, not noise, or
    - ``change_mean`` > ``threshold``, when an absolute threshold is given.

    Each flagged entry has ``key``, ``change_mean``, ``change_p99``, ``residual_structure``
    (None in ledgers written before it), ``reason`` (why, with the
    numbers) and, when the records had them, ``unit``, ``uri`` and ``out_key``. At most
    ``limit`` entries are returned; a warning is logged when more images may be above a cutoff.
    """
    return scan_outliers(records, k, min_spread, threshold, limit)[0]


# --- pixels for the page ---------------------------------------------------------------------

def estimate_noise(gray: np.ndarray) -> float:
    """Immerkær's fast estimate of the noise standard deviation of a 2-D image.

    ``gray`` is HW (any dtype, at least 3x3); the result is in the array's units. Texture and
    edges raise it, so it is a rough figure: good to tell a clean input from a noisy one.
    """
    if gray.ndim != 2 or min(gray.shape) < 3:
        raise ValueError(f"need a 2-D image of at least 3x3 pixels, got shape {gray.shape}")
    g = gray.astype(np.float64)
    laplace = (g[:-2, :-2] - 2 * g[:-2, 1:-1] + g[:-2, 2:]
               - 2 * g[1:-1, :-2] + 4 * g[1:-1, 1:-1] - 2 * g[1:-1, 2:]
               + g[2:, :-2] - 2 * g[2:, 1:-1] + g[2:, 2:])
    height, width = g.shape
    return math.sqrt(math.pi / 2) * float(np.abs(laplace).sum()) / (6 * (width - 2) * (height - 2))


def _input_noise(pixels: np.ndarray) -> float | None:
    """Noise sigma of an HWC uint8/uint16 image in 8-bit levels (mean over its channels).

    Measured on a central <=1024px crop; None for images under 3x3 pixels.
    """
    height, width = pixels.shape[:2]
    if min(height, width) < 3:
        return None
    top, left = max(0, (height - 1024) // 2), max(0, (width - 1024) // 2)
    crop = pixels[top:top + 1024, left:left + 1024].astype(np.float32)
    if pixels.dtype == np.uint16:
        crop /= 257.0
    return float(np.mean([estimate_noise(crop[..., c]) for c in range(crop.shape[2])]))


def _crop_origin(source: np.ndarray, restored: np.ndarray | None, scale: int,
                 size: int) -> tuple[int, int]:
    """Top-left (y, x) of the ``size`` window where the restored image changed most.

    ``restored`` at ``scale`` times the input's size is box-averaged back to it first. Large
    images, or shapes that do not match, get the centre instead.
    """
    height, width = source.shape[:2]
    centre = ((height - size) // 2, (width - size) // 2)
    if (restored is None or height * width > MAX_SEARCH_PIXELS
            or restored.shape[:2] != (height * scale, width * scale)
            or restored.shape[2] != source.shape[2]):
        return centre
    out = restored.astype(np.float32)
    if scale > 1:
        out = out.reshape(height, scale, width, scale, -1).mean(axis=(1, 3))
    diff = np.abs(out - source.astype(np.float32)).mean(axis=2)
    integral = np.pad(diff.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    step = max(1, size // 8)
    ys = np.arange(0, height - size + 1, step)
    xs = np.arange(0, width - size + 1, step)
    sums = (integral[ys[:, None] + size, xs[None, :] + size] - integral[ys[:, None], xs[None, :] + size]
            - integral[ys[:, None] + size, xs[None, :]] + integral[ys[:, None], xs[None, :]])
    iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(ys[iy]), int(xs[ix])


def _png_data_uri(pixels: np.ndarray) -> str:
    from PIL import Image

    array = codec.to_uint8(pixels)
    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_SHARD_ROW = re.compile(r"[^/]+#\d+")  # a row of an input Parquet shard: "name.parquet#12"


def _output_bytes(output: str, record: dict[str, Any], layout: str,
                  options: storage.StorageOptions) -> bytes:
    if layout != "parquet":
        return storage.read_bytes(storage.join(output, record["out_key"]), options)
    fs, path = storage.filesystem(storage.join(output, f"part-{record['unit']}.parquet"), options)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["key", "bytes"],
                              filters=[("key", "==", record["out_key"])])
    if not table.num_rows:
        raise RestorerError(f"{record['out_key']!r} is not in shard part-{record['unit']}.parquet")
    return table.column("bytes")[0].as_py()


def _crops(output: str, record: dict[str, Any], layout: str,
           options: storage.StorageOptions) -> dict[str, Any]:
    """Before/after/amplified-residual crops of one image as data URIs, with the input's
    estimated noise level and the residual's gain (:func:`_residual_crop`).

    Returns ``{"note": why}`` instead when the input or output cannot be read back.
    """
    uri = record.get("uri") or ""
    if _SHARD_ROW.fullmatch(uri):
        return {"note": "input is a row of a Parquet shard; no crop"}
    try:
        source = codec.decode(storage.read_bytes(uri, options), name=uri).pixels
        restored = codec.decode(_output_bytes(output, record, layout, options),
                                name=record["out_key"]).pixels
    except (RestorerError, OSError, KeyError, pa.ArrowException) as e:
        return {"note": f"no crop: {e}"}
    height, width = source.shape[:2]
    ratio = restored.shape[0] / height
    scale = round(ratio) if ratio >= 1 and ratio == round(ratio) else 1
    size = min(CROP, height, width)
    y, x = _crop_origin(source, restored, scale, size)
    before = source[y:y + size, x:x + size]
    after = restored[y * scale:(y + size) * scale, x * scale:(x + size) * scale]
    if after.shape[2] != before.shape[2]:
        after = np.repeat(after, 3, axis=2) if after.shape[2] == 1 else after.mean(
            axis=2, keepdims=True).astype(after.dtype)
    display = min(max(size * scale, CROP), MAX_CROP_DISPLAY)  # small crops shown enlarged
    residual, gain = _residual_crop(before, after, scale)
    return {"before": _png_data_uri(before), "after": _png_data_uri(after), "display": display,
            "residual": _png_data_uri(residual), "gain": gain,
            "where": f"x {x}-{x + size}, y {y}-{y + size} of {width}x{height}"
                     + (f" (output x{scale})" if scale > 1 else ""),
            "noise": _input_noise(source)}


def _residual_crop(before: np.ndarray, after: np.ndarray, scale: int) -> tuple[np.ndarray, float]:
    """``before - after`` (the method noise; ``after`` box-averaged back to ``before``'s size
    when it is ``scale`` times larger) as a uint8 image, mid-gray at 0, amplified so that its
    99th-percentile magnitude reaches 100 levels (a gain of 1 to ``MAX_RESIDUAL_GAIN``);
    returns it and the gain. Noise removed shows as even grain; detail removed shows as the
    image's edges, text and texture."""
    peak = 65535.0 if before.dtype == np.uint16 else 255.0
    out = after.astype(np.float32)
    if scale > 1:
        height, width = before.shape[:2]
        out = out.reshape(height, scale, width, scale, -1).mean(axis=(1, 3))
    residual = (before.astype(np.float32) - out) * (255.0 / peak)
    level = float(np.quantile(np.abs(residual), 0.99)) if residual.size else 0.0
    gain = float(np.clip(100.0 / max(level, 1e-6), 1.0, MAX_RESIDUAL_GAIN))
    return np.clip(128.0 + gain * residual, 0, 255).round().astype(np.uint8), gain


# --- charts ----------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _svg_histogram(values: Sequence[float], label: str, marker: float | None = None,
                   bins: int = 40, span: tuple[float, float] | None = None) -> str:
    """An inline SVG histogram of ``values``, with an optional vertical line at ``marker``;
    the x axis covers ``span`` (widened to the values) or the values' range."""
    width, height, pad = 560, 160, 24
    low = min(min(values), span[0]) if span else min(values)
    high = max(max(values), marker if marker is not None else -math.inf,
               span[1] if span else -math.inf)
    high = high if high > low else low + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    top = max(1, int(counts.max()))
    bar = (width - 2 * pad) / bins
    parts = [(f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
              f'height="{height}" role="img" aria-label="{html.escape(label)}">')]
    for i, count in enumerate(counts):
        h = (height - 2 * pad) * count / top
        parts.append(f'<rect x="{pad + i * bar:.1f}" y="{height - pad - h:.1f}" '
                     f'width="{max(bar - 1, 1):.1f}" height="{h:.1f}" fill="#4a78b5"/>')
    if marker is not None:
        mx = pad + (width - 2 * pad) * (marker - low) / (high - low)
        parts.append(f'<line x1="{mx:.1f}" y1="{pad / 2}" x2="{mx:.1f}" y2="{height - pad}" '
                     'stroke="#c0392b" stroke-dasharray="4 3"/>'
                     f'<text x="{mx + 3:.1f}" y="{pad + 14:.0f}" fill="#c0392b">cutoff '
                     f'{marker:.3g}</text>')
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
                 'stroke="#333"/>'
                 f'<text x="{pad}" y="{height - 6}">{edges[0]:.3g}</text>'
                 f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">{edges[-1]:.3g}'
                 f'</text><text x="{width / 2:.0f}" y="{height - 6}" text-anchor="middle">'
                 f'{html.escape(label)}</text><text x="{pad}" y="{pad / 2 + 4:.0f}">max '
                 f'{top:,} per bin</text></svg>')
    return "".join(parts)


def _svg_cumulative(points: Sequence[tuple[float, int]]) -> str:
    """An inline SVG step chart of images committed (y) against seconds (x)."""
    width, height, pad = 560, 180, 32
    span = max(points[-1][0], 1e-9)
    total = max(points[-1][1], 1)
    xy = [(pad + (width - 2 * pad) * t / span, height - pad - (height - 2 * pad) * n / total)
          for t, n in points]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="images committed over time">'
            f'<polyline points="{path}" fill="none" stroke="#4a78b5" stroke-width="2"/>'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
            f'stroke="#333"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" '
            f'stroke="#333"/><text x="{pad}" y="{height - 10}">0 s</text>'
            f'<text x="{width - pad}" y="{height - 10}" text-anchor="end">{span:.1f} s</text>'
            f'<text x="{pad + 4}" y="{pad - 6}">{total:,} images</text>'
            f'<text x="{width / 2:.0f}" y="{height - 10}" text-anchor="middle">seconds since '
            'the first commit</text></svg>')


def _unit_commit_times(output: str, options: storage.StorageOptions) -> dict[str, float]:
    """unit id -> modification time (epoch seconds) of its ledger file: when it committed."""
    fs, path = storage.filesystem(meta_uri(output, "ledger"), options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    times = {}
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if not (name.startswith("unit-") and name.endswith(".parquet")):
            continue
        when = entry.get("mtime") or entry.get("LastModified")
        if hasattr(when, "timestamp"):
            when = when.timestamp()
        if when is not None:
            times[name[len("unit-"):-len(".parquet")]] = float(when)
    return times


# --- the page --------------------------------------------------------------------------------

# Sets data-loaded="true" on <body> once every <img> has decoded (checked by the browser test).
_SCRIPT = ("window.addEventListener('load',function(){var i=Array.prototype.slice.call("
           "document.images);document.body.setAttribute('data-images',String(i.length));"
           "document.body.setAttribute('data-loaded',i.every(function(e){return e.complete&&"
           "e.naturalWidth>0})?'true':'false')});")
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
# No network at all, and no script but ours: a key that slipped past escaping could not run.
_CSP = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{_SCRIPT_HASH}'")
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right}
.key{font-family:ui-monospace,monospace;word-break:break-all;max-width:420px}
.note{color:#666}.bad{color:#b03a2e}pre{background:#f7f7f7;padding:8px;overflow:auto;
max-height:420px}.pair{display:flex;gap:12px;align-items:flex-start}
.pair figure{margin:0}.pair img{image-rendering:pixelated;border:1px solid #999}
figcaption{font-size:12px;color:#555}.chart text{font-size:11px}
"""


def _esc(value: Any) -> str:
    return html.escape(_fmt(value), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for value in row:
            kind = ' class="num"' if isinstance(value, (int, float)) else ""
            cells.append(f"<td{kind}>{_esc(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _read_json(uri: str, options: storage.StorageOptions) -> dict[str, Any]:
    if not storage.exists(uri, options):
        return {}
    return json.loads(storage.read_bytes(uri, options))


def write_report(output_uri: str, options: storage.StorageOptions = DEFAULT_OPTIONS,
                 sample: int = 6, k: float = OUTLIER_K, threshold: float | None = None,
                 digest: Digest | None = None) -> str:
    """Write ``OUTPUT/_restorer/report.html`` for the job at ``output_uri``; return its URI.

    One pass over the ledger (streamed) gives the counts, the outliers (:func:`scan_outliers`
    with ``k`` and ``threshold``), per-unit commit counts and samples of the timings; the error
    table streams ``errors.parquet``. ``sample`` images (the most changed flagged ones, then
    randomly chosen others) are read back, input and output, for side-by-side crops of
    ``CROP`` input pixels at the place that changed most; 16-bit images are shown scaled to
    8-bit. Every string from the job (keys, messages, the spec) is HTML-escaped.

    With run digests (``_restorer/digests/``, written by restorer since ledger format 2, or
    ``digest``, the job's, from :func:`restorer.digest.job_digest`) the counts, outliers,
    timings, samples and commit timeline come from them instead: no ledger file is read, so
    the page costs the same for a thousand images as for millions.

    Raises ``JobError`` when the output holds no job (no ``_restorer/job.json``).
    """
    if sample < 0:
        raise ValueError(f"sample = {sample}; need 0 or more images")
    job = _read_json(meta_uri(output_uri, "job.json"), options)
    if not job:
        raise JobError(f"{output_uri} holds no restorer job (no _restorer/job.json)")
    summary = _read_json(meta_uri(output_uri, "summary.json"), options)
    spec = job.get("spec") or summary.get("spec") or {}
    layout = (spec.get("output") or {}).get("layout", "files")

    if digest is None and storage.list_names(meta_uri(output_uri, DIGEST_DIR), options):
        digest = job_digest(output_uri, options, save=False)
    if digest is not None:
        return _write_page(output_uri, options, job, summary, spec, layout, sample,
                           *_from_digest(digest, k, threshold))
    columns = ["key", "uri", "out_key", "unit", "status", "change_mean", "change_p99",
               "residual_structure", "model_seconds"]
    per_unit: dict[str, int] = {}
    seconds = _Reservoir(RESERVOIR, seed=1)
    changes = _Reservoir(RESERVOIR, seed=3)
    structures = _Reservoir(RESERVOIR, seed=4)
    others = _Reservoir(max(4 * sample, 1), seed=2)
    tally = {"records": 0, "ok": 0}

    def ok_records() -> Iterator[dict[str, Any]]:
        for record in ledger_records(output_uri, columns, options):
            tally["records"] += 1
            per_unit[record["unit"]] = per_unit.get(record["unit"], 0) + 1
            if record["status"] != "ok":
                continue
            tally["ok"] += 1
            if record.get("model_seconds"):
                seconds.add(float(record["model_seconds"]))
            if record.get("change_mean") is not None and math.isfinite(record["change_mean"]):
                changes.add(float(record["change_mean"]))
            structure = record.get("residual_structure")
            if structure is not None and math.isfinite(structure):
                structures.add(float(structure))
            others.add({c: record.get(c) for c in ("key", "uri", "out_key", "unit",
                                                   "change_mean", "change_p99",
                                                   "residual_structure")})
            yield record

    flagged, stats = scan_outliers(ok_records(), k=k, threshold=threshold)
    commits = sorted((when, per_unit[u]) for u, when in
                     _unit_commit_times(output_uri, options).items() if u in per_unit)
    return _write_page(output_uri, options, job, summary, spec, layout, sample, tally, flagged,
                       stats, changes.items, structures.items, seconds, others, commits, None)


def _from_digest(digest: Digest, k: float, threshold: float | None) -> tuple:
    """What :func:`_write_page` needs, from a job's digest instead of a ledger scan."""
    flagged, stats = flag_from_digest(digest, k, MIN_SPREAD, MIN_RECORDS, threshold)
    seconds = _Reservoir(RESERVOIR, seed=1)
    seconds.items, seconds.seen = list(digest.seconds), digest.seen
    others = _Reservoir(len(digest.sample) or 1, seed=2)
    others.items, others.seen = list(digest.sample), len(digest.sample)
    commits = sorted((when, count) for when, count in digest.timeline)
    tally = {"records": digest.records, "ok": digest.succeeded}
    return (tally, flagged, stats, histogram_values(digest.change_mean),
            histogram_values(digest.residual_structure, step=STRUCTURE_STEP), seconds, others,
            commits, {"total": digest.failed, "by_class": digest.errors_by_class})


def _write_page(output_uri: str, options: storage.StorageOptions, job: dict[str, Any],
                summary: dict[str, Any], spec: dict[str, Any], layout: str, sample: int,
                tally: dict[str, int], flagged: list[dict[str, Any]], stats: dict[str, Any],
                changes: Sequence[float], structures: Sequence[float], seconds: _Reservoir,
                others: _Reservoir, commits: list[tuple[float, int]],
                error_counts: dict[str, Any] | None) -> str:
    sections = [_summary_section(summary, tally),
                _throughput_section(commits, seconds, summary, job),
                _errors_section(output_uri, options, error_counts),
                _flagged_section(flagged, stats, changes, structures),
                _samples_section(output_uri, options, layout, flagged, others, sample),
                _provenance_section(job, summary, spec)]
    title = f"restorer report: {output_uri}"
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script>{_SCRIPT}</script></head><body>"
        f"<h1>{html.escape(title)}</h1>" + "".join(sections) + "</body></html>\n")
    uri = report_uri(output_uri)
    storage.write_bytes(uri, page.encode("utf-8"), options)
    log.info("report written to %s (%d records, %d flagged)", uri, tally["records"], len(flagged))
    return uri


def _summary_section(summary: dict[str, Any], tally: dict[str, int]) -> str:
    parts = ['<section id="summary"><h2>Summary</h2>']
    if summary:
        names = ["status", "total", "succeeded", "failed", "skipped", "elapsed_seconds",
                 "startup_seconds", "images_per_second", "steady_images_per_second",
                 "megapixels", "resumed"]
        parts.append("<p>This run (<code>summary.json</code>):</p>")
        parts.append(_table(["", "value"], [(n, summary[n]) for n in names if n in summary]))
        if summary.get("errors_by_class"):
            parts.append(_table(["error class", "images (this run)"],
                                sorted(summary["errors_by_class"].items())))
    else:
        parts.append('<p class="note">No <code>summary.json</code>: the job is running, or '
                     "its last run stopped before the end. Counts below come from the ledger."
                     "</p>")
    parts.append("<p>Whole job (every run so far, from the ledger):</p>")
    parts.append(_table(["", "value"], [("records", tally["records"]),
                                        ("succeeded", tally["ok"]),
                                        ("failed", tally["records"] - tally["ok"])]))
    return "".join(parts) + "</section>"


def _throughput_section(commits: list[tuple[float, int]], seconds: _Reservoir,
                        summary: dict[str, Any], job: dict[str, Any]) -> str:
    """``commits``: (epoch seconds, images committed then), sorted."""
    parts = ['<section id="throughput"><h2>Throughput</h2>']
    if summary.get("elapsed_seconds"):
        parts.append(f"<p>This run: {_esc(summary.get('images_per_second'))} images/s overall, "
                     f"{_esc(summary.get('steady_images_per_second'))} images/s after the "
                     f"first result ({_esc(summary.get('startup_seconds'))} s of start-up).</p>")
    if len(commits) >= 2 and commits[-1][0] > commits[0][0]:
        start = commits[0][0]
        created = job.get("created")
        if isinstance(created, (int, float)) and created < start:
            start = created  # the run that made the first unit started here
        points, total = [(0.0, 0)], 0
        for when, count in commits:
            total += count
            points.append((when - start, total))
        parts.append("<p>Images committed over time, from the ledger files' modification "
                     "times (one step per work unit; a resumed job shows its runs one after "
                     "the other):</p>" + _svg_cumulative(points))
    else:
        parts.append('<p class="note">Not enough timing information in the ledger for a '
                     "throughput chart (fewer than two work units with distinct commit times)."
                     "</p>")
    if seconds.items:
        sampled = (f" (a sample of {len(seconds.items):,} of {seconds.seen:,})"
                   if seconds.seen > len(seconds.items) else "")
        parts.append(f"<p>Model seconds per image{sampled}: each image's share of its "
                     "actor batch, median "
                     f"{_esc(float(np.median(seconds.items)))} s.</p>"
                     + _svg_histogram(seconds.items, "model seconds per image"))
    return "".join(parts) + "</section>"


def _errors_section(output: str, options: storage.StorageOptions,
                    counts: dict[str, Any] | None = None) -> str:
    """With ``counts`` (``total``, ``by_class``, from digests) only the error files holding the
    rows shown are read."""
    rows, by_class, total = [], {}, 0
    batches = table_batches(meta_uri(output, "errors.parquet"),
                            ["key", "unit", "stage", "error_class", "message"], options)
    for batch in batches:
        if counts is not None and len(rows) >= MAX_ERRORS_SHOWN:
            batches.close()
            break
        for record in batch.to_pylist():
            total += 1
            by_class[record.get("error_class")] = by_class.get(record.get("error_class"), 0) + 1
            if len(rows) < MAX_ERRORS_SHOWN:
                message = record.get("message") or ""
                rows.append((record.get("key"), record.get("stage"), record.get("error_class"),
                             message[:300] + ("..." if len(message) > 300 else "")))
    if counts is not None:
        total, by_class = counts["total"], dict(counts["by_class"])
    parts = [f'<section id="errors"><h2>Errors ({total:,})</h2>']
    if not total:
        parts.append("<p>No errors.</p>")
    else:
        parts.append(_table(["error class", "images"], sorted(by_class.items(),
                                                              key=lambda i: -i[1])))
        if total > len(rows):
            parts.append(f'<p class="note">The first {len(rows):,} of {total:,}; the rest are '
                         "in <code>_restorer/errors.parquet</code>.</p>")
        parts.append(_table(["key", "stage", "error class", "message"], rows))
    return "".join(parts) + "</section>"


def _flagged_section(flagged: list[dict[str, Any]], stats: dict[str, Any],
                     values: Sequence[float], structures: Sequence[float] = ()) -> str:
    changes, p99 = stats["change_mean"], stats["change_p99"]
    parts = [f'<section id="flagged"><h2>Flagged images ({len(flagged):,})</h2>']
    if changes is None:
        parts.append(f'<p class="note">Fewer than {MIN_RECORDS} successful images: no typical '
                     "change to compare against.</p>")
    else:
        parts.append(
            f"<p>Change = |output - input| in 8-bit levels, measured by the actor on a <=256px "
            f"view. Over {stats['images']:,} successful images"
            f"{' (medians from a sample)' if stats['sampled'] else ''}: mean change median "
            f"{changes['median']:.2f}, cutoff {changes['cutoff']:.2f}; p99 change median "
            f"{p99['median']:.2f}, cutoff {p99['cutoff']:.2f} (median + {stats['k']:g} x "
            f"max(1.4826 MAD, {stats['min_spread']:g})).</p>"
            + _svg_histogram(values, "mean change per image (8-bit levels)", changes["cutoff"]))
    structure = stats.get("residual_structure")
    if structure is not None and structures:
        parts.append(
            "<p>Residual structure = what the model removed (input - output, the method "
            "noise), scored by the actor on a central <=256px crop from 0 (noise-like: even "
            "grain, unrelated to the image) to 1 (the image's own edges, text and texture). "
            f"Median {structure['median']:.3f}, cutoff {structure['cutoff']:.3f} (median + "
            f"{stats['k']:g} x max(1.4826 MAD, {MIN_SPREAD_STRUCTURE:g})); images changed by "
            f"under {MIN_STRUCTURE_CHANGE:g} level on average are not flagged for it. A high "
            "score says the model took detail away: compare the amplified residual crops "
            "below.</p>"
            + _svg_histogram(structures, "residual structure per image (0 noise-like, 1 "
                             "structure)", structure["cutoff"], span=(0.0, 1.0)))
    elif changes is not None:
        parts.append('<p class="note">No residual structure in this ledger (written before '
                     "restorer measured it).</p>")
    if flagged:
        parts.append(_table(["key", "change mean", "change p99", "residual structure",
                             "reason"],
                            [(f["key"], round(f["change_mean"], 2), round(f["change_p99"], 2),
                              "" if f.get("residual_structure") is None
                              else round(f["residual_structure"], 3), f["reason"])
                             for f in flagged]))
        if stats["truncated"]:
            parts.append('<p class="bad">More images are above the cutoff than are listed.</p>')
    else:
        parts.append("<p>No image changed far more, or lost more structure, than the rest.</p>")
    return "".join(parts) + "</section>"


def _samples_section(output: str, options: storage.StorageOptions, layout: str,
                     flagged: list[dict[str, Any]], others: _Reservoir, sample: int) -> str:
    # The most changed and the most structure-losing flagged images, in turns.
    by_structure = sorted((f for f in flagged if "residual_structure " in f["reason"]),
                          key=lambda f: -f["residual_structure"])
    turns = [f for pair in itertools.zip_longest(flagged, by_structure) for f in pair if f]
    chosen: list[dict[str, Any]] = []
    for entry in turns:
        if len(chosen) >= (max(1, sample // 2) if sample else 0):
            break
        if all(entry["key"] != c["key"] for c in chosen):
            chosen.append(dict(entry, why="flagged"))
    keys = {f["key"] for f in flagged}
    for record in sorted(others.items, key=lambda r: r["key"]):
        if len(chosen) >= sample:
            break
        if record["key"] not in keys:
            chosen.append(dict(record, why="random"))
    parts = ['<section id="samples"><h2>Before / after / residual</h2>',
             (f"<p>{CROP}px crops of the input, the output and what the model removed (input "
              "- output, amplified, mid-gray = 0) at the same place (where the output changed "
              "most), for the most changed and the most structure-losing flagged images and a "
              "few others. A residual of even grain is noise removed; edges, letters or "
              "texture in it are detail removed. Noise is the input's estimated noise level "
              "(Immerkær, 8-bit levels; texture raises it).</p>")]
    if not chosen:
        parts.append("<p>No successful images to show.</p>")
    for record in chosen:
        crops = _crops(output, record, layout, options)
        head = (f'<h3 class="key">{_esc(record["key"])}</h3><p>{_esc(record["why"])}: '
                f"change mean {record['change_mean']:.2f}, p99 {record['change_p99']:.2f}"
                + ("" if record.get("residual_structure") is None
                   else f", residual structure {record['residual_structure']:.3f}"))
        if "note" in crops:
            parts.append(head + f'</p><p class="note">{_esc(crops["note"])}</p>')
            continue
        size = crops["display"]
        parts.append(
            head + (f"; input noise ~{crops['noise']:.1f}" if crops["noise"] is not None else "")
            + f"; {_esc(crops['where'])}</p>"
            '<div class="pair">'
            f'<figure><img src="{crops["before"]}" width="{size}" height="{size}" '
            f'alt="input crop"><figcaption>input</figcaption></figure>'
            f'<figure><img src="{crops["after"]}" width="{size}" height="{size}" '
            f'alt="output crop"><figcaption>output</figcaption></figure>'
            f'<figure><img src="{crops["residual"]}" width="{size}" height="{size}" '
            f'alt="residual crop"><figcaption>residual (input - output) x{crops["gain"]:.3g}'
            "</figcaption></figure></div>")
    return "".join(parts) + "</section>"


def _provenance_section(job: dict[str, Any], summary: dict[str, Any],
                        spec: dict[str, Any]) -> str:
    rows = [("model", job.get("model") or summary.get("model", "")),
            ("model sha256", summary.get("model_sha256")
             or (job.get("fingerprint") or {}).get("model_sha256", "unknown")),
            ("job fingerprint sha256", job.get("fingerprint_sha256", "")),
            ("ledger format version", job.get("ledger_format_version", ""))]
    return ('<section id="provenance"><h2>Spec and model</h2>' + _table(["", "value"], rows)
            + f"<pre>{html.escape(json.dumps(spec, indent=2, sort_keys=True))}</pre></section>")


def write_train_report(run_uri: str, summary: dict[str, Any], history: list[dict[str, Any]],
                       curves_png: bytes, samples: list[dict[str, Any]],
                       options: storage.StorageOptions = DEFAULT_OPTIONS) -> str:
    """Write ``RUN/report.html`` for a training run; returns its URI.

    ``samples``: dicts with ``name``, uint8 HWC ``degraded``/``restored``/``clean`` crops and
    their ``input_psnr``/``psnr``. The page holds the run's summary, the loss and validation
    PSNR curves, the validation history and before/after crops on the validation set.
    """
    curves = "data:image/png;base64," + base64.b64encode(curves_png).decode("ascii")
    final = summary.get("final", {})
    rows = [(k, final[k]) for k in sorted(final)]
    sections = [
        '<section id="summary"><h2>Summary</h2>'
        + _table(["", "value"], [("run", summary.get("name")), ("steps", summary.get("steps")),
                                 ("elapsed_seconds", summary.get("elapsed_seconds")),
                                 ("best_val_psnr", summary.get("best_val_psnr")), *rows])
        + "</section>",
        ('<section id="curves"><h2>Curves</h2><p>Training loss (blue) and validation PSNR '
         f'(red) by step.</p><img src="{curves}" alt="loss and validation PSNR"></section>'),
        '<section id="history"><h2>Validation history</h2>'
        + _table(["step", "loss", "val_psnr", "val_ssim", "val_input_psnr", "seconds"],
                 [(h.get("step"), h.get("loss"), h.get("val_psnr"), h.get("val_ssim"),
                   h.get("val_input_psnr"), h.get("seconds")) for h in history])
        + "</section>",
    ]
    figures = ['<section id="samples"><h2>Before / after (validation set)</h2>']
    if not samples:
        figures.append("<p>No validation images were given (data.val_uri).</p>")
    for sample in samples:
        figures.append(f"<h3>{_esc(sample['name'])}</h3><div class=\"pair\">")
        for label, key in (("degraded", "degraded"), ("restored", "restored"),
                           ("clean", "clean")):
            caption = label
            if key == "degraded":
                caption += f" ({sample['input_psnr']:.2f} dB)"
            elif key == "restored":
                caption += f" ({sample['psnr']:.2f} dB)"
            figures.append(f'<figure><img src="{_png_data_uri(sample[key])}" alt="{label}">'
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        figures.append("</div>")
    figures.append("</section>")
    sections.append("".join(figures))
    sections.append('<section id="provenance"><h2>Spec</h2><pre>'
                    + html.escape(json.dumps(summary.get("spec", {}), indent=2)) + "</pre></section>")
    title = f"restorer training report: {summary.get('name', '')}"
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
            f"<script>{_SCRIPT}</script></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "".join(sections) + "</body></html>\n")
    uri = storage.join(run_uri, "report.html")
    storage.write_bytes(uri, page.encode("utf-8"), options)
    return uri
