"""The report page of a restore job (per-image audit), and the report page of a training run.

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
measures their input noise with the actor's estimator (:func:`restorer.image.audit.input_noise`).
"""

from __future__ import annotations

import base64
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from restorer.errors import JobError, SpecError
from restorer.io import storage
from restorer.output.digest import (
    DIGEST_DIR,
    MIN_SPREAD_STRUCTURE,
    MIN_STRUCTURE_CHANGE,
    STRUCTURE_STEP,
    Digest,
    histogram_values,
    job_digest,
)
from restorer.output.digest import flag as flag_from_digest
from restorer.output.ledger import (
    DEFAULT_OPTIONS,
    ledger_records,
    meta_uri,
    read_json,
    table_batches,
    unit_commit_times,
)
from restorer.report import charts, render
from restorer.report.crops import (
    CROP,
    crops,
    png_data_uri,
)
from restorer.report.stats import (
    MIN_RECORDS,
    MIN_SPREAD,
    OUTLIER_K,
    RESERVOIR,
    Reservoir,
    report_uri,
    scan_outliers,
)

log = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 200
# The rows of summary.json the page shows, in words, with their units
SUMMARY_LABELS = {
    "status": "outcome", "total": "images in this run", "succeeded": "restored",
    "failed": "failed (quarantined)", "skipped": "skipped (done by an earlier run)",
    "skipped_non_images": "files left alone (not images)", "elapsed_seconds": "time taken",
    "startup_seconds": "start-up (to the first restored image)",
    "images_per_second": "rate, overall", "steady_images_per_second": "rate after start-up",
    "megapixels": "megapixels restored", "resumed": "continued an earlier run",
}
SUMMARY_FIELDS = tuple(SUMMARY_LABELS)
STATUS_WORDS = {"ok": "every image restored", "failed_images": "done; some images failed",
                "stopped": "stopped before the end (rerun to finish)",
                "incomplete": "incomplete: some units failed transiently (rerun to finish)",
                "empty": "no images found"}
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
    ``digest``, the job's, from :func:`restorer.output.digest.job_digest`) the counts, outliers,
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
    samples = _samples(output_uri, options, layout, figures["flagged"], figures["others"],
                       sample)
    page = render.page(
        "job.html", f"restorer report: {output_uri}", summary=summary,
        summary_rows=summary_rows(summary), rates=rates(summary),
        tally=figures["tally"],
        timeline=_timeline(figures["commits"], job.get("created")),
        seconds=_seconds(figures["seconds"]),
        errors=_errors(output_uri, options, figures["error_counts"]),
        **_flagged(figures["flagged"], figures["stats"], figures["changes"],
                   figures["structures"]),
        crop=CROP, samples=samples, layout=layout,
        verdict=verdict(summary, figures["tally"], figures["stats"], figures["flagged"],
                        samples),
        provenance_rows=_provenance(job, summary), spec_rows=spec_rows(spec))
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
    words = {"step": "last step", "loss": "training loss (last interval)", "lr": "learning rate",
             "seconds": "seconds (this run)", "val_psnr": "validation PSNR (dB)",
             "val_ssim": "validation SSIM", "val_input_psnr": "validation input PSNR (dB)",
             "resumed_from": "resumed from step"}
    page = render.page(
        "train.html", f"restorer training report: {summary.get('name', '')}",
        summary_rows=[("run", summary.get("name")), ("steps", summary.get("steps")),
                      ("time taken", _seconds_text(float(summary.get("elapsed_seconds") or 0))),
                      ("best validation PSNR (dB)", summary.get("best_val_psnr")),
                      *((words.get(name, name), final[name]) for name in sorted(final))],
        curves="data:image/png;base64," + base64.b64encode(curves_png).decode("ascii"),
        history_rows=[tuple(h.get(c) for c in ("step", "loss", "val_psnr", "val_ssim",
                                               "val_input_psnr", "seconds")) for h in history],
        samples=[dict(s, **{key: png_data_uri(s[key])
                            for key in ("degraded", "restored", "clean")}) for s in samples],
        spec_rows=spec_rows(summary.get("spec", {})))
    uri = storage.join(run_uri, "report.html")
    storage.write_bytes(uri, page.encode("utf-8"), options)
    return uri


# --- the page's words -------------------------------------------------------------------------

def _seconds_text(value: float) -> str:
    if value < 90:
        return f"{value:.3g} s"
    return f"{value / 60:.1f} min" if value < 5400 else f"{value / 3600:.1f} h"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """summary.json's figures as (label in words, value with its unit) rows."""
    rows = []
    for name, label in SUMMARY_LABELS.items():
        value = summary.get(name)
        if name not in summary:
            continue
        if name == "status":
            text = STATUS_WORDS.get(value, str(value))
        elif value is None:
            text = {"skipped_non_images": "not counted (counted for local folders)",
                    "startup_seconds": "no image restored",
                    "steady_images_per_second": "not measured (every result came at once)",
                    "images_per_second": "no image processed"}.get(name, "unknown")
        elif name.endswith("_seconds"):
            text = _seconds_text(float(value))
        elif name.endswith("per_second"):
            text = f"{render.fmt(float(value))} images/s"
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        else:
            text = render.fmt(value)
        rows.append((label, text))
    return rows


