"""Benchmark: forward-only ceiling vs a naive loop vs a restorer job, side by side.

Run:  python tests/benchmarks/bench_restore.py [--images 128] [--size 256]
Prints images/s of each and efficiency = restorer / ceiling, speedup = restorer / naive.
"""

import argparse
import json
import logging

from restorer.quality.bench import run_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = run_bench(args.images, args.size, args.model, args.batch_size)
    print(json.dumps(result, indent=2))
    print(f"efficiency = restorer / ceiling = {result['efficiency']:.3f}")
    print(f"speedup    = restorer / naive   = {result['speedup']:.3f}")
