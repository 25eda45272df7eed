"""Benchmark: what the residual-structure score costs the restore actor (no Ray).

Run:  python tests/benchmarks/bench_audit.py [--model restore-default] [--images 64]
      [--size 256] [--batch 16] [--repeats 3] [--threads 0] [--control]

Side by side in one run, each batch timed both ways back to back (in alternating order), so
that machine load hits both alike:
- with: ``RestoreActor.restore_arrays`` as shipped (the per-image audit includes
  :func:`restorer.image.audit.residual_structure` on the central 128 px crop);
- without: the same actor with the score replaced by a constant (the audit as it was before).
Prints the median seconds per batch of each (wall clock and, robust to other processes on a
shared machine, this process's CPU time), their ratios, the medians of the paired per-batch
ratios, and the score's own time per image (CPU time on CPU, wall clock on a GPU).
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch

from restorer.image import audit
from restorer.image.audit import residual_structure
from restorer.io.samples import noisy, scene
from restorer.pipeline.actor import RestoreActor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="restore-default")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--control", action="store_true",
                        help="A/A run: both arms without the score, to see how far the ratios "
                             "stray by noise alone")
    args = parser.parse_args()

    images = [(noisy(scene(args.size, args.size, 3, seed), 25, seed) * 255).round()
              .astype(np.uint8) for seed in range(args.images)]
    batches = [images[i:i + args.batch] for i in range(0, len(images), args.batch)]
    actor = RestoreActor(model=args.model, tile=256, threads=args.threads)

    def without(source, output):
        return source.new_zeros(source.shape[0])

    def timed(score, batch) -> tuple[float, float]:
        audit.residual_structure = score  # the actor looks it up there at each call
        wall, cpu = time.perf_counter(), time.process_time()
        actor.restore_arrays(batch)
        return time.perf_counter() - wall, time.process_time() - cpu

    timed(residual_structure, batches[0])  # warm-up
    timings: dict[str, list[float]] = {"with": [], "without": []}
    cpu_timings: dict[str, list[float]] = {"with": [], "without": []}
    ratios, cpu_ratios = [], []
    for repeat in range(args.repeats):
        for batch in batches:  # each batch both ways, back to back, in alternating order
            order = [("with", without if args.control else residual_structure),
                     ("without", without)]
            pair = {name: timed(score, batch) for name, score in order[::1 - 2 * (repeat % 2)]}
            for name, (wall, cpu) in pair.items():
                timings[name].append(wall)
                cpu_timings[name].append(cpu)
            ratios.append(pair["with"][0] / pair["without"][0])
            cpu_ratios.append(pair["with"][1] / pair["without"][1])
    audit.residual_structure = residual_structure

    device = actor.device
    x = torch.rand(1, 3, min(256, args.size), min(256, args.size), device=device)
    y = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    for _ in range(3):
        residual_structure(x, y)
    started = time.process_time() if device.type == "cpu" else time.perf_counter()
    for _ in range(50):
        float(residual_structure(x, y)[0])
    score_ms = ((time.process_time() if device.type == "cpu" else time.perf_counter())
                - started) / 50 * 1000

    median = {k: statistics.median(v) for k, v in timings.items()}
    print(json.dumps({
        "model": args.model, "control": args.control, "device": str(device), "threads": torch.get_num_threads(),
        "images": args.images, "size": args.size, "batch": args.batch,
        "batches_timed_each": len(timings["with"]),
        "seconds_per_batch_with": round(median["with"], 4),
        "seconds_per_batch_without": round(median["without"], 4),
        "with_over_without": round(median["with"] / median["without"], 4),
        "median_paired_ratio": round(statistics.median(ratios), 4),
        "cpu_seconds_per_batch_with": round(statistics.median(cpu_timings["with"]), 4),
        "cpu_seconds_per_batch_without": round(statistics.median(cpu_timings["without"]), 4),
        "median_paired_cpu_ratio": round(statistics.median(cpu_ratios), 4),
        "score_ms_per_image": round(score_ms, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
