"""Run digests: what a restore run committed, in a few kilobytes, so that the end of a job, the
report and ``restorer inspect`` need not read every ledger unit file back.

Each run keeps a :class:`Digest` while it commits units and writes it (every
``FLUSH_SECONDS`` and at its end) to ``OUTPUT/_restorer/digests/run-<id>.json``: counts,
errors by class, the ids of the units it committed, histograms of the change columns
(``HISTOGRAM_STEP`` 8-bit levels a bin) and of ``residual_structure`` (``STRUCTURE_STEP`` a
bin, on its 0-1 scale), the ``TOP`` most changed images by mean and by 99th percentile, the
``TOP`` images with the most residual structure (all of them, and those changed by at least
``MIN_STRUCTURE_CHANGE`` levels: the flag candidates), small reservoir samples (model seconds,
images to show) and a commit timeline.
:func:`job_digest` merges the runs' digests; units the ledger holds but no digest covers (a run
killed between two flushes, an output of restorer before digests) are read from their ledger
files once and saved as a digest of their own, so each unit file is read at most once in the
life of a job. A unit redone by ``--retry-failed`` retracts its earlier records (the redoing
run reads that one unit file before replacing it).

Medians from histograms are exact to half a bin (0.005 levels, 0.0005 of residual structure);
flagging compares the top candidates with median + k * max(1.4826 MAD, min_spread) as
:func:`restorer.report.scan_outliers` does from the ledger.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from restorer.errors import JobError
from restorer.io import storage
from restorer.output.ledger import ledger_units, meta_uri, unit_records

log = logging.getLogger(__name__)

DIGEST_DIR = "digests"  # under OUTPUT/_restorer/
DIGEST_VERSION = 1
HISTOGRAM_STEP = 0.01  # 8-bit levels per histogram bin
STRUCTURE_STEP = 0.001  # residual_structure (0-1) per histogram bin
# residual_structure is flagged with its own floor of the spread, and only in images changed by
# at least MIN_STRUCTURE_CHANGE levels on average (restorer.report says why).
MIN_SPREAD_STRUCTURE = 0.05
MIN_STRUCTURE_CHANGE = 1.0
TOP = 100  # most changed images kept per column (the flagged list is cut from these)
SAMPLE = 24  # successful images kept at random, for the report's before/after crops
SECONDS_SAMPLE = 2000  # model seconds per image kept at random, for the report's histogram
TIMELINE_POINTS = 200  # (seconds, images committed) points kept per run
FLUSH_SECONDS = 60.0  # a running job rewrites its digest this often
CARRIED = ("unit", "uri", "out_key")  # record fields a candidate keeps
RECORD_COLUMNS = ["key", "uri", "out_key", "unit", "status", "error_class", "change_mean",
                  "change_p99", "residual_structure", "model_seconds", "width", "height", "in_bytes", "out_bytes"]


@dataclass
class Digest:
    """A run's (or a whole job's) compact account of its committed records."""

    run: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S")
                     + "-" + uuid.uuid4().hex[:8])
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    records: int = 0
    succeeded: int = 0
    failed: int = 0
    errors_by_class: dict[str, int] = field(default_factory=dict)
    megapixels: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0
    units: list[str] = field(default_factory=list)  # committed by this run
    replaced: list[str] = field(default_factory=list)  # redone here, earlier records retracted
    change_mean: dict[str, int] = field(default_factory=dict)  # histogram bin -> images
    change_p99: dict[str, int] = field(default_factory=dict)
    residual_structure: dict[str, int] = field(default_factory=dict)  # STRUCTURE_STEP bins
    top_mean: list[dict[str, Any]] = field(default_factory=list)
    top_p99: list[dict[str, Any]] = field(default_factory=list)
    top_structure: list[dict[str, Any]] = field(default_factory=list)  # for inspect --sort
    top_structure_changed: list[dict[str, Any]] = field(default_factory=list)  # flag candidates
    sample: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    seen: int = 0  # successful images offered to the reservoirs
    timeline: list[list[float]] = field(default_factory=list)  # [epoch seconds, images
    # committed since the previous point]
    version: int = DIGEST_VERSION

    def __post_init__(self) -> None:
        self._random = random.Random(self.run)  # reservoirs: reproducible for a run id

    def add(self, record: dict[str, Any]) -> None:
        """Count one ledger record (a dict with at least ``key``, ``status``)."""
        self.records += 1
        self.input_bytes += int(record.get("in_bytes") or 0)
        if record.get("status") != "ok":
            self.failed += 1
            name = record.get("error_class") or ""
            self.errors_by_class[name] = self.errors_by_class.get(name, 0) + 1
            return
        self.succeeded += 1
        self.output_bytes += int(record.get("out_bytes") or 0)
        self.megapixels += (record.get("width") or 0) * (record.get("height") or 0) / 1e6
        mean, p99 = record.get("change_mean"), record.get("change_p99")
        self.seen += 1
        rng = self._random
        if record.get("model_seconds"):
            _reservoir(self.seconds, float(record["model_seconds"]), SECONDS_SAMPLE,
                       self.seen, rng)
        if mean is None or p99 is None or not (math.isfinite(mean) and math.isfinite(p99)):
            return
        structure = _structure(record)
        entry = {"key": record["key"], "change_mean": round(float(mean), 3),
                 "change_p99": round(float(p99), 3),
                 "residual_structure": None if structure is None else round(structure, 3),
                 **{f: record[f] for f in CARRIED if f in record}}
        _reservoir(self.sample, entry, SAMPLE, self.seen, rng)
        for histogram, bin_ in self._bins(float(mean), float(p99), structure):
            histogram[bin_] = histogram.get(bin_, 0) + 1
        for top, name in ((self.top_mean, "change_mean"), (self.top_p99, "change_p99")):
            _keep_top(top, entry, name)
        if structure is not None:
            _keep_top(self.top_structure, entry, "residual_structure")
            if float(mean) >= MIN_STRUCTURE_CHANGE:
                _keep_top(self.top_structure_changed, entry, "residual_structure")

    def _bins(self, mean: float, p99: float, structure: float | None
              ) -> Iterator[tuple[dict[str, int], str]]:
        yield self.change_mean, str(_bin(mean))
        yield self.change_p99, str(_bin(p99))
        if structure is not None:
            yield self.residual_structure, str(_bin(structure, STRUCTURE_STEP))

    def retract(self, records: Iterable[dict[str, Any]], unit: str) -> None:
        """Take back the earlier records of ``unit``, which this run redoes."""
        self.replaced.append(unit)
        for record in records:
            self.records -= 1
            self.input_bytes -= int(record.get("in_bytes") or 0)
            if record.get("status") != "ok":
                self.failed -= 1
                name = record.get("error_class") or ""
                self.errors_by_class[name] = self.errors_by_class.get(name, 0) - 1
                if not self.errors_by_class[name]:
                    del self.errors_by_class[name]
                continue
            self.succeeded -= 1
            self.output_bytes -= int(record.get("out_bytes") or 0)
            self.megapixels -= (record.get("width") or 0) * (record.get("height") or 0) / 1e6
            mean, p99 = record.get("change_mean"), record.get("change_p99")
            if mean is None or p99 is None or not (math.isfinite(mean) and math.isfinite(p99)):
                continue
            for histogram, bin_ in self._bins(float(mean), float(p99), _structure(record)):
                histogram[bin_] = histogram.get(bin_, 0) - 1
                if not histogram[bin_]:
                    del histogram[bin_]

    def commit(self, unit: str, images: int) -> None:
        """Note a committed unit (its records were :meth:`add`-ed)."""
        self.units.append(unit)
        if len(self.timeline) >= TIMELINE_POINTS:
            # pair the points up: the timeline stays bounded and still covers the whole run
            pairs = zip(self.timeline[0::2], self.timeline[1::2])
            self.timeline = [[b[0], a[1] + b[1]] for a, b in pairs] + (
                [self.timeline[-1]] if len(self.timeline) % 2 else [])
        self.timeline.append([round(time.time(), 3), images])

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Digest:
        values = json.loads(data)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def _bin(value: float, step: float = HISTOGRAM_STEP) -> int:
    return max(0, round(value / step))


def _structure(record: dict[str, Any]) -> float | None:
    """A record's finite ``residual_structure``, or None (ledgers written before it)."""
    value = record.get("residual_structure")
    return float(value) if value is not None and math.isfinite(value) else None


