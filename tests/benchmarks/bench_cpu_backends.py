"""Benchmark: CPU inference backends for the zoo's nets, side by side in one run, same pixels?

Run:  python tests/benchmarks/bench_cpu_backends.py [--models restore-default denoise-gray]
      [--sizes 512x512 1024x768] [--threads 2] [--repeats 5] [--data ../shared/data]
      [--backends eager channels_last compile onnxruntime openvino bf16 openvino_bf16]

Backends (each runs the same weights on NCHW float32 inputs, one image per call):

- ``eager``: the net in eager PyTorch, fp32 (what a CPU actor runs today);
- ``channels_last``: the same with the net and input in channels_last memory format;
- ``compile``: ``torch.compile(net, dynamic=False)`` (inductor, C++/OpenMP kernels on CPU);
- ``onnxruntime``: exported by ``torch.onnx.export`` at each shape, run by ONNX Runtime's CPU
  provider, all graph optimisations;
- ``openvino``: that ONNX file run by OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT``
  f32 (on CPUs with bf16 units OpenVINO's default is bf16: ``openvino_bf16``);
- ``bf16``: eager under ``torch.autocast("cpu", torch.bfloat16)``, channels_last.

Speed: per model and size, the median seconds of ``--repeats`` calls after one warm-up call
(the warm-up, which compiles or exports, is reported apart), the backends interleaved
repeat by repeat so that a busy machine slows them alike; ratio = eager / backend.

Pixels: each backend against eager on Set12 (and Set5 for colour nets) from ``--data`` with
Gaussian noise of sigma 25, each image mirrored out to the first size (so that every backend
runs the shape it was prepared for; only the image's own pixels are compared): the largest
absolute output difference in 8-bit levels (float outputs clamped to [0, 1], times 255), the
largest difference of the rounded 8-bit outputs, and the mean PSNR against the clean images
minus eager's. A backend is worth adopting at >= 1.3x with every pixel within one level
(1/255) of eager, or within 0.01 dB of eager's PSNR where it computes in lower precision.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from restorer.image import degrade
from restorer.image.metrics import psnr
from restorer.image.tiling import pad_reflect
from restorer.io.samples import scene
from restorer.quality.evaluate import image_files, image_seed, read_image
from restorer.weights.zoo import get_model

log = logging.getLogger("bench_cpu_backends")

BACKENDS = ("eager", "channels_last", "compile", "onnxruntime", "openvino", "bf16",
            "openvino_bf16")
LOW_PRECISION = ("bf16", "openvino_bf16")  # judged by PSNR where pixels move by a level
SIGMA = 25.0
Forward = Callable[[torch.Tensor], torch.Tensor]  # NCHW float32 -> NCHW float32


class Prepared:
    """One backend's forward for one net, prepared per input shape on first use."""

    def __init__(self, backend: str, net: torch.nn.Module, threads: int, scratch: Path):
        self.backend, self.net, self.threads, self.scratch = backend, net, threads, scratch
        self.by_shape: dict[tuple[int, ...], Forward] = {}
        self.warmup_seconds: dict[tuple[int, ...], float] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if shape not in self.by_shape:
            started = time.perf_counter()
            self.by_shape[shape] = self._prepare(x)
            self.by_shape[shape](x)  # the first call compiles / plans
            self.warmup_seconds[shape] = time.perf_counter() - started
        return self.by_shape[shape](x)

    def _onnx(self, x: torch.Tensor) -> str:
        path = self.scratch / f"net-{id(self.net)}-{'x'.join(map(str, x.shape))}.onnx"
        if not path.exists():
            try:
                torch.onnx.export(self.net, (x,), str(path), dynamo=False, opset_version=17,
                                  input_names=["x"], output_names=["y"])
            except Exception as e:  # noqa: BLE001 - the TorchScript exporter may be gone
                log.info("TorchScript ONNX export failed (%s); using the dynamo exporter", e)
                torch.onnx.export(self.net, (x,), str(path), dynamo=True, input_names=["x"],
                                  output_names=["y"])
        return str(path)

    def _prepare(self, x: torch.Tensor) -> Forward:
        net, backend = self.net, self.backend
        if backend == "eager":
            return lambda x: net(x)
        if backend == "channels_last":
            last = _channels_last_copy(net)
            return lambda x: last(x.contiguous(memory_format=torch.channels_last))
        if backend == "bf16":
            last = _channels_last_copy(net)

            def forward(x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return last(x.contiguous(memory_format=torch.channels_last)).float()
            return forward
        if backend == "compile":
            if not hasattr(self, "compiled"):
                self.compiled = torch.compile(net, dynamic=False)
            return self.compiled
        if backend == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = onnxruntime.InferenceSession(self._onnx(x), options,
                                                   providers=["CPUExecutionProvider"])
            return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        if backend in ("openvino", "openvino_bf16"):
            import openvino

            core = openvino.Core()
            compiled = core.compile_model(openvino.convert_model(self._onnx(x)), "CPU", {
                "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "bf16" if backend == "openvino_bf16" else "f32"})
            request = compiled.create_infer_request()
            return lambda x: torch.from_numpy(request.infer([x.numpy()])[0].copy())
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def _channels_last_copy(net: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(net).to(memory_format=torch.channels_last)


def available(backend: str) -> str:
    """Why ``backend`` cannot run here ("" when it can)."""
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino",
              "openvino_bf16": "openvino"}.get(backend)
    if module:
        try:
            __import__(module)
            __import__("onnx")  # torch.onnx.export needs it
        except ImportError as e:
            return f"not installed ({e.name}); pip install onnx {module}"
    return ""


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> (height, width)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def speed(backends: dict[str, Prepared], x: torch.Tensor, repeats: int
          ) -> dict[str, float]:
    """Median seconds per call of each backend, interleaved repeat by repeat."""
    times: dict[str, list[float]] = {name: [] for name in backends}
    with torch.inference_mode():
        for forward in backends.values():
            forward(x)  # warm-up (prepares the shape)
        for _ in range(repeats):
            for name, forward in backends.items():
                started = time.perf_counter()
                forward(x)
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def test_images(data: Path | None, channels: int) -> list[tuple[str, str, np.ndarray]]:
    """(set, file, clean uint8 HWC with the net's planes): Set12 (three equal planes for a
    colour net) and, for colour nets, Set5; synthetic scenes without ``data``."""
    if data is None or not (data / "set12").is_dir():
        return [("synthetic", f"scene{i}", np.round(scene(200, 240, channels, i) * 255)
                 .astype(np.uint8)) for i in range(4)]
    images = [("set12", p.name, np.repeat(read_image(p, 1)[..., None], channels, -1))
              for p in image_files(data / "set12")]
    if channels == 3 and (data / "set5").is_dir():
        images += [("set5", p.name, read_image(p, 3)) for p in image_files(data / "set5")]
    return images


def pixels(backends: dict[str, Prepared], images, height: int, width: int) -> dict[str, dict]:
    """Each backend's outputs against eager's on ``images``, mirrored out to height x width."""
    found: dict[str, dict[str, list]] = {name: {"max": [], "max8": [], "psnr": []}
                                         for name in backends}
    with torch.inference_mode():
        for _, name, clean in images:
            clean = clean[:height, :width]
            rng = np.random.default_rng(image_seed(name))
            noisy = degrade.add_gaussian_noise(clean / 255.0, SIGMA, rng)
            noisy = np.clip(np.round(noisy * 255), 0, 255) / 255.0  # an 8-bit file
            x = torch.from_numpy(noisy.astype(np.float32)).permute(2, 0, 1)[None]
            x = pad_reflect(x, height - x.shape[-2], width - x.shape[-1]).contiguous()
            outputs = {}
            for backend, forward in backends.items():
                y = forward(x)[0, :, :clean.shape[0], :clean.shape[1]].float().clamp(0, 1)
                outputs[backend] = y.permute(1, 2, 0).numpy() * 255.0
            for backend, out in outputs.items():
                found[backend]["max"].append(float(np.abs(out - outputs["eager"]).max()))
                rounded = np.round(out)
                found[backend]["max8"].append(float(np.abs(rounded - np.round(
                    outputs["eager"])).max()))
                found[backend]["psnr"].append(psnr(rounded, clean.astype(np.float64)))
    eager_psnr = float(np.mean(found["eager"]["psnr"]))
    return {name: {"max_levels": max(f["max"]), "max_levels_8bit": max(f["max8"]),
                   "psnr": float(np.mean(f["psnr"])),
                   "psnr_minus_eager": float(np.mean(f["psnr"])) - eager_psnr}
            for name, f in found.items()}


def default_data() -> Path:
    """The shared test images: ``$RESTORER_SHARED_DIR/data``, else ``shared/data`` beside the
    checkout, else inside it (a copy of the working tree on a leased machine)."""
    repo = Path(__file__).resolve().parents[2]
    candidates = [Path(os.environ["RESTORER_SHARED_DIR"]) / "data"] if os.environ.get(
        "RESTORER_SHARED_DIR") else []
    candidates += [repo.parent / "shared" / "data", repo / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["restore-default", "denoise-gray"])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "1024x768"],
                        help="WIDTHxHEIGHT; the first is also the shape of the pixel check")
    parser.add_argument("--threads", type=int, default=2, help="torch / runtime threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--data", default=str(default_data()),
                        help="folder with set12/ and set5/ (default $RESTORER_SHARED_DIR/data, "
                        "../shared/data or ./shared/data, the first found)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    names = ["eager"] + [b for b in args.backends if b != "eager"]
    missing = {b: why for b in names if (why := available(b))}
    for backend, why in missing.items():
        log.warning("%s: %s; left out", backend, why)
    names = [b for b in names if b not in missing]
    data = Path(args.data) if Path(args.data).is_dir() else None
    sizes = [parse_size(s) for s in args.sizes]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-cpu-backends-") as scratch:
        for model in args.models:
            net = get_model(model).net.eval()
            channels = net.channels
            backends = {b: Prepared(b, net, args.threads, Path(scratch)) for b in names}
            for height, width in sizes:
                x = torch.from_numpy(scene(height, width, channels, 0)).permute(2, 0, 1)[None]
                x = x.contiguous()
                seconds = speed(backends, x, args.repeats)
                for backend in names:
                    results.append({
                        "model": model, "size": f"{width}x{height}", "backend": backend,
                        "seconds": seconds[backend],
                        "speedup_vs_eager": seconds["eager"] / seconds[backend],
                        "warmup_seconds": backends[backend].warmup_seconds[tuple(x.shape)]})
                log.info("%s %dx%d: %s", model, width, height, ", ".join(
                    f"{b} {seconds[b]:.3f} s" for b in names))
            check = pixels(backends, test_images(data, channels), *sizes[0])
            for row in results:
                if row["model"] == model:
                    row.update(check[row["backend"]])
    print(f"\n{args.threads} threads, torch {torch.__version__}, median of {args.repeats}; "
          f"pixels on {'Set12/Set5' if data else 'synthetic scenes'} (sigma 25) at "
          f"{args.sizes[0]}\n")
    print("| model | size | backend | s / image | speed-up vs eager | warm-up s | max diff "
          "(levels) | max diff 8-bit | PSNR - eager (dB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['model']} | {r['size']} | {r['backend']} | {r['seconds']:.3f} "
              f"| {r['speedup_vs_eager']:.2f}x | {r['warmup_seconds']:.1f} "
              f"| {r['max_levels']:.4f} | {r['max_levels_8bit']:.0f} "
              f"| {r['psnr_minus_eager']:+.4f} |")
    print()
    for model in args.models:
        for backend in names[1:]:
            rows = [r for r in results if r["model"] == model and r["backend"] == backend]
            print(f"{model} / {backend}: {verdict(rows, backend)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def verdict(rows: list[dict], backend: str) -> str:
    """Whether a backend's rows (one model, every size) meet the bar for adoption: >= 1.3x at
    every size, and every output within one 8-bit level of eager's (a backend that computes
    in lower precision, :data:`LOW_PRECISION`: that, or PSNR within 0.01 dB of eager's)."""
    slowest = min(r["speedup_vs_eager"] for r in rows)
    same = rows[0]["max_levels"] <= 1.0 or (backend in LOW_PRECISION
                                            and abs(rows[0]["psnr_minus_eager"]) <= 0.01)
    pays = slowest >= 1.3
    return (("pays" if pays else f"does not pay ({slowest:.2f}x at worst, the bar is 1.3x)")
            + "; " + ("same pixels (within 1/255, or 0.01 dB)" if same else
                      f"pixels differ ({rows[0]['max_levels']:.2f} levels, "
                      f"{rows[0]['psnr_minus_eager']:+.3f} dB)")
            + (": adopt" if pays and same else ": do not adopt"))


if __name__ == "__main__":
    main()
