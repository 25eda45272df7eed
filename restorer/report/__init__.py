"""Per-image audit of a restore job and its report page; the report page of a training run.

Read back from a job's ``OUTPUT/_restorer/`` folder after (or during) a run:

- :func:`write_report` writes ``OUTPUT/_restorer/report.html``: one static page (no server, no
  network, no external CSS or JS; crops embedded as ``data:`` URIs) with the summary,
  throughput, errors, flagged images, histograms of change and residual structure,
  input/output/amplified-residual crops and the spec and model provenance.
- :func:`flag_outliers` / :func:`scan_outliers` (:mod:`.stats`) flag the images whose change
  or residual structure is far above the job's typical image.
- :func:`write_train_report` writes ``RUN/report.html`` for a training run.

The package reads top to bottom: this module gathers the figures (:mod:`.stats`: ledger
reads and outlier statistics; :mod:`.crops`: the pixels; :mod:`.charts`: chart geometry) and
hands them to :mod:`.render`, which fills the templates in ``templates/`` (one skeleton,
``base.html``, for both pages; every value escaped by default).

What the ledger cannot tell: the sampled images' pixels; the report decodes those few and
measures their input noise with the actor's estimator (:func:`restorer.audit.input_noise`).
"""

from __future__ import annotations

import base64
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from restorer import storage
from restorer.digest import (
    DIGEST_DIR,
    MIN_SPREAD_STRUCTURE,
    MIN_STRUCTURE_CHANGE,
    STRUCTURE_STEP,
    Digest,
    histogram_values,
    job_digest,
)
from restorer.digest import flag as flag_from_digest
from restorer.errors import JobError, SpecError
from restorer.ledger import (
    DEFAULT_OPTIONS,
    META_DIR,
    READ_AHEAD,
    ledger_records,
    meta_uri,
    read_json,
    table_batches,
    unit_commit_times,
)
from restorer.report import charts, render
from restorer.report.crops import (
    CROP,
    MAX_CROP_DISPLAY,
    MAX_RESIDUAL_GAIN,
    MAX_SEARCH_PIXELS,
    crops,
    estimate_noise,
    png_data_uri,
)
from restorer.report.stats import (
    CARRIED,
    MIN_RECORDS,
    MIN_SPREAD,
    OUTLIER_COLUMNS,
    OUTLIER_K,
    REPORT_NAME,
    RESERVOIR,
    Reservoir,
    _robust,  # noqa: F401 - restorer.digest's docstring and tests compare against it
    flag_outliers,
    report_uri,
    scan_outliers,
)

__all__ = [
    "CARRIED", "CROP", "DEFAULT_OPTIONS", "MAX_CROP_DISPLAY", "MAX_ERRORS_SHOWN",
    "MAX_RESIDUAL_GAIN", "MAX_SEARCH_PIXELS", "META_DIR", "MIN_RECORDS", "MIN_SPREAD",
    "MIN_SPREAD_STRUCTURE", "MIN_STRUCTURE_CHANGE", "OUTLIER_COLUMNS", "OUTLIER_K",
    "READ_AHEAD", "REPORT_NAME", "RESERVOIR", "Reservoir", "estimate_noise",
    "flag_outliers", "ledger_records", "meta_uri", "report_uri", "scan_outliers",
    "table_batches", "write_report", "write_train_report",
]

log = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 200
SUMMARY_FIELDS = ("status", "total", "succeeded", "failed", "skipped", "elapsed_seconds",
                  "startup_seconds", "images_per_second", "steady_images_per_second",
                  "megapixels", "resumed")  # the rows of summary.json the page shows
LEDGER_COLUMNS = ("key", "uri", "out_key", "unit", "status", "change_mean", "change_p99",
                  "residual_structure", "model_seconds")  # what the page reads from a ledger
