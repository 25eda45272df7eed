"""The end of a restore job at 2k vs 20k images: run digests against re-reading the ledger.

For each size, writes what a finished job leaves in ``OUTPUT/_restorer/`` (``job.json`` and
one ledger unit file per 16 images, 1% failed, a few images changed far more than the rest;
no Ray, no model: only the ledger matters here), then times, side by side:

- *ledger*: the end of a job before digests: the whole-job counts and outliers from a scan
  of every unit file, then the report page (which scanned it again);
- *digests*: ``driver._audit`` as a run now calls it, with the run's digest built by
  ``Digest.add``/``commit`` as ``_execute`` does while committing.

It prints the seconds and how many ledger unit files and error files each read (the report
shows the first 200 error rows: digests read the error files up to those, the ledger scan
read them all). Local files: on S3 every
file read is a GET (~20-50 ms), so the *ledger* column grows further there.

``--job`` runs whole restorer jobs instead (Ray, a near-free 2-layer net, ``COUNT`` 16x16 PNGs
in one flat local folder): the end of the job is the time from the last ledger unit file
written (the last images committed) to ``summary.json`` (and to the report page), from the
files' modification times; ``_audit`` (the summary and the report) is timed on its own.

Run:  python tests/benchmarks/bench_end_of_job.py [--counts 2000 20000]
      flock /tmp/restorer-ray.lock python tests/benchmarks/bench_end_of_job.py --job \
          --counts 2000 20000
"""

import argparse
import io
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from restorer.io import storage
from restorer.job.specs import RestoreSpec, spec_from_flags, spec_to_dict
from restorer.output.digest import Digest
from restorer.output.ledger import ledger_records
from restorer.output.records import ERROR_COLUMNS, RECORD_SCHEMA
from restorer.pipeline.driver import _audit
from restorer.report import flag_outliers, write_report

UNIT = 16


def _job(output: Path, count: int, seed: int = 0) -> Digest:
    """A finished job's ledger under ``output``; returns the digest its run would have kept."""
    rng = np.random.default_rng(seed)
    meta = output / "_restorer"
    (meta / "ledger").mkdir(parents=True)
    (meta / "errors.parquet").mkdir()
    spec = spec_from_flags(RestoreSpec, input=str(output.parent / "in"), output=str(output))
    (meta / "job.json").write_text(json.dumps({"ledger_format_version": 2,
                                               "spec": spec_to_dict(spec),
                                               "created": time.time()}))
    defaults = {f.name: ("" if pa.types.is_string(f.type) else b"" if pa.types.is_binary(f.type)
                         or pa.types.is_large_binary(f.type) else 0) for f in RECORD_SCHEMA}
    run = Digest()
    for start in range(0, count, UNIT):
        unit = f"{start:012d}"
        records = []
        for i in range(start, min(count, start + UNIT)):
            mean = float(rng.gamma(4, 1)) * (20 if i % 997 == 5 else 1)
            record = dict(defaults, key=f"img{i:07d}.png", out_key=f"img{i:07d}.png",
                          uri=f"/in/img{i:07d}.png", unit=unit, format="png",
                          status="ok", width=32, height=32, change_mean=mean,
                          change_p99=mean * 3, model_seconds=0.004, out_bytes=900)
            if i % 100 == 7:
                record.update(status="failed", stage="decode", error_class="ImageError",
                              message="not an image", change_mean=0.0, change_p99=0.0)
            records.append(record)
        for record in records:
            record["unit_size"] = len(records)
            run.add(record)
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), sink,
                       compression="zstd")
        (meta / "ledger" / f"unit-{unit}.parquet").write_bytes(sink.getvalue())
        failed = [{c: r[c] for c in ERROR_COLUMNS} for r in records if r["status"] != "ok"]
        if failed:
            pq.write_table(pa.Table.from_pylist(failed),
                           meta / "errors.parquet" / f"unit-{unit}.parquet")
        run.commit(unit, len(records))
    return run, spec