def _reservoir(items: list, item: Any, size: int, seen: int, rng: random.Random) -> None:
    if len(items) < size:
        items.append(item)
    else:
        index = rng.randrange(seen)
        if index < size:
            items[index] = item


def _keep_top(top: list[dict[str, Any]], entry: dict[str, Any], name: str) -> None:
    """Keep ``top`` as the ``TOP`` largest entries by ``name`` (ties: the greater key), a plain
    JSON-able list kept as a binary min-heap on ``(name, key)``, so that ``top[0]`` is the
    least and an entry that does not beat it costs one comparison."""
    if len(top) < TOP:
        top.append(entry)
        _sift_up(top, len(top) - 1, name)
    elif (entry[name], entry["key"]) > (top[0][name], top[0]["key"]):
        top[0] = entry
        _sift_down(top, 0, name)


def _sift_up(heap: list[dict[str, Any]], index: int, name: str) -> None:
    while index:
        parent = (index - 1) // 2
        if (heap[index][name], heap[index]["key"]) >= (heap[parent][name], heap[parent]["key"]):
            return
        heap[index], heap[parent] = heap[parent], heap[index]
        index = parent


def _sift_down(heap: list[dict[str, Any]], index: int, name: str) -> None:
    while True:
        least = index
        for child in (2 * index + 1, 2 * index + 2):
            if child < len(heap) and ((heap[child][name], heap[child]["key"])
                                      < (heap[least][name], heap[least]["key"])):
                least = child
        if least == index:
            return
        heap[index], heap[least] = heap[least], heap[index]
        index = least


