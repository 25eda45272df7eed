"""Benchmark: how fast the training pairs of a practical recipe are made, by one thread (the
default on a CPU) against worker processes (``--workers N``, the default on a GPU host).

Run:  python tests/benchmarks/bench_practical_pairs.py [--recipe restore-photo]
      [--data ../shared/data] [--workers 1,2] [--batches 12] [--repeats 3] [--patch P]
      [--batch B]

The recipe's own mixture and degradation ranges (``restore-photo``: camera noise, blur,
resizing, JPEG...) on its training photos when ``--data`` holds them, else on generated
scenes. Each arm builds its ``PracticalPairs``, takes two batches to warm up (the processes
start), then times ``--batches`` batches taken as fast as they come; arms alternate in order
over ``--repeats`` rounds, so machine load hits all alike. Prints crops per second per arm
(median over rounds) and its ratio to the thread's. A GPU step of the restore-photo U-Net
takes a batch in milliseconds, so the producers' rate is what a GPU run trains at unless it
is higher than the GPU's: compare it with the GPU's steps/s from ``gpu_check.py``.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from restorer.image.pixels import float_to_uint8
from restorer.io.samples import scene
from restorer.train import recipes, synth


def _images(recipe: recipes.Recipe, data: str | None) -> tuple[list[np.ndarray], str]:
    if data and all((Path(data) / folder).is_dir() for folder in recipe.train):
        return recipes.load_training_images(Path(data), recipe), f"{data} {recipe.train}"
    return [float_to_uint8(scene(512, 512, 3, seed)) for seed in range(24)], "24 generated scenes"


def _rate(images, recipe: recipes.Recipe, workers: int, batches: int) -> float:
    pairs = synth.PracticalPairs(images, recipe.patch, recipe.batch, seed=workers,
                                 mixture=recipe.practical, config=recipe.degradation,
                                 workers=workers)
    try:
        for _ in range(2):
            pairs()
        started = time.perf_counter()
        for _ in range(batches):
            pairs()
        return batches * recipe.batch / (time.perf_counter() - started)
    finally:
        pairs.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="restore-photo")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--workers", default="1,2", help="process counts to compare, e.g. 2,8,14")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--patch", type=int)
    parser.add_argument("--batch", type=int)
    args = parser.parse_args()
    recipe = recipes.RECIPES[args.recipe]
    if args.patch or args.batch:
        recipe = recipes.override(recipe, f"patch={args.patch or recipe.patch}")
        recipe = recipes.override(recipe, f"batch={args.batch or recipe.batch}")
    images, source = _images(recipe, args.data)
    arms = [0] + [int(w) for w in args.workers.split(",")]
    rates: dict[int, list[float]] = {arm: [] for arm in arms}
    for round_ in range(args.repeats):
        order = arms if round_ % 2 == 0 else arms[::-1]
        for arm in order:
            rates[arm].append(_rate(images, recipe, arm, args.batches))
    thread = statistics.median(rates[0])
    rows = [{"workers": arm, "arm": "thread" if arm == 0 else f"{arm} processes",
             "crops_per_s": statistics.median(rates[arm]),
             "ratio_to_thread": statistics.median(rates[arm]) / thread,
             "rounds": [round(r, 1) for r in rates[arm]]} for arm in arms]
    print(f"{args.recipe}: {recipe.batch} crops of {recipe.patch} px per batch, "
          f"{args.batches} batches per arm and round, {args.repeats} rounds, on {source}")
    for row in rows:
        print(f"  {row['arm']:>12}: {row['crops_per_s']:8.1f} crops/s "
              f"(x{row['ratio_to_thread']:.2f} the thread; rounds {row['rounds']})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