SAMPLED = ("key", "uri", "out_key", "unit", "change_mean", "change_p99", "residual_structure")


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
        raise SpecError(f"sample = {sample}; need 0 or more images")
    job = read_json(meta_uri(output_uri, "job.json"), options)
    if not job:
        raise JobError(f"{output_uri} holds no restorer job (no _restorer/job.json)")
    if digest is None and storage.list_names(meta_uri(output_uri, DIGEST_DIR), options):
        digest = job_digest(output_uri, options, save=False)
    figures = (_from_digest(digest, k, threshold) if digest is not None
               else _from_ledger(output_uri, options, sample, k, threshold))
    summary = read_json(meta_uri(output_uri, "summary.json"), options)
    spec = job.get("spec") or summary.get("spec") or {}
    layout = (spec.get("output") or {}).get("layout", "files")
    page = render.page(
        "job.html", f"restorer report: {output_uri}", summary=summary,
        summary_rows=[(n, summary[n]) for n in SUMMARY_FIELDS if n in summary],
        tally=figures["tally"],
        timeline=_timeline(figures["commits"], job.get("created")),
        seconds=_seconds(figures["seconds"]),
        errors=_errors(output_uri, options, figures["error_counts"]),
        **_flagged(figures["flagged"], figures["stats"], figures["changes"],
                   figures["structures"]),
        crop=CROP, samples=_samples(output_uri, options, layout, figures["flagged"],
                                    figures["others"], sample),
        provenance_rows=_provenance(job, summary), spec_json=render.spec_json(spec, True))
    uri = report_uri(output_uri)
    storage.write_bytes(uri, page.encode("utf-8"), options)
    log.info("report written to %s (%d records, %d flagged)", uri, figures["tally"]["records"],
             len(figures["flagged"]))
    return uri


def write_train_report(run_uri: str, summary: dict[str, Any], history: list[dict[str, Any]],
                       curves_png: bytes, samples: list[dict[str, Any]],
                       options: storage.StorageOptions = DEFAULT_OPTIONS) -> str:
    """Write ``RUN/report.html`` for a training run; returns its URI.

    ``samples``: dicts with ``name``, uint8 HWC ``degraded``/``restored``/``clean`` crops and
    their ``input_psnr``/``psnr``. The page holds the run's summary, the loss and validation
    PSNR curves, the validation history and before/after crops on the validation set.
    """
    final = summary.get("final", {})
    page = render.page(
        "train.html", f"restorer training report: {summary.get('name', '')}",
        summary_rows=[("run", summary.get("name")), ("steps", summary.get("steps")),
                      ("elapsed_seconds", summary.get("elapsed_seconds")),
                      ("best_val_psnr", summary.get("best_val_psnr")),
                      *((name, final[name]) for name in sorted(final))],
        curves="data:image/png;base64," + base64.b64encode(curves_png).decode("ascii"),
        history_rows=[tuple(h.get(c) for c in ("step", "loss", "val_psnr", "val_ssim",
                                               "val_input_psnr", "seconds")) for h in history],
        samples=[dict(s, **{key: png_data_uri(s[key])
                            for key in ("degraded", "restored", "clean")}) for s in samples],
        spec_json=render.spec_json(summary.get("spec", {})))
    uri = storage.join(run_uri, "report.html")
    storage.write_bytes(uri, page.encode("utf-8"), options)
    return uri


# --- the figures, from a ledger scan or from digests -----------------------------------------

def _from_ledger(output_uri: str, options: storage.StorageOptions, sample: int, k: float,
                 threshold: float | None) -> dict[str, Any]:
    """The page's figures from one streamed pass over the ledger."""
    per_unit: dict[str, int] = {}
    seconds = Reservoir(RESERVOIR, seed=1)
    changes = Reservoir(RESERVOIR, seed=3)
    structures = Reservoir(RESERVOIR, seed=4)
    others = Reservoir(max(4 * sample, 1), seed=2)
    tally = {"records": 0, "ok": 0}

    def ok_records() -> Iterator[dict[str, Any]]:
        for record in ledger_records(output_uri, LEDGER_COLUMNS, options):
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
            others.add({c: record.get(c) for c in SAMPLED})
            yield record

    flagged, stats = scan_outliers(ok_records(), k=k, threshold=threshold)
    commits = sorted((when, per_unit[u]) for u, when in
                     unit_commit_times(output_uri, options).items() if u in per_unit)
    return {"tally": tally, "flagged": flagged, "stats": stats, "changes": changes.items,
            "structures": structures.items, "seconds": seconds, "others": others,
            "commits": commits, "error_counts": None}