# --- the whole job ---------------------------------------------------------------------------

def digest_uri(output: str, run: str) -> str:
    return meta_uri(output, DIGEST_DIR, f"run-{run}.json")


def write(output: str, digest: Digest, options: storage.StorageOptions) -> None:
    """Publish ``digest`` (replacing this run's earlier version)."""
    storage.write_bytes(digest_uri(output, digest.run), digest.to_json(), options)


def read_all(output: str, options: storage.StorageOptions) -> list[Digest]:
    """The digests of every run so far, oldest first (one GET per run)."""
    folder = meta_uri(output, DIGEST_DIR)
    digests = []
    for name in storage.list_names(folder, options):
        if name.startswith("run-") and name.endswith(".json"):
            digests.append(Digest.from_json(storage.read_bytes(storage.join(folder, name),
                                                               options)))
            if digests[-1].version > DIGEST_VERSION:  # its fields may mean something else
                raise JobError(f"{storage.join(folder, name)} is a run digest of format "
                               f"{digests[-1].version}, written by a newer restorer (this one "
                               f"reads format {DIGEST_VERSION}); upgrade restorer to read "
                               f"{output}")
    return sorted(digests, key=lambda d: (d.started, d.run))


def job_digest(output: str, options: storage.StorageOptions,
               units: set[str] | None = None, save: bool = True) -> Digest:
    """The whole job's digest: every run's merged, plus the units no digest covers, read from
    the ledger (and, with ``save``, written as a digest of their own, so they are read once).

    ``units``: the ledger's unit ids, when the caller knows them (else they are listed).
    """
    runs = read_all(output, options)
    if units is None:
        units = ledger_units(output, options)
    covered: set[str] = set()
    for run in runs:
        covered.update(run.units)
    missing = sorted(units - covered)
    if missing:
        log.info("%d ledger units are in no run digest (a run that ended without writing "
                 "one, or an output of an older restorer); reading them once", len(missing))
        recovered = Digest(run="recovered-" + uuid.uuid4().hex[:8], started=0.0)
        for unit in missing:
            records = unit_records(output, unit, options, RECORD_COLUMNS)
            for record in records:
                recovered.add(record)
            recovered.units.append(unit)
        recovered.finished = time.time()
        if save:
            write(output, recovered, options)
        runs.insert(0, recovered)
    return merge(runs)


