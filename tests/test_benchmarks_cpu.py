"""The benchmark scripts that must run on other machines: smoke runs here, on the CPU, no Ray.

``tests/benchmarks/gpu_check.py`` is run as is on a leased GPU machine (no Ray there): its CPU
mode runs the same code paths on tiny sizes, so that it does not first fail where GPU time is
scarce. ``bench_cpu_backends.py``'s comparison (pixels within 1/255 of eager) is checked on a
tiny net.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import shared_dir

from restorer.nets import build_net
from restorer.weights.checkpoint import save_model

BENCHMARKS = Path(__file__).parent / "benchmarks"
NOISE_MAP = {"arch": "noisemap", "channels": 3, "estimator_features": 4, "estimator_layers": 3,
             "trunk": {"arch": "unet", "channels": 3, "num_features": (8, 16),
                       "num_blocks": 1, "guide_channels": 3}}

# Runs a benchmark script as __main__ in a fresh interpreter, then fails if it imported Ray.
RUN_WITHOUT_RAY = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
if "ray" in sys.modules:
    print("ray was imported", file=sys.stderr)
    code = 3
sys.exit(code)
"""


def run_script(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", RUN_WITHOUT_RAY, *argv], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> list[str]:
    """A small noise-aware (noise-map) RGB model and a small gray U-Net, as files."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    paths = []
    for name, spec in (("noisemap", NOISE_MAP),
                       ("gray", {"arch": "unet", "channels": 1, "num_features": (8, 16),
                                 "num_blocks": 1})):
        path = str(folder / f"{name}.safetensors")
        save_model(path, build_net(spec).eval())
        paths.append(path)
    return paths


def test_gpu_check_runs_on_cpu_without_ray(small_models, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run_script(str(BENCHMARKS / "gpu_check.py"), "--cpu", "--models", *small_models,
                        "--data", str(shared_dir() / "data"),
                        "--sizes", "40", "56", "--images", "2", "--batch", "2", "--repeats", "1",
                        "--crop", "32", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    speed = report["speed"]
    # every model x precision x size, with positive rates and no GPU memory figure on a CPU
    assert {(r["model"], r["precision"], r["size"]) for r in speed} == {
        (m, p, s) for m in small_models for p in ("fp32", "bf16") for s in (40, 56)}
    assert all(r["ceiling_images_per_s"] > 0 and r["actor_images_per_s"] > 0 for r in speed)
    assert all(r["actor_peak_mib"] is None for r in speed)
    assert any("noise-aware" in r["arch"] for r in speed if r["model"] == small_models[0])
    quality = report["quality"]
    noise_map, gray = small_models
    if (shared_dir() / "data" / "set12").is_dir():  # Set5 too for the colour net
        assert {(q["model"], q["dataset"]) for q in quality} == {
            (noise_map, "set12"), (noise_map, "set5"), (gray, "set12")}
    else:
        assert {q["dataset"] for q in quality} == {"synthetic"}
    # on a CPU too bf16 is bf16 autocast: outputs a few levels apart, measured, not equal
    assert all(math.isfinite(q["bf16_minus_fp32_db"]) and q["max_levels"] > 0 for q in quality)
    assert "actor / ceiling" in result.stdout and "bf16 - fp32 dB" in result.stdout


def test_practical_pairs_benchmark_runs_without_ray_and_compares_its_arms():
    """bench_practical_pairs.py runs on a GPU host before a training stage (no Ray there)."""
    result = run_script(str(BENCHMARKS / "bench_practical_pairs.py"), "--data", "/nonexistent",
                        "--workers", "1", "--batches", "1", "--repeats", "2", "--patch", "32",
                        "--batch", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 24 generated scenes" in result.stdout  # no training photos there: made ones
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["workers"], len(r["rounds"])) for r in rows] == [(0, 2), (1, 2)]
    assert rows[0]["ratio_to_thread"] == 1.0
    assert all(r["crops_per_s"] > 0 for r in rows)
    assert rows[1]["ratio_to_thread"] == rows[1]["crops_per_s"] / rows[0]["crops_per_s"]


def test_gpu_check_without_cuda_says_so_and_exits_1():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run its GPU check")
    result = run_script(str(BENCHMARKS / "gpu_check.py"))
    assert result.returncode == 1
    assert "no CUDA device" in result.stderr and "--cpu" in result.stderr
    assert "Traceback" not in result.stderr


def _bench_cpu_backends():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cpu_backends",
                                                  BENCHMARKS / "bench_cpu_backends.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_backends_pixel_check_finds_a_backend_off_by_levels(tmp_path):
    bench = _bench_cpu_backends()
    torch.manual_seed(0)
    net = build_net({"arch": "unet", "channels": 3, "num_features": (8, 16),
                     "num_blocks": 1}).eval()
    backends = {name: bench.Prepared(name, net, 1, tmp_path)
                for name in ("eager", "channels_last")}

    class OffByTwoLevels(bench.Prepared):  # a backend that computes something else
        def _prepare(self, x):
            return lambda x: net(x) + 2 / 255

    backends["off"] = OffByTwoLevels("eager", net, 1, tmp_path)
    found = bench.pixels(backends, bench.test_images(None, 3), 64, 96)
    assert found["eager"]["max_levels"] == 0 and found["eager"]["psnr_minus_eager"] == 0
    assert found["channels_last"]["max_levels"] < 0.01
    assert found["off"]["max_levels"] > 1.5 and found["off"]["max_levels_8bit"] >= 1
    rows = [{"speedup_vs_eager": 1.5, **found["off"]}, {"speedup_vs_eager": 1.4, **found["off"]}]
    assert bench.verdict(rows, "openvino").endswith("do not adopt")
    # a lower-precision backend is judged by PSNR too: 2 levels off but within 0.01 dB passes
    rows[0]["psnr_minus_eager"] = -0.005
    assert bench.verdict(rows, "bf16").endswith(": adopt")
    assert bench.verdict(rows, "openvino").endswith("do not adopt")
    rows = [{"speedup_vs_eager": 1.5, **found["channels_last"]},
            {"speedup_vs_eager": 1.2, **found["channels_last"]}]
    assert "does not pay (1.20x" in bench.verdict(rows, "channels_last")
    rows[1]["speedup_vs_eager"] = 1.3
    assert bench.verdict(rows, "channels_last").endswith(": adopt")


def _overhead_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pipeline_overhead",
                                                  BENCHMARKS / "bench_pipeline_overhead.py")
    sys.path.insert(0, str(BENCHMARKS))  # it imports its neighbour memory.py
    try:
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return bench


def test_the_crops_set_is_ten_crops_to_one_photo_and_the_flags_pick_the_sizes():
    import argparse

    bench = _overhead_benchmark()
    sizes = bench.crop_photo_sizes(1100)
    assert sizes.count((384, 384)) == 1000 and sizes.count((500, 500)) == 100
    assert sizes[:11] == [(384, 384)] * 10 + [(500, 500)]  # interleaved, not 100 at the end

    def flags(**given):
        return argparse.Namespace(**{"images": 22, "crops": False, "user_photos": False,
                                     "as_cli": False, **given})

    assert bench.photo_sizes(flags()) is None  # the mixed small SIZES
    assert bench.photo_sizes(flags(crops=True, as_cli=True)) == bench.crop_photo_sizes(22)
    assert bench.photo_sizes(flags(as_cli=True)) == bench.user_photo_sizes(22)
    assert bench.photo_sizes(flags(user_photos=True)) == bench.user_photo_sizes(22)


def test_user_photos_of_the_as_cli_benchmark_are_never_tile_multiples():
    bench = _overhead_benchmark()
    sizes = bench.user_photo_sizes(500)
    assert len(sizes) == 500 and sizes == bench.user_photo_sizes(500)  # deterministic
    sides = [side for size in sizes for side in size]
    assert min(sides) >= 384 and max(sides) <= 768 and all(side % 256 for side in sides)
    assert len(set(sizes)) > 400  # photos of many sizes, not one shape repeated
