"""Benchmark: a net's CPU cost per pixel against image size, whole images vs restorer's tiles.

Run:  python tests/benchmarks/bench_cache_cliff.py [--sizes 384x384 512x512 480x640 768x768]
      [--threads 1] [--repeats 5] [--model cheap|restore-default|PATH]

Why: the plain Ray Data pattern of ``bench_pipeline_overhead.py`` runs its net on whole images,
restorer on tiles. On this 2-core machine the near-free net of that benchmark (DnCNN, 2 layers,
4 features, one thread) costs 28-33 ns per pixel on whole images up to 600x600 when the same
shape repeats, ~100-150 ns at 700-768 px; with shapes changing from call to call, as in a
stream of photos of mixed sizes (this script interleaves them), 70-100 ns from 384 px up,
while restorer's tiles stay near 45-60 ns. So the plain pattern's rate on 384-768 px photos
depends on the CPU (its caches) far more than restorer's. For each size: the forward on the
whole image and on the tiles ``restorer.image.tiling.run_tiled`` cuts on a CPU (balanced tiles of
256 px with the net's overlap), ns per image pixel, median of ``--repeats`` after a warm-up,
the two interleaved repeat by repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from restorer.image.tiling import run_tiled
from restorer.nets import build_net
from restorer.pipeline.actor import tile_settings
from restorer.weights.zoo import get_model


def _net(name: str) -> torch.nn.Module:
    if name == "cheap":
        torch.manual_seed(0)
        return build_net({"arch": "dncnn", "channels": 3, "num_features": 4,
                          "num_layers": 2}).eval()
    return get_model(name).net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["384x384", "512x512", "480x640",
                                                        "600x600", "768x768"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="cheap")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = _net(args.model)
    tile, overlap = tile_settings(net, 256, 0)
    halo = net.receptive_field // 2
    print(f"{args.model}, {args.threads} thread(s), tile {tile}, overlap {overlap}; "
          f"ns per pixel, median of {args.repeats}\n")
    print("| size | whole image | restorer's tiles | whole / tiles |")
    print("| --- | --- | --- | --- |")
    for size in args.sizes:
        height, width = (int(v) for v in size.split("x"))
        image = torch.rand(3, height, width)
        ways = {"whole": lambda image=image: net(image[None]),
                "tiles": lambda image=image: run_tiled([image], net, tile, overlap, halo, 1, 1,
                                                       net.alignment, balanced=True)}
        times: dict[str, list[float]] = {name: [] for name in ways}
        with torch.inference_mode():
            for name, way in ways.items():
                way()  # warm-up
            for _ in range(args.repeats):
                for name, way in ways.items():  # interleaved
                    started = time.perf_counter()
                    way()
                    times[name].append(time.perf_counter() - started)
        ns = {name: statistics.median(t) / (height * width) * 1e9 for name, t in times.items()}
        print(f"| {size} | {ns['whole']:.1f} | {ns['tiles']:.1f} | "
              f"{ns['whole'] / ns['tiles']:.2f} |")


if __name__ == "__main__":
    main()