def merge(runs: Sequence[Digest]) -> Digest:
    """Runs' digests (oldest first) as one; candidates of units a later run redid are dropped."""
    job = Digest(run="job", started=min((r.started for r in runs), default=0.0))
    replaced_after: list[set[str]] = []
    later: set[str] = set()
    for run in reversed(runs):
        replaced_after.append(set(later))
        later |= set(run.replaced)
    replaced_after.reverse()
    for run, replaced in zip(runs, replaced_after):
        for name in ("records", "succeeded", "failed", "megapixels", "input_bytes",
                     "output_bytes", "seen"):
            setattr(job, name, getattr(job, name) + getattr(run, name))
        for name, count in run.errors_by_class.items():
            job.errors_by_class[name] = job.errors_by_class.get(name, 0) + count
        for mine, theirs in ((job.change_mean, run.change_mean), (job.change_p99, run.change_p99),
                             (job.residual_structure, run.residual_structure)):
            for bin_, count in theirs.items():
                mine[bin_] = mine.get(bin_, 0) + count
        for top, theirs, name in ((job.top_mean, run.top_mean, "change_mean"),
                                  (job.top_p99, run.top_p99, "change_p99"),
                                  (job.top_structure, run.top_structure, "residual_structure"),
                                  (job.top_structure_changed, run.top_structure_changed,
                                   "residual_structure")):
            for entry in theirs:
                if entry.get("unit") not in replaced:
                    _keep_top(top, entry, name)
        job.sample.extend(e for e in run.sample if e.get("unit") not in replaced)
        job.seconds.extend(run.seconds)
        job.units.extend(run.units)
        job.replaced.extend(run.replaced)
        job.timeline.extend(run.timeline)
        job.finished = max(job.finished, run.finished)
    job.errors_by_class = {k: v for k, v in job.errors_by_class.items() if v}
    return job


def _histogram_median(histogram: dict[int, int], total: int,
                      step: float = HISTOGRAM_STEP) -> float:
    middle, seen = (total - 1) / 2, 0
    low = high = None
    for bin_ in sorted(histogram):
        seen += histogram[bin_]
        if low is None and seen > math.floor(middle):
            low = bin_
        if seen > math.ceil(middle):
            high = bin_
            break
    return (low + high) / 2 * step


def robust(histogram: dict[str, int], k: float, min_spread: float,
           step: float = HISTOGRAM_STEP) -> dict[str, float]:
    """``{median, spread, cutoff}`` of a histogram of ``step``-wide bins (as
    :func:`restorer.report.stats._robust`)."""
    counts = {int(b): n for b, n in histogram.items() if n > 0}
    total = sum(counts.values())
    median = _histogram_median(counts, total, step)
    deviations: dict[int, int] = {}
    for bin_, count in counts.items():
        away = _bin(abs(bin_ * step - median), step)
        deviations[away] = deviations.get(away, 0) + count
    spread = max(1.4826 * _histogram_median(deviations, total, step), min_spread)
    return {"median": median, "spread": spread, "cutoff": median + k * spread}



def outlier_reasons(entry: dict[str, Any], stats: dict[str, Any], k: float,
                    threshold: float | None) -> list[str]:
    """Why ``entry`` is an outlier (empty if it is not): each of change_mean, change_p99 and
    residual_structure above its cutoff (structure only with a visible change), and
    change_mean above ``threshold``. Shared by the digest and the ledger-scan paths."""
    reasons = []
    for name in ("change_mean", "change_p99", "residual_structure"):
        figures, value = stats.get(name), entry.get(name)
        if figures and value is not None and value > figures["cutoff"] and (
                name != "residual_structure" or entry["change_mean"] >= MIN_STRUCTURE_CHANGE):
            digits = 3 if name == "residual_structure" else 2
            reasons.append(f"{name} {value:.{digits}f} > typical "
                           f"{figures['median']:.{digits}f} + {k:g} x "
                           f"{figures['spread']:.{digits}f} = {figures['cutoff']:.{digits}f}")
    if threshold is not None and entry["change_mean"] > threshold:
        reasons.append(f"change_mean {entry['change_mean']:.2f} > threshold {threshold:g}")
    return reasons

