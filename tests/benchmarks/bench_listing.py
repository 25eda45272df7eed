"""Listing at scale: driver memory and time to the first dispatched task for big manifests.

Writes Parquet manifests of 100k and 1M synthetic URIs (the objects need not exist:
every row becomes a 'does not exist' error record, which is fine for this measurement), starts
the listing stage of the restore pipeline on each, and measures the time until its first rows
exist (when the first read tasks can be dispatched), and the driver's peak memory meanwhile. A
driver that expanded every key first (as Ray's read_images does, ray-project/ray#40686) would grow
with the manifest.

Flat folders (``--flat-local``, empty files directly in one local folder) and flat S3 prefixes
(``--flat-s3``, empty objects under one prefix of a moto server run as its own process, so its
memory is not the driver's) are listed as the pipeline lists them: locally the driver pages
through the top level once (counting), then partition tasks list it again, page by page, each
keeping its share; on S3 the driver reads two pages and one stream task lists the prefix once,
in key order, its rows flowing on after its first page.

Run:  python tests/benchmarks/bench_listing.py [--counts 100000 1000000]
      python tests/benchmarks/bench_listing.py --counts --flat-local 20000 200000 \
          --flat-s3 20000 100000
"""

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).parent))
from memory import PeakMemory, _rss_bytes

from restorer.job.specs import RestoreSpec, spec_from_flags
from restorer.pipeline.graph import listing_dataset, source_config
from restorer.pipeline.sources import listing_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--flat-local", type=int, nargs="*", default=[],
                        help="files in one flat local folder, one measurement per count")
    parser.add_argument("--flat-s3", type=int, nargs="*", default=[],
                        help="objects under one flat prefix of a moto server")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    moto = _start_moto() if args.flat_s3 else None  # before Ray: its workers get the endpoint
    ray.init(num_cpus=2, object_store_memory=400 * 1024 * 1024, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for count in args.flat_local:
                folder = Path(scratch) / f"flat{count}"
                folder.mkdir()
                for i in range(count):
                    (folder / f"img{i:07d}.png").touch()
                _measure(f"{count:8d} files in a flat local folder", str(folder),
                         str(Path(scratch) / f"out-flat{count}"), "files")
                shutil.rmtree(folder)
            for count in args.flat_s3:
                bucket = f"flat{count}"
                _fill_bucket(bucket, count)
                _measure(f"{count:8d} objects under a flat S3 prefix", f"s3://{bucket}/raw/",
                         str(Path(scratch) / f"out-s3-{count}"), "files")
            _manifests(args.counts, scratch)
    finally:
        if moto is not None:
            moto.terminate()


def _start_moto() -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def _fill_bucket(bucket: str, count: int) -> None:
    import boto3

    client = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    started = time.time()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"raw/img{i:07d}.png",
                                                  Body=b""), range(count)))
    print(f"  ({count} objects put in {time.time() - started:.0f} s)", flush=True)


def _measure(what: str, uri: str, out: str, layout: str) -> None:
    """Driver memory and time to the first rows of the listing stage, as the pipeline runs it."""
    spec = spec_from_flags(RestoreSpec, input=uri, output=out)
    baseline = _rss_bytes(os.getpid())
    with PeakMemory(interval=0.05) as memory:
        started = time.time()
        config = source_config(spec, layout)
        tasks = listing_tasks(spec.input.uri, config)
        planned = time.time() - started
        ds = listing_dataset(tasks, config, frozenset())  # the pipeline's listing stage
        rows = 0
        for batch in ds.iter_batches(batch_size=None):
            if not rows:
                to_first = time.time() - started
            rows += len(batch["key"])
        listed = time.time() - started
    print(f"{what}: {len(tasks)} listing tasks planned in {planned:5.2f} s, first rows after "
          f"{to_first:6.2f} s, all {rows} rows after {listed:6.2f} s; driver peak "
          f"{memory.driver_peak / 2**20:7.1f} MiB (before: {baseline / 2**20:.1f} MiB, "
          f"growth {(memory.driver_peak - baseline) / 2**20:.1f} MiB)", flush=True)


def _manifests(counts: list[int], scratch: str) -> None:
    for count in counts:
        manifest = Path(scratch) / f"manifest{count}.parquet"
        # Local paths that do not exist: each read fails at once (an s3:// URI would wait on
        # the network), which is all this measurement needs.
        uris = [f"/nonexistent/raw/{i // 1000:04d}/img{i:07d}.jpg" for i in range(count)]
        pq.write_table(pa.table({"uri": uris}), manifest, row_group_size=50_000)
        del uris
        spec = spec_from_flags(RestoreSpec, input=str(manifest),
                               output=str(Path(scratch) / f"out{count}"),
                               input_layout="manifest")
        baseline = _rss_bytes(os.getpid())
        with PeakMemory(interval=0.05) as memory:
            started = time.time()
            config = source_config(spec, "manifest")
            tasks = listing_tasks(spec.input.uri, config)
            planned = time.time() - started
            # The listing stage exactly as the restore pipeline builds it: the time until
            # its first rows exist is when the first read tasks can be dispatched.
            ds = listing_dataset(tasks, config, frozenset())
            first = next(iter(ds.iter_batches(batch_size=None)))
            to_first = time.time() - started
        print(f"{count:8d} manifest entries: {len(tasks)} listing tasks planned in "
              f"{planned:5.2f} s, first rows for read tasks after {to_first:6.2f} s "
              f"({len(first['key'])} rows), driver peak "
              f"{memory.driver_peak / 2**20:7.1f} MiB (before: {baseline / 2**20:.1f} MiB)",
              flush=True)


if __name__ == "__main__":
    main()