def rates(summary: dict[str, Any]) -> str:
    """One sentence on this run's speed, saying what is not known rather than "None"."""
    overall, steady = summary.get("images_per_second"), summary.get("steady_images_per_second")
    startup, elapsed = summary.get("startup_seconds"), summary.get("elapsed_seconds")
    if not elapsed:
        return ""
    if overall is None:
        return f"This run restored no image in {_seconds_text(float(elapsed))}."
    text = f"This run: {render.fmt(float(overall))} images/s overall"
    if steady is not None:
        text += f", {render.fmt(float(steady))} images/s once the first image was restored"
    else:
        text += " (no rate after start-up: the results did not come in several batches)"
    if startup is not None:
        text += f"; {_seconds_text(float(startup))} of start-up"
    return text + "."


def verdict(summary: dict[str, Any], tally: dict[str, int], stats: dict[str, Any],
            flagged: list[dict[str, Any]], samples: list[dict[str, Any]]) -> str:
    """The page's one-line answer: how many images were restored, how much they changed,
    the noise before and after (on the images read back for the page) and what to look at."""
    records, ok = tally["records"], tally["ok"]
    parts = [f"{ok:,} of {records:,} images restored"]
    if records > ok:
        by_class = summary.get("errors_by_class") or {}
        classes = ", ".join(f"{name} x{count}" for name, count in sorted(by_class.items()))
        parts[0] += f", {records - ok:,} failed" + (f" ({classes} this run)" if classes else "")
    change = (stats.get("change_mean") or {}).get("median")
    if change is not None:
        parts.append(f"typical change {change:.2f} levels (median of the mean |output - input|,"
                     " 8-bit)")
    pairs = [(s["crops"]["noise"], s["crops"]["noise_out"]) for s in samples
             if s["crops"].get("noise") is not None and s["crops"].get("noise_out") is not None]
    if pairs:
        before = float(np.median([p[0] for p in pairs]))
        after = float(np.median([p[1] for p in pairs]))
        parts.append(f"noise {before:.1f} → {after:.1f} levels (median over the "
                     f"{len(pairs)} images shown below)")
    parts.append(f"{len(flagged)} image{'s' if len(flagged) != 1 else ''} flagged to check"
                 if flagged else "none flagged")
    return "; ".join(parts) + "."


def spec_rows(spec: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """The spec as (TOML key, value) rows: ``output.format``, ``model.tile`` ..."""
    rows = []
    for name in sorted(spec):
        value = spec[name]
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            rows.extend(spec_rows(value, key + "."))
        elif isinstance(value, (list, tuple)):
            rows.append((key, ", ".join(str(v) for v in value) or "(none)"))
        else:
            rows.append((key, '""' if value == "" else str(value).lower()
                         if isinstance(value, bool) else str(value)))
    return rows


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
                          else round(f["residual_structure"], 3), _in_words(f["reason"]))
                         for f in flagged]}


def _in_words(reason: str) -> str:
    """A flag's reason (restorer.report.stats) with the ledger's column names in words."""
    for name, words in (("change_mean", "mean change"), ("change_p99", "99th percentile change"),
                        ("residual_structure", "residual structure")):
        reason = reason.replace(name, words)
    return reason


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
    return [{"record": record, "crops": crops(output, record, layout, options),
             "links": _links(output, record, layout)} for record in chosen]


def _links(output: str, record: dict[str, Any], layout: str) -> dict[str, str]:
    """Links from the page (``OUTPUT/_restorer/report.html``) to an image's full-size input and
    output: the output relative to the page; a local input as a ``file://`` URI. S3 objects
    and shard rows have no link a browser could open; their URI is shown instead."""
    from pathlib import Path
    from urllib.parse import quote

    links = {}
    if layout == "files" and record.get("out_key"):
        links["output"] = "../" + quote(record["out_key"])
    uri = record.get("uri") or ""
    if uri and not storage.is_remote(uri) and "#" not in uri:
        links["input"] = Path(storage.local_path(uri)).absolute().as_uri()
    return links


def _provenance(job: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, Any]]:
    return [("model", job.get("model") or summary.get("model", "")),
            ("model sha256", summary.get("model_sha256")
             or (job.get("fingerprint") or {}).get("model_sha256", "unknown")),
            ("job fingerprint sha256", job.get("fingerprint_sha256", "")),
            ("ledger format version", job.get("ledger_format_version", ""))]