def _counting_reads():
    """Count reads of ledger unit files (each one a GET on S3)."""
    real = storage.read_bytes
    counter = {"ledger": 0, "errors": 0}

    def read_bytes(uri, options=None):
        if "/_restorer/ledger/" in str(uri):
            counter["ledger"] += 1
        if "/_restorer/errors.parquet/" in str(uri):
            counter["errors"] += 1
        return real(uri, options or storage.StorageOptions())

    storage.read_bytes = read_bytes
    return counter


def _jobs(counts: list[int]) -> None:
    """Whole restorer jobs: the end of the job (last commit -> summary.json) by size."""
    import ray
    from PIL import Image

    from restorer.nets import build_net
    from restorer.pipeline import driver
    from restorer.weights.checkpoint import save_model

    audit_seconds = []
    real_audit = driver._audit

    def timed_audit(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real_audit(*args, **kwargs)
        finally:
            audit_seconds.append(time.perf_counter() - started)

    driver._audit = timed_audit
    ray.init(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
             logging_level=logging.WARNING)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-end-of-job-") as scratch:
        root = Path(scratch)
        model = str(root / "cheap.safetensors")
        save_model(model, build_net({"arch": "dncnn", "channels": 3, "num_features": 4,
                                     "num_layers": 2}))
        for count in counts:
            source, output = root / f"in{count}", root / f"out{count}"
            source.mkdir()
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    source / f"img{i:07d}.png")
            started = time.time()
            summary = driver.restore(str(source), str(output), model=model, format="png")
            wall = time.time() - started
            meta = output / "_restorer"
            last_commit = max(p.stat().st_mtime for p in (meta / "ledger").iterdir())
            to_summary = (meta / "summary.json").stat().st_mtime - last_commit
            report = meta / "report.html"
            to_report = (report.stat().st_mtime - last_commit if report.exists()
                         else float("nan"))
            units = sum(1 for _ in (meta / "ledger").iterdir())
            print(f"{count:7d} images ({units} ledger unit files, {summary['succeeded']} "
                  f"restored, {summary['failed']} failed) in {wall:6.1f} s: last commit -> "
                  f"summary.json {to_summary:5.2f} s, -> report page {to_report:5.2f} s; "
                  f"_audit {audit_seconds[-1]:5.2f} s", flush=True)
            shutil.rmtree(source)
            shutil.rmtree(output)
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--job", action="store_true",
                        help="whole restorer jobs (Ray): last commit -> summary.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.job:
        _jobs(args.counts)
        return
    counter = _counting_reads()
    with tempfile.TemporaryDirectory() as scratch:
        for count in args.counts:
            output = Path(scratch) / f"out{count}"
            run, spec = _job(output, count)
            options = storage.StorageOptions()

            counter.update(ledger=0, errors=0)
            started = time.perf_counter()
            totals = {"records": 0}
            records = ledger_records(str(output), ["key", "status", "change_mean", "change_p99"],
                                     options)
            flagged = flag_outliers((totals.__setitem__("records", totals["records"] + 1) or r
                                     for r in records), limit=20)
            write_report(str(output), options)
            old_seconds, old_reads = time.perf_counter() - started, dict(counter)

            counter.update(ledger=0, errors=0)
            started = time.perf_counter()
            summary = {"status": "ok"}
            _audit(spec, summary, run)
            new_seconds, new_reads = time.perf_counter() - started, dict(counter)
            assert summary["job"]["records"] == totals["records"] == count
            assert {f["key"] for f in summary["flagged"]} == {f["key"] for f in flagged}
            print(f"{count:7d} images ({count // UNIT + (count % UNIT > 0)} unit files): "
                  f"ledger re-read {old_seconds:6.2f} s ({old_reads['ledger']} unit files, "
                  f"{old_reads['errors']} error files read); digests {new_seconds:6.2f} s "
                  f"({new_reads['ledger']} unit files, {new_reads['errors']} error files read); "
                  f"{len(flagged)} flagged by both", flush=True)


if __name__ == "__main__":
    main()
