"""Every read and write of a restore job's ``OUTPUT/_restorer/`` (:data:`META_DIR`).

- ``job.json``: the claim on the output: the resolved spec, the model and the job fingerprint
  (:func:`prepare_output`); a rerun with another fingerprint is refused.
- ``ledger/unit-<id>.parquet``: one file per committed work unit, its records
  (:func:`commit_unit`, written last and create-only, so a unit with a ledger file is
  complete); ``errors.parquet/unit-<id>.parquet``: the unit's error records.
- ``missing/unit-<id>.json``: runs in which a unit's inputs were missing (:func:`missing_runs`).
- ``digests/run-<id>.json``: each run's digest (:func:`write_run_digest`, :mod:`restorer.digest`).
- ``summary.json``, ``report.html`` (:mod:`restorer.report`), ``lease.json``
  (:mod:`restorer.lease`).
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from restorer import storage
from restorer.digest import Digest, unit_records
from restorer.digest import write as write_digest
from restorer.errors import (
    TRANSIENT,
    JobError,
    OutputConflictError,
    StorageError,
    classify,
    retrying,
)
from restorer.jobs import RestoreSpec, digest, spec_to_dict
from restorer.records import ERROR_COLUMNS, RECORD_SCHEMA
from restorer.sources import ListingTask, SourceConfig, units_changed

log = logging.getLogger(__name__)

META_DIR = "_restorer"
LEDGER_FORMAT_VERSION = 3  # 2: a flat folder of more than FLAT_PARTITION_KEYS files is cut
# into units per hash partition (version 1 cut its sorted whole listing), and runs keep digests;
# 3: a flat S3 prefix is cut in key order, as it streams (sources.units_changed)
# structure: restorer.audit was calibrated on 128 px crops) or a strided view of this side
FINGERPRINT_VERSION = 2  # 2: tile, overlap and precision resolved (as the actors run them)
MISSING_RUNS = 2  # runs in which a vanished input keeps its unit open before quarantine


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


def parquet_bytes(table: pa.Table) -> bytes:
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
                            parquet_bytes(shard), options)
    errors = [r for r in records if r["status"] != "ok"]
    error_uri = meta_uri(spec, "errors.parquet", f"unit-{unit}.parquet")
    if errors:
        table = pa.Table.from_pylist([{c: r[c] for c in ERROR_COLUMNS} for r in errors])
        storage.write_bytes(error_uri, parquet_bytes(table), options)
    elif had_errors:
        storage.delete(error_uri, options)
    ledger = pa.Table.from_pylist([dict(r, encoded=b"") for r in records], schema=RECORD_SCHEMA)
    storage.write_bytes(meta_uri(spec, "ledger", f"unit-{unit}.parquet"), parquet_bytes(ledger),
                        options, create=not had_errors)


def refuse_older_units(spec: RestoreSpec, tasks: list[ListingTask],
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


def write_run_digest(spec: RestoreSpec, run: Digest) -> None:
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


def earlier_records(spec: RestoreSpec, unit: str) -> list[dict[str, Any]] | None:
    """The ledger records of ``unit`` before it is redone (None: it has no ledger entry, so no
    digest counted it)."""
    try:
        records, _ = retrying(lambda: unit_records(spec.output.uri, unit,
                                                   spec.storage.options()),
                              what=f"read unit {unit}")
    except StorageError:
        return None
    return records


def missing_runs(spec: RestoreSpec, unit: str) -> int:
    """Runs so far in which inputs of ``unit`` were missing (0 when none was)."""
    counter = meta_uri(spec, "missing", f"unit-{unit}.json")
    options = spec.storage.options()
    runs, _ = retrying(lambda: json.loads(storage.read_bytes(counter, options))["runs"]
                       if storage.exists(counter, options) else 0, what=f"read {counter}")
    return runs


def note_missing(spec: RestoreSpec, unit: str, runs: int, keys: list[str]) -> None:
    """Record that ``keys`` of ``unit`` were missing in ``runs`` runs."""
    counter = meta_uri(spec, "missing", f"unit-{unit}.json")
    body = json.dumps({"runs": runs, "keys": keys}).encode()
    retrying(lambda: storage.write_bytes(counter, body, spec.storage.options()),
             what=f"write {counter}")


def forget_missing(spec: RestoreSpec, unit: str) -> None:
    counter = meta_uri(spec, "missing", f"unit-{unit}.json")
    retrying(lambda: storage.delete(counter, spec.storage.options()), what=f"delete {counter}")


def write_summary(spec: RestoreSpec, summary: dict[str, Any], attempts: int = 1) -> None:
    """Publish ``summary.json``."""
    data = json.dumps(summary, indent=2).encode()
    retrying(lambda: storage.write_bytes(meta_uri(spec, "summary.json"), data,
                                         spec.storage.options()),
             attempts, what="write summary.json")
