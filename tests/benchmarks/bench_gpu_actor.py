"""Benchmark: the restore actor on one GPU, without Ray: ceiling vs actor, fp32 vs bf16.

Run:  python tests/benchmarks/bench_gpu_actor.py [--model restore-default] [--images 24]
      [--size 1024]

For each precision, side by side in one run:
- ceiling: the net alone on whole images already on the GPU (batch 1, that precision);
- actor: ``RestoreActor.restore_arrays`` on uint8 host arrays, a batch of 8 images at a time
  (pinned transfer, tiling, blending, the per-image audit statistics, back to uint8 on host).
Prints images/s and megapixels/s of each, actor / ceiling, bf16 / fp32, and the largest
difference between the bf16 and fp32 outputs in 8-bit levels.
"""

import argparse
import json
import time

import numpy as np
import torch

from restorer.io.samples import scene
from restorer.pipeline import RestoreActor


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (cuDNN autotuning, allocator)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def measure(args: argparse.Namespace, precision: str, arrays: list[np.ndarray]
            ) -> tuple[dict, list[np.ndarray]]:
    """Ceiling and actor timings at one precision, and the actor's outputs."""
    actor = RestoreActor(model=args.model, precision=precision, device="cuda")
    on_gpu = [torch.from_numpy(a).permute(2, 0, 1)[None].float().div(255).cuda() for a in arrays]
    if actor.channels == 1:
        on_gpu = [x.reshape(-1, 1, *x.shape[-2:]) for x in on_gpu]
    outputs: list[np.ndarray] = []

    def ceiling():
        for x in on_gpu:
            actor._forward(x)

    def restore():
        outputs.clear()
        for start in range(0, len(arrays), args.batch):
            outputs.extend(actor.restore_arrays(arrays[start:start + args.batch])[0])

    seconds = {"ceiling": _timed(ceiling, 2), "actor": _timed(restore, 2)}
    megapixels = len(arrays) * args.size * args.size / 1e6
    return {
        "tile": actor.tile, "overlap": actor.overlap,
        "ceiling_images_per_s": len(arrays) / seconds["ceiling"],
        "actor_images_per_s": len(arrays) / seconds["actor"],
        "actor_megapixels_per_s": megapixels / seconds["actor"],
        "actor_over_ceiling": seconds["ceiling"] / seconds["actor"],
    }, list(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="restore-default")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="images per restore_arrays call")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    arrays = [np.round(scene(args.size, args.size, 3, seed) * 255).astype(np.uint8)
              for seed in range(args.images)]
    result = {"model": args.model, "images": args.images, "size": args.size,
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    outputs = {}
    for precision in ("fp32", "bf16"):
        result[precision], outputs[precision] = measure(args, precision, arrays)
        torch.cuda.empty_cache()
    result["bf16_over_fp32_actor"] = (result["bf16"]["actor_images_per_s"]
                                      / result["fp32"]["actor_images_per_s"])
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16))
             for a, b in zip(outputs["fp32"], outputs["bf16"])]
    result["bf16_vs_fp32_max_levels"] = int(max(d.max() for d in diffs))
    result["bf16_vs_fp32_mean_levels"] = float(np.mean([d.mean() for d in diffs]))
    print(json.dumps(result, indent=2))
    for precision in ("fp32", "bf16"):
        r = result[precision]
        print(f"{precision}: actor / ceiling = {r['actor_over_ceiling']:.3f} "
              f"({r['actor_images_per_s']:.1f} vs {r['ceiling_images_per_s']:.1f} images/s)")
    print(f"bf16 / fp32 (actor) = {result['bf16_over_fp32_actor']:.3f}; outputs differ by at "
          f"most {result['bf16_vs_fp32_max_levels']} levels "
          f"(mean {result['bf16_vs_fp32_mean_levels']:.3f})")


if __name__ == "__main__":
    main()