def flag(job: Digest, k: float, min_spread: float, min_records: int,
         threshold: float | None = None, limit: int = 100
         ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(flagged, stats)`` from a job digest, in the shape of
    :func:`restorer.report.scan_outliers`: the top candidates above median + k * spread (for
    ``residual_structure``: with a floor of ``MIN_SPREAD_STRUCTURE`` on the spread, in images
    changed by at least ``MIN_STRUCTURE_CHANGE`` levels)."""
    images = sum(job.change_mean.values())
    stats: dict[str, Any] = {"images": images, "k": k, "min_spread": min_spread,
                             "threshold": threshold, "change_mean": None, "change_p99": None,
                             "residual_structure": None, "sampled": False, "truncated": False,
                             "from": "digests"}
    if images >= min_records:
        stats["change_mean"] = robust(job.change_mean, k, min_spread)
        stats["change_p99"] = robust(job.change_p99, k, min_spread)
    if sum(job.residual_structure.values()) >= min_records:
        stats["residual_structure"] = robust(job.residual_structure, k, MIN_SPREAD_STRUCTURE,
                                             STRUCTURE_STEP)
    flagged: dict[str, dict[str, Any]] = {}
    for entry in job.top_mean + job.top_p99 + job.top_structure_changed:
        entry = {"residual_structure": None, **entry}  # digests written before it
        reasons = outlier_reasons(entry, stats, k, threshold)
        if reasons:
            flagged[entry["key"]] = dict(entry, reason="; ".join(reasons))
    for top, name in ((job.top_mean, "change_mean"), (job.top_p99, "change_p99"),
                      (job.top_structure_changed, "residual_structure")):
        figures = stats[name]
        cutoff = min(figures["cutoff"] if figures else math.inf,
                     threshold if threshold is not None and name == "change_mean" else math.inf)
        if len(top) >= TOP and min(e[name] for e in top) > cutoff:
            stats["truncated"] = True
    ordered = sorted(flagged.values(), key=lambda e: (-e["change_mean"], e["key"]))
    stats["truncated"] = stats["truncated"] or len(ordered) > limit
    return ordered[:limit], stats


def histogram_values(histogram: dict[str, int], at_most: int = 20_000,
                     step: float = HISTOGRAM_STEP) -> list[float]:
    """Values standing for a histogram (bin centres, counts scaled to ``at_most`` in all), for
    the report's charts."""
    total = sum(histogram.values())
    scale = min(1.0, at_most / total) if total else 1.0
    values: list[float] = []
    for bin_, count in sorted((int(b), n) for b, n in histogram.items()):
        values.extend([bin_ * step] * max(1, round(count * scale)))
    return values


SORTED_BY = {"change_mean": "top_mean", "change_p99": "top_p99",
             "residual_structure": "top_structure"}  # the candidates ranked by each column


def most_changed(job: Digest, top: int, sort: str = "change_mean") -> list[dict[str, Any]]:
    """The ``top`` (at most ``TOP``) successful images by ``sort`` (a key of ``SORTED_BY``),
    highest first; ``residual_structure`` leaves out images without it."""
    ordered = sorted(getattr(job, SORTED_BY[sort]), key=lambda e: (-e[sort], e["key"]))
    return [{c: e.get(c) for c in ("key", "change_mean", "change_p99", "residual_structure")}
            for e in ordered[:top]]


def iter_errors(batches: Iterator[pa.RecordBatch], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a stream of error batches (stops reading there)."""
    rows: list[dict[str, Any]] = []
    try:
        for batch in batches:
            for row in batch.to_pylist():
                rows.append(row)
                if len(rows) >= limit:
                    return rows
        return rows
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # a generator: stop its reads ahead now

