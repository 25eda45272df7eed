"""The statistics of a restore job's report, read from its ``OUTPUT/_restorer/`` folder.

- Reading: :func:`table_batches` and :func:`ledger_records` stream a job's Parquet tables
  (the ledger, the errors) in Arrow batches of only the columns asked for.
- Outliers: :func:`flag_outliers` streams ledger records and flags the images whose change
  (mean and 99th percentile of ``|output - input|`` in 8-bit levels, measured by the restore
  actor) is far above the job's typical change: a net that hallucinated, a tile that blew up,
  an input unlike the others; and those whose residual (input - output) carries far more image
  structure than the job's typical image (``residual_structure``, :mod:`restorer.image.audit`): a
  net that smoothed away texture, text or fine detail along with the noise.

Both keep bounded state (reservoir samples, top-N heaps), so they work on jobs of millions of
images. Nothing here renders: :mod:`restorer.report.render` turns these figures into the page.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from restorer.errors import SpecError
from restorer.output.digest import MIN_SPREAD_STRUCTURE, MIN_STRUCTURE_CHANGE, outlier_reasons
from restorer.output.ledger import meta_uri

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"

# An image is flagged when its change is above median + OUTLIER_K * spread of the job, where
# spread = max(1.4826 * MAD, MIN_SPREAD). 1.4826 * MAD estimates the standard deviation of a
# normal distribution without being moved by the outliers themselves; K = 5 is ~5 sigma, so a
# well-behaved job flags (almost) nothing, and MIN_SPREAD (8-bit levels) keeps a job of near
# identical images (MAD ~ 0) from flagging an image that changed by a fraction of a level more.
OUTLIER_K = 5.0
MIN_SPREAD = 0.5
# residual_structure (restorer.image.audit, 0-1) is flagged the same way, with its own floor of the
# spread, MIN_SPREAD_STRUCTURE = 0.05: a twentieth of its range (noise-like residuals score
# ~0.06 +- 0.03). An image changed by under MIN_STRUCTURE_CHANGE = 1 level on average is not
# flagged for it: a structured residual that small is invisible (clean images through a denoiser
# score 0.1-0.5 at 0-1.5 levels). Both live in restorer.output.digest, which flags from run digests.
OUTLIER_COLUMNS = ("change_mean", "change_p99", "residual_structure")
MIN_RECORDS = 3  # below this many successful images there is no "typical" change to compare to
RESERVOIR = 20_000  # values kept to estimate medians (exact below this many images)
CARRIED = ("unit", "uri", "out_key")  # record fields a flagged entry keeps when present


# --- reading the ledger ----------------------------------------------------------------------

def report_uri(output: str) -> str:
    """Where :func:`write_report` writes the page: ``OUTPUT/_restorer/report.html``."""
    return meta_uri(output, REPORT_NAME)


# --- outliers --------------------------------------------------------------------------------

class Reservoir:
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
        raise SpecError(f"k = {k}, min_spread = {min_spread}, limit = {limit}: need k > 0, "
                         "min_spread >= 0 and limit >= 1")
    floors = {"change_mean": min_spread, "change_p99": min_spread,
              "residual_structure": MIN_SPREAD_STRUCTURE}
    samples = {name: Reservoir(RESERVOIR) for name in OUTLIER_COLUMNS}
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
    - ``residual_structure`` (0-1, :mod:`restorer.image.audit`) > median + ``k`` * max(1.4826 * MAD,
      ``MIN_SPREAD_STRUCTURE``) over the job's images that have it, and ``change_mean`` >=
      ``MIN_STRUCTURE_CHANGE``: the model removed detail, not noise, or
    - ``change_mean`` > ``threshold``, when an absolute threshold is given.

    Each flagged entry has ``key``, ``change_mean``, ``change_p99``, ``residual_structure``
    (None in ledgers written before it), ``reason`` (why, with the
    numbers) and, when the records had them, ``unit``, ``uri`` and ``out_key``. At most
    ``limit`` entries are returned; a warning is logged when more images may be above a cutoff.
    """
    return scan_outliers(records, k, min_spread, threshold, limit)[0]
