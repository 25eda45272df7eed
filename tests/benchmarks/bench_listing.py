"""Listing at scale: driver memory and time to the first dispatched task for big manifests.

Writes Parquet manifests of 100k and 1M synthetic URIs (the objects need not exist:
every row becomes a 'does not exist' error record, which is fine for this measurement), starts
the listing stage of the restore pipeline on each, and measures the time until its first rows
exist (when the first read tasks can be dispatched), and the driver's peak memory meanwhile. A driver that expanded every key
first (as Ray's read_images does, ray-project/ray#40686) would grow with the manifest.

Run:  python tests/benchmarks/bench_listing.py [--counts 100000 1000000]
"""

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).parent))
from memory import PeakMemory, _rss_bytes

from restorer.jobs import RestoreSpec, spec_from_flags
from restorer.pipeline import _expand_task, source_config
from restorer.sources import listing_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=2, object_store_memory=400 * 1024 * 1024, include_dashboard=False)
    with tempfile.TemporaryDirectory() as scratch:
        for count in args.counts:
            manifest = Path(scratch) / f"manifest{count}.parquet"
            # Local paths that do not exist: each read fails at once (an s3:// URI would wait on
            # the network), which is all this measurement needs.
            uris = [f"/nonexistent/raw/{i // 1000:04d}/img{i:07d}.jpg" for i in range(count)]
            pq.write_table(pa.table({"uri": uris}), manifest, row_group_size=50_000)
            del uris
            spec = spec_from_flags(RestoreSpec, input=str(manifest),
                                   output=str(Path(scratch) / f"out{count}"),
                                   input_layout="manifest")
            import os

            baseline = _rss_bytes(os.getpid())
            with PeakMemory(interval=0.05) as memory:
                started = time.time()
                config = source_config(spec, "manifest")
                tasks = listing_tasks(spec.input.uri, config)
                planned = time.time() - started
                # The listing stage exactly as the restore pipeline builds it: the time until
                # its first rows exist is when the first read tasks can be dispatched.
                ds = ray.data.from_items([dataclasses.asdict(t) for t in tasks],
                                         override_num_blocks=len(tasks))
                ds = ds.flat_map(_expand_task, fn_kwargs={"config": config, "done": frozenset()},
                                 num_cpus=0.25)
                first = next(iter(ds.iter_batches(batch_size=None)))
                to_first = time.time() - started
            print(f"{count:8d} manifest entries: {len(tasks)} listing tasks planned in "
                  f"{planned:5.2f} s, first rows for read tasks after {to_first:6.2f} s "
                  f"({len(first['key'])} rows), driver peak "
                  f"{memory.driver_peak / 2**20:7.1f} MiB (before: {baseline / 2**20:.1f} MiB)",
                  flush=True)


if __name__ == "__main__":
    main()
