"""Reading a restore job's ``_restorer/`` folder back: summary, errors, ledger, outliers."""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from typing import Any

from restorer.errors import JobError, SpecError
from restorer.io import storage
from restorer.output import digest
from restorer.output.ledger import DEFAULT_OPTIONS, ledger_records, meta_uri, table_batches
from restorer.report import MIN_RECORDS, MIN_SPREAD, OUTLIER_K, flag_outliers, report_uri

MAX_ERRORS = 100  # error records returned; all of them are in _restorer/errors.parquet
SORT_COLUMNS = ("change_mean", "change_p99", "residual_structure")  # what `top` can rank by


def inspect_output(output: str, top: int = 10,
                   options: storage.StorageOptions = DEFAULT_OPTIONS,
                   sort: str = "change_mean") -> dict[str, Any]:
    """Summary, errors, top-ranked and flagged images of a job's output, in one ledger scan.

    Returns a JSON-able dict: ``summary`` (the last run's ``summary.json``, or ``{}``),
    ``records`` and ``failed`` (whole job), ``errors`` (the first ``MAX_ERRORS`` failed
    records), ``sort`` and ``most_changed`` (the ``top`` successful images, highest ``sort``
    first: one of ``SORT_COLUMNS``, ``change_mean`` by default; ``residual_structure`` ranks
    the images that lost the most detail, and skips records written before it), ``flagged``
    (:func:`restorer.report.flag_outliers`: key, change_mean, change_p99, residual_structure,
    reason, ...) and ``report`` (the URI of ``report.html``, or None if it was not written
    yet). The ledger is scanned in batches, so this stays cheap at millions of records. An
    output with run digests (restorer since ledger format 2) is not scanned at all: the
    figures come from the digests (:func:`restorer.output.digest.job_digest`) and only the error
    rows shown are read, unless ``top`` is more than the digests keep
    (``restorer.output.digest.TOP``).
    """
    if sort not in SORT_COLUMNS:
        raise SpecError(f"sort = {sort!r}; choose one of {', '.join(SORT_COLUMNS)}")
    if not storage.exists(meta_uri(output, "job.json"), options):
        raise JobError(f"{output} holds no restorer job (no _restorer/job.json)")
    summary_uri = meta_uri(output, "summary.json")
    summary = (json.loads(storage.read_bytes(summary_uri, options))
               if storage.exists(summary_uri, options) else {})
    if top <= digest.TOP and storage.list_names(meta_uri(output, digest.DIGEST_DIR), options):
        job = digest.job_digest(output, options, save=False)
        errors = [{c: row.get(c) for c in ("key", "status", "stage", "error_class", "message")}
                  for row in digest.iter_errors(table_batches(
                      meta_uri(output, "errors.parquet"),
                      ["key", "stage", "error_class", "message"], options), MAX_ERRORS)]
        for row in errors:
            row["status"] = "failed"
        report = report_uri(output)
        return {"summary": summary, "records": job.records, "failed": job.failed,
                "errors": errors, "sort": sort,
                "most_changed": digest.most_changed(job, top, sort),
                "flagged": digest.flag(job, OUTLIER_K, MIN_SPREAD, MIN_RECORDS)[0],
                "report": report if storage.exists(report, options) else None}
    counts = {"records": 0, "failed": 0}
    errors: list[dict[str, Any]] = []
    changed: list[tuple[float, int, dict[str, Any]]] = []  # min-heap of the `top` largest
    columns = ["key", "uri", "out_key", "unit", "status", "stage", "error_class", "message",
               "change_mean", "change_p99", "residual_structure"]

    def successes() -> Iterator[dict[str, Any]]:
        for index, row in enumerate(ledger_records(output, columns, options)):
            counts["records"] += 1
            if row["status"] != "ok":
                counts["failed"] += 1
                if len(errors) < MAX_ERRORS:
                    errors.append({c: row[c] for c in ("key", "status", "stage", "error_class",
                                                       "message")})
                continue
            if row.get(sort) is None:  # residual_structure in a ledger written before it
                yield row
                continue
            item = (row[sort], index, {c: row.get(c) for c in ("key", "change_mean",
                                                               "change_p99",
                                                               "residual_structure")})
            if top > 0 and len(changed) < top:
                heapq.heappush(changed, item)
            elif top > 0 and item[0] > changed[0][0]:
                heapq.heapreplace(changed, item)
            yield row

    flagged = flag_outliers(successes())
    report = report_uri(output)
    return {"summary": summary, "records": counts["records"], "failed": counts["failed"],
            "errors": errors, "sort": sort,
            "most_changed": [row for _, _, row in sorted(changed, key=lambda i: (-i[0], i[1]))],
            "flagged": flagged,
            "report": report if storage.exists(report, options) else None}
