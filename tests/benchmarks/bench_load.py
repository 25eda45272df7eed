"""Load benchmark: restore 2,000 and then 20,000 small images in one local run.

Prints the time and the peak memory of the driver and of Ray's workers for each, and the
20k/2k peak-memory ratios (goal: at most 1.2 — memory must stay flat with the image count).

Run:  python tests/benchmarks/bench_load.py [--small 2000] [--large 20000] [--size 32]
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from memory import PeakMemory

from restorer.pipeline import restore


def write_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 255, (size, size), dtype=np.uint8) for _ in range(16)]
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tiles[i % 16]).save(sub / f"{i:06d}.png", compress_level=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=2, object_store_memory=400 * 1024 * 1024, include_dashboard=False)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for count in (args.small, args.large):
            source = Path(scratch) / f"in{count}"
            write_images(source, count, args.size)
            started = time.time()
            with PeakMemory() as memory:
                summary = restore(str(source), str(Path(scratch) / f"out{count}"))
            elapsed = time.time() - started
            assert summary["succeeded"] == count, summary
            results[count] = (elapsed, memory.driver_peak, memory.workers_peak)
            print(f"{count:6d} images: {elapsed:7.1f} s, {count / elapsed:7.1f} images/s, "
                  f"peak driver {memory.driver_peak / 2**20:7.1f} MiB, "
                  f"peak workers {memory.workers_peak / 2**20:7.1f} MiB", flush=True)
    small, large = results[args.small], results[args.large]
    print(f"peak memory ratio {args.large}/{args.small}: driver {large[1] / small[1]:.3f}, "
          f"workers {large[2] / small[2]:.3f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
