"""Every read and write of a restore job's ``OUTPUT/_restorer/`` (:data:`META_DIR`).

- ``job.json``: the claim on the output: the resolved spec, the model and the job fingerprint
  (:func:`prepare_output`); a rerun with another fingerprint is refused.
- ``ledger/unit-<id>.parquet``: one file per committed work unit, its records
  (:func:`commit_unit`, written last and create-only, so a unit with a ledger file is
  complete); ``errors.parquet/unit-<id>.parquet``: the unit's error records.
- ``missing/unit-<id>.json``: runs in which a unit's inputs were missing (:func:`missing_runs`).
- ``transient/unit-<id>.json``: the transient faults of a unit's images in earlier runs
  (:func:`transient_history`), until they succeed or are quarantined.
- ``digests/run-<id>.json``: each run's digest (:func:`write_run_digest`,
  :mod:`restorer.output.digest`).
- ``summary.json``, ``report.html`` (:mod:`restorer.report`), ``lease.json``
  (:mod:`restorer.output.lease`).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from restorer.errors import (
    JobError,
    OutputConflictError,
    retrying,
)
from restorer.io import storage
from restorer.io.storage import META_DIR
from restorer.job.specs import RestoreSpec, sha256_of, spec_to_dict
from restorer.output.records import ERROR_COLUMNS, RECORD_SCHEMA

log = logging.getLogger(__name__)

LEDGER_FORMAT_VERSION = 4  # 2: a flat folder of more than FLAT_PARTITION_KEYS files is cut
# into units per hash partition (version 1 cut its sorted whole listing), and runs keep digests;
# 3: a flat S3 prefix is cut in key order, as it streams (sources.units_changed); 4: a manifest
# whose URIs span buckets keeps the bucket in its default keys
FINGERPRINT_VERSION = 2  # 2: tile, overlap and precision resolved (as the actors run them)
READ_AHEAD = 8  # Parquet files of a folder read ahead while one is consumed (S3 latency)
DEFAULT_OPTIONS = storage.StorageOptions()  # local paths, or S3 from the AWS environment
MISSING_RUNS = 2  # runs in which a vanished input keeps its unit open before quarantine


def meta_uri(output: str, *parts: str) -> str:
    """The URI of ``parts`` under ``OUTPUT/_restorer/``."""
    return storage.join(output, "/".join((META_DIR, *parts)))


def prepare_output(spec: RestoreSpec, fingerprint: dict[str, Any], model_uri: str,
                   legacy_fingerprint: dict[str, Any] | None = None) -> bool:
    """Claim the output for this job, or refuse it if it holds a different job.

    Returns whether the output already held this job (a resume). Fingerprints carry a version:
    version 2 holds resolved settings (tile, overlap, precision as the actors ran them);
    outputs of earlier versions held them as configured, so they are compared with
    ``legacy_fingerprint`` (the spec's unresolved settings) and resume when those match.
    """
    options = spec.storage.options()
    job_uri = meta_uri(spec.output.uri, "job.json")
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
            same = "the same settings"
            if "precision" in changed and old.get("precision"):  # e.g. fp32 from a CPU job
                # made before bf16 became the default of CPUs that have it
                same = f"the same settings (--precision {old['precision']})"
            raise OutputConflictError(
                f"{spec.output.uri} holds a job with different settings ({details}); use "
                f"{same} (or --model the old model file) to resume, another output, or "
                "--overwrite to redo everything")
    else:
        refuse_foreign_output(spec)
    if spec.output.overwrite:
        storage.delete(meta_uri(spec.output.uri, "ledger"), options, recursive=True)
        storage.delete(meta_uri(spec.output.uri, "errors.parquet"), options, recursive=True)
        storage.delete(meta_uri(spec.output.uri, "digests"), options, recursive=True)
        storage.delete(meta_uri(spec.output.uri, "transient"), options, recursive=True)
    record = {"ledger_format_version": LEDGER_FORMAT_VERSION,
              "fingerprint_version": FINGERPRINT_VERSION, "fingerprint": fingerprint,
              "fingerprint_sha256": sha256_of(fingerprint), "model": model_uri,
              "spec": spec_to_dict(spec), "created": time.time()}
    storage.write_bytes(job_uri, json.dumps(record, indent=2).encode(), options)
    return resumed


def refuse_foreign_output(spec: RestoreSpec) -> None:
    """Refuse an output that holds files but no restorer job (unless ``--overwrite``)."""
    if spec.output.overwrite or storage.exists(meta_uri(spec.output.uri, "job.json"),
                                               spec.storage.options()):
        return
    if [n for n in storage.list_names(spec.output.uri, spec.storage.options()) if n != META_DIR]:
        raise OutputConflictError(f"Output {spec.output.uri} is not empty and holds no restorer "
                                  "job; choose an empty output or pass --overwrite")


def committed_units(spec: RestoreSpec) -> tuple[set[str], set[str]]:
    """(units with a ledger record, units with error records) in the output."""
    options = spec.storage.options()
    return (ledger_units(spec.output.uri, options),
            ledger_units(spec.output.uri, options, "errors.parquet"))


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def commit_unit(spec: RestoreSpec, unit: str, records: list[dict[str, Any]],
                had_errors: bool, fence: Callable[[], None] | None = None) -> None:
    """Commit a unit: its shard (parquet layout), its errors, then the ledger entry.

    Each file is published atomically and the ledger entry comes last, so a unit with a ledger
    entry is complete; a crash before it means the unit is redone, overwriting the same keys.
    The ledger entry is created once (a conditional create; see :func:`storage.write_bytes`):
    finding another run's entry for the unit means two jobs write into one output, and is an
    error. Only a unit redone for its errors (``had_errors``, ``--retry-failed``) replaces its
    entry. ``fence`` (the job's :meth:`restorer.output.lease.Lease.check`) is called before the
    first write and again right before the ledger entry: it raises when another job took the output.
    """
    options = spec.storage.options()
    if fence is not None:
        fence()
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
    error_uri = meta_uri(spec.output.uri, "errors.parquet", f"unit-{unit}.parquet")
    if errors:
        table = pa.Table.from_pylist([{c: r[c] for c in ERROR_COLUMNS} for r in errors])
        storage.write_bytes(error_uri, parquet_bytes(table), options)
    elif had_errors:
        storage.delete(error_uri, options)
    ledger = pa.Table.from_pylist([dict(r, encoded=b"") for r in records], schema=RECORD_SCHEMA)
    if fence is not None:
        fence()
    storage.write_bytes(meta_uri(spec.output.uri, "ledger", f"unit-{unit}.parquet"),
                        parquet_bytes(ledger), options, create=not had_errors)


def ledger_format(spec: RestoreSpec) -> int | None:
    """The ledger format of the job already at ``spec``'s output (0 when its ``job.json`` predates
    the field); None when there is none to resume (no job there, or ``--overwrite``)."""
    job_uri = meta_uri(spec.output.uri, "job.json")
    options = spec.storage.options()
    if spec.output.overwrite or not storage.exists(job_uri, options):
        return None
    return json.loads(storage.read_bytes(job_uri, options)).get("ledger_format_version", 0)


def missing_runs(spec: RestoreSpec, unit: str) -> int:
    """Runs so far in which inputs of ``unit`` were missing (0 when none was)."""
    counter = meta_uri(spec.output.uri, "missing", f"unit-{unit}.json")
    options = spec.storage.options()
    runs, _ = retrying(lambda: json.loads(storage.read_bytes(counter, options))["runs"]
                       if storage.exists(counter, options) else 0, what=f"read {counter}")
    return runs


def note_missing(spec: RestoreSpec, unit: str, runs: int, keys: list[str]) -> None:
    """Record that ``keys`` of ``unit`` were missing in ``runs`` runs."""
    counter = meta_uri(spec.output.uri, "missing", f"unit-{unit}.json")
    body = json.dumps({"runs": runs, "keys": keys}).encode()
    retrying(lambda: storage.write_bytes(counter, body, spec.storage.options()),
             what=f"write {counter}")


def forget_missing(spec: RestoreSpec, unit: str) -> None:
    counter = meta_uri(spec.output.uri, "missing", f"unit-{unit}.json")
    retrying(lambda: storage.delete(counter, spec.storage.options()), what=f"delete {counter}")


def transient_units(spec: RestoreSpec) -> set[str]:
    """Ids of the units with a history of transient faults (one listing, at the start)."""
    return {n[len("unit-"):-len(".json")]
            for n in storage.list_names(meta_uri(spec.output.uri, "transient"),
                                        spec.storage.options())
            if n.startswith("unit-") and n.endswith(".json")}


def transient_history(spec: RestoreSpec, unit: str) -> dict[str, list[dict[str, Any]]]:
    """key -> the transient faults of that image of ``unit`` in earlier runs (one dict per run:
    ``run``, ``stage``, ``error_class``, ``message``); empty when there were none."""
    history = meta_uri(spec.output.uri, "transient", f"unit-{unit}.json")
    options = spec.storage.options()
    found, _ = retrying(lambda: json.loads(storage.read_bytes(history, options))["keys"]
                        if storage.exists(history, options) else {}, what=f"read {history}")
    return found


def note_transient(spec: RestoreSpec, unit: str,
                   history: dict[str, list[dict[str, Any]]]) -> None:
    """Record the images of ``unit`` still failing transiently, with their faults so far."""
    uri = meta_uri(spec.output.uri, "transient", f"unit-{unit}.json")
    body = json.dumps({"keys": history}).encode()
    retrying(lambda: storage.write_bytes(uri, body, spec.storage.options()), what=f"write {uri}")


def forget_transient(spec: RestoreSpec, unit: str) -> None:
    uri = meta_uri(spec.output.uri, "transient", f"unit-{unit}.json")
    retrying(lambda: storage.delete(uri, spec.storage.options()), what=f"delete {uri}")


def write_summary(spec: RestoreSpec, summary: dict[str, Any], attempts: int = 1) -> None:
    """Publish ``summary.json``."""
    data = json.dumps(summary, indent=2).encode()
    retrying(lambda: storage.write_bytes(meta_uri(spec.output.uri, "summary.json"), data,
                                         spec.storage.options()),
             attempts, what="write summary.json")


# --- reading the ledger back (the driver, the digests, inspect and the report) ----------

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


def ledger_units(output: str, options: storage.StorageOptions, folder: str = "ledger"
                 ) -> set[str]:
    """Ids of the units the ledger holds (a listing: no file is read); ``folder``
    ``errors.parquet``: of the units with error records."""
    return {n[len("unit-"):-len(".parquet")]
            for n in storage.list_names(meta_uri(output, folder), options)
            if n.startswith("unit-") and n.endswith(".parquet")}


def unit_records(output: str, unit: str, options: storage.StorageOptions,
                 columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The records of one ledger unit file (only ``columns`` present in it; None: all)."""
    data = storage.read_bytes(meta_uri(output, "ledger", f"unit-{unit}.parquet"), options)
    parquet = pq.ParquetFile(pa.BufferReader(data))
    present = set(parquet.schema_arrow.names)
    columns = parquet.schema_arrow.names if columns is None else columns
    return parquet.read(columns=[c for c in columns if c in present],
                        use_threads=False).to_pylist()


def unit_commit_times(output: str, options: storage.StorageOptions) -> dict[str, float]:
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


def read_json(uri: str, options: storage.StorageOptions) -> dict[str, Any]:
    if not storage.exists(uri, options):
        return {}
    return json.loads(storage.read_bytes(uri, options))