def _from_digest(digest: Digest, k: float, threshold: float | None) -> dict[str, Any]:
    """The page's figures from a job's digest instead of a ledger scan."""
    flagged, stats = flag_from_digest(digest, k, MIN_SPREAD, MIN_RECORDS, threshold)
    seconds = Reservoir(RESERVOIR, seed=1)
    seconds.items, seconds.seen = list(digest.seconds), digest.seen
    others = Reservoir(len(digest.sample) or 1, seed=2)
    others.items, others.seen = list(digest.sample), len(digest.sample)
    return {"tally": {"records": digest.records, "ok": digest.succeeded}, "flagged": flagged,
            "stats": stats, "changes": histogram_values(digest.change_mean),
            "structures": histogram_values(digest.residual_structure, step=STRUCTURE_STEP),
            "seconds": seconds, "others": others,
            "commits": sorted((when, count) for when, count in digest.timeline),
            "error_counts": {"total": digest.failed, "by_class": digest.errors_by_class}}


# --- what each section shows -----------------------------------------------------------------

def _timeline(commits: list[tuple[float, int]], created: Any) -> dict[str, Any] | None:
    """The committed-images chart from ``commits`` ((epoch seconds, images), sorted), or None
    with fewer than two distinct commit times."""
    if len(commits) < 2 or commits[-1][0] <= commits[0][0]:
        return None
    start = commits[0][0]
    if isinstance(created, (int, float)) and created < start:
        start = created  # the run that made the first unit started here
    points, total = [(0.0, 0)], 0
    for when, count in commits:
        total += count
        points.append((when - start, total))
    return charts.cumulative(points)


def _seconds(seconds: Reservoir) -> dict[str, Any] | None:
    if not seconds.items:
        return None
    return {"seen": seconds.seen, "shown": len(seconds.items),
            "median": float(np.median(seconds.items)),
            "chart": charts.histogram(seconds.items, "model seconds per image")}


def _errors(output: str, options: storage.StorageOptions,
            counts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The first ``MAX_ERRORS_SHOWN`` error rows and the counts by class. With ``counts``
    (``total``, ``by_class``, from digests) only the error files holding those rows are
    read."""
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
    return {"total": total, "rows": rows,
            "by_class": sorted(by_class.items(), key=lambda item: -item[1])}


def _flagged(flagged: list[dict[str, Any]], stats: dict[str, Any], changes: Sequence[float],
             structures: Sequence[float]) -> dict[str, Any]:
    """The flagged section's context: the table rows and the two histograms."""
    mean, structure = stats["change_mean"], stats.get("residual_structure")
    return {
        "flagged": flagged, "stats": dict(stats, residual_structure=structure),
        "min_records": MIN_RECORDS, "min_spread_structure": MIN_SPREAD_STRUCTURE,
        "min_structure_change": MIN_STRUCTURE_CHANGE,
        "change_chart": None if mean is None else charts.histogram(
            changes, "mean change per image (8-bit levels)", mean["cutoff"]),
        "structure_chart": None if structure is None or not structures else charts.histogram(
            structures, "residual structure per image (0 noise-like, 1 structure)",
            structure["cutoff"], span=(0.0, 1.0)),
        "flagged_rows": [(f["key"], round(f["change_mean"], 2), round(f["change_p99"], 2),
                          "" if f.get("residual_structure") is None
                          else round(f["residual_structure"], 3), f["reason"])
                         for f in flagged]}


def _samples(output: str, options: storage.StorageOptions, layout: str,
             flagged: list[dict[str, Any]], others: Reservoir,
             sample: int) -> list[dict[str, Any]]:
    """Up to ``sample`` images with their crops: the most changed and the most
    structure-losing flagged images, in turns, for half of them; random others after."""
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
    return [{"record": record, "crops": crops(output, record, layout, options)}
            for record in chosen]


def _provenance(job: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, Any]]:
    return [("model", job.get("model") or summary.get("model", "")),
            ("model sha256", summary.get("model_sha256")
             or (job.get("fingerprint") or {}).get("model_sha256", "unknown")),
            ("job fingerprint sha256", job.get("fingerprint_sha256", "")),
            ("ledger format version", job.get("ledger_format_version", ""))]
