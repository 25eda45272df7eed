"""Reading a restore job's ``_restorer/`` folder back: summary, error records, ledger."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.dataset as pads

from restorer import storage
from restorer.errors import JobError


def _dataset(uri: str, options: storage.StorageOptions):
    fs, path = storage.filesystem(uri, options)
    return pads.dataset(path, filesystem=fs, format="parquet")


def inspect_output(output: str, top: int = 10,
                   options: storage.StorageOptions = storage.StorageOptions()) -> dict[str, Any]:
    """Summary, error records and the ``top`` most changed images of a job's output.

    The ledger is scanned in batches, so this stays cheap at millions of records.
    """
    meta = storage.join(output, "_restorer")
    if not storage.exists(storage.join(meta, "job.json"), options):
        raise JobError(f"{output} holds no restorer job (no _restorer/job.json)")
    summary_uri = storage.join(meta, "summary.json")
    summary = (json.loads(storage.read_bytes(summary_uri, options))
               if storage.exists(summary_uri, options) else {})
    records = failed = 0
    errors: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    if storage.list_names(storage.join(meta, "ledger"), options):
        columns = ["key", "status", "stage", "error_class", "message", "change_mean",
                   "change_p99"]
        for batch in _dataset(storage.join(meta, "ledger"), options).to_batches(columns=columns):
            for row in batch.to_pylist():
                records += 1
                if row["status"] != "ok":
                    failed += 1
                    if len(errors) < 100:
                        errors.append(row)
                else:
                    changed.append(row)
            changed = sorted(changed, key=lambda r: -r["change_mean"])[:top]
    return {"summary": summary, "records": records, "failed": failed, "errors": errors,
            "most_changed": changed}
