"""GPU check: the restore actor on one GPU as jobs run it, with no Ray.

Run on a machine with a CUDA GPU and PyTorch (restorer installed, no Ray needed)::

    python tests/benchmarks/gpu_check.py [--models restore-default denoise-gray]
        [--sizes 512 1024] [--images 16] [--batch 8] [--data ../shared/data] [--json out.json]

Smoke run on a CPU (tiny sizes, seconds; the same code paths, no GPU figures)::

    python tests/benchmarks/gpu_check.py --cpu

For each model (a zoo name or a .safetensors path; ``restore-default`` is the noise-aware
default model) and each size, side by side in one run, at fp32 and at bf16 (bf16 autocast and
channels_last: the actor's default on CUDA):

- **ceiling**: the bare net (``RestoreActor._forward``) on whole images already on the device,
  one at a time: what the GPU can do with no pipeline around it;
- **actor**: ``RestoreActor.restore_arrays`` on host uint8 HWC arrays in batches of ``--batch``
  (pinned transfer, flat-region fill, tiling and blending, the per-image audit statistics,
  rounding to uint8 back on the host): what a restore job's actor does per image;
- **peak memory**: ``torch.cuda.max_memory_allocated`` over each measurement.

Then **quality**: the same actor at fp32 and bf16 on Set12 (and Set5 for colour nets) from
``--data`` with Gaussian noise of sigma 25 (seeded per file as ``restorer eval`` seeds it),
PSNR against the clean images, and the bf16 - fp32 difference in dB and in 8-bit levels.
Without the data folder, synthetic scenes stand in (and the output says so).

Timings are medians of ``--repeats`` after one warm-up pass. Without CUDA (and without
``--cpu``) the script says so and exits with status 1 before it loads anything. It never
imports Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from restorer.image import degrade
from restorer.image.metrics import psnr
from restorer.io.samples import scene
from restorer.pipeline.actor import RestoreActor
from restorer.quality.evaluate import image_files, image_seed, read_image

log = logging.getLogger("gpu_check")

PRECISIONS = ("fp32", "bf16")
SIGMA = 25.0  # Gaussian noise of the quality check, 0-255 scale


@dataclass
class SpeedRow:
    model: str
    arch: str
    size: int
    precision: str
    tile: int
    ceiling_images_per_s: float
    actor_images_per_s: float
    actor_megapixels_per_s: float
    actor_over_ceiling: float
    ceiling_peak_mib: float | None  # None on CPU
    actor_peak_mib: float | None


@dataclass
class QualityRow:
    model: str
    dataset: str  # set12 / set5, or "synthetic" without the data folder
    images: int
    psnr_fp32: float
    psnr_bf16: float
    bf16_minus_fp32_db: float
    max_levels: int  # largest |bf16 - fp32| output difference, 8-bit levels
    mean_levels: float


@dataclass
class Report:
    device: str
    torch: str
    note: str
    speed: list[SpeedRow] = field(default_factory=list)
    quality: list[QualityRow] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: cuDNN autotuning, the allocator, first-call costs
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _arch(actor: RestoreActor) -> str:
    net = actor.net
    name = getattr(getattr(net, "_orig_mod", net), "__class__").__name__
    return f"{name}{' (noise-aware)' if actor.noise_aware else ''}"


def speed_rows(model: str, sizes: list[int], images: int, batch: int, repeats: int,
               device: torch.device) -> list[SpeedRow]:
    """Ceiling and actor images/s for ``model`` at each size and precision."""
    rows = []
    for precision in PRECISIONS:
        actor = RestoreActor(model=model, precision=precision, device=str(device))
        for size in sizes:
            arrays = [np.round(scene(size, size, actor.channels, seed) * 255).astype(np.uint8)
                      for seed in range(images)]
            on_device = [torch.from_numpy(a).permute(2, 0, 1)[None].float().div(255)
                         .to(device) for a in arrays]

            def ceiling():
                for x in on_device:
                    actor._forward(x)

            def restore():
                for start in range(0, len(arrays), batch):
                    actor.restore_arrays(arrays[start:start + batch])

            _reset_peak(device)
            ceiling_seconds = _median_seconds(ceiling, repeats, device)
            ceiling_peak = _peak_mib(device)
            _reset_peak(device)
            actor_seconds = _median_seconds(restore, repeats, device)
            actor_peak = _peak_mib(device)
            rows.append(SpeedRow(
                model, _arch(actor), size, precision, actor.tile,
                images / ceiling_seconds, images / actor_seconds,
                images * size * size / 1e6 / actor_seconds, ceiling_seconds / actor_seconds,
                ceiling_peak, actor_peak))
            log.info("%s %d px %s: ceiling %.1f, actor %.1f images/s", model, size, precision,
                     rows[-1].ceiling_images_per_s, rows[-1].actor_images_per_s)
        del actor
        _reset_peak(device)
    return rows


def test_images(data: Path | None, channels: int, crop: int) -> list[tuple[str, list]]:
    """(dataset name, [(file name, clean uint8 HWC)]) for the quality check: Set12 for every
    net (gray, HWx1), Set5 too for colour nets; synthetic scenes without ``data``. ``crop``
    (>0) keeps the central crop of that side."""
    def central(img: np.ndarray) -> np.ndarray:
        if crop <= 0:
            return img
        y0, x0 = max(0, (img.shape[0] - crop) // 2), max(0, (img.shape[1] - crop) // 2)
        return img[y0:y0 + crop, x0:x0 + crop]

    if data is None or not (data / "set12").is_dir():
        side = crop if crop > 0 else 256
        return [("synthetic", [(f"scene{i}", np.round(scene(side, side, channels, i) * 255)
                                .astype(np.uint8)) for i in range(4)])]
    sets = [("set12", [(p.name, central(read_image(p, 1))[..., None])
                       for p in image_files(data / "set12")])]
    if channels == 3 and (data / "set5").is_dir():
        sets.append(("set5", [(p.name, central(read_image(p, 3)))
                              for p in image_files(data / "set5")]))
    return sets


def quality_rows(model: str, data: Path | None, crop: int, device: torch.device
                 ) -> list[QualityRow]:
    """PSNR of the actor's outputs at fp32 and bf16 on noisy test images (sigma 25)."""
    actors = {p: RestoreActor(model=model, precision=p, device=str(device)) for p in PRECISIONS}
    rows = []
    for dataset, images in test_images(data, actors["fp32"].channels, crop):
        scores: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        diffs: list[np.ndarray] = []
        for name, clean in images:
            rng = np.random.default_rng(image_seed(name))
            noisy = np.round(degrade.to_8bit(degrade.add_gaussian_noise(
                clean / 255.0, SIGMA, rng)) * 255).astype(np.uint8)
            outputs = {p: actors[p].restore_arrays([noisy])[0][0] for p in PRECISIONS}
            for p in PRECISIONS:
                scores[p].append(psnr(outputs[p], clean))
            diffs.append(np.abs(outputs["bf16"].astype(np.int16) - outputs["fp32"]))
        fp32, bf16 = (float(np.mean(scores[p])) for p in PRECISIONS)
        rows.append(QualityRow(model, dataset, len(images), fp32, bf16, bf16 - fp32,
                               int(max(d.max() for d in diffs)),
                               float(np.mean([d.mean() for d in diffs]))))
    return rows


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_tables(report: Report) -> None:
    print(f"\n{report.device}, torch {report.torch}. {report.note}\n")
    print("| model | size | precision | tile | ceiling images/s | actor images/s | actor MP/s "
          "| actor / ceiling | peak MiB ceiling / actor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report.speed:
        print(f"| {r.model} ({r.arch}) | {r.size} | {r.precision} | {r.tile} "
              f"| {r.ceiling_images_per_s:.1f} | {r.actor_images_per_s:.1f} "
              f"| {r.actor_megapixels_per_s:.1f} | {r.actor_over_ceiling:.3f} "
              f"| {_mib(r.ceiling_peak_mib)} / {_mib(r.actor_peak_mib)} |")
    by_key = {(r.model, r.size, r.precision): r for r in report.speed}
    for (model, size, precision), r in by_key.items():
        if precision == "bf16" and (model, size, "fp32") in by_key:
            base = by_key[model, size, "fp32"]
            print(f"{model} {size} px: bf16 / fp32 through the actor = "
                  f"{r.actor_images_per_s / base.actor_images_per_s:.3f}")
    print("\n| model | set (sigma 25) | images | PSNR fp32 | PSNR bf16 | bf16 - fp32 dB "
          "| max / mean level difference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for q in report.quality:
        print(f"| {q.model} | {q.dataset} | {q.images} | {q.psnr_fp32:.3f} | {q.psnr_bf16:.3f} "
              f"| {q.bf16_minus_fp32_db:+.3f} | {q.max_levels} / {q.mean_levels:.3f} |")


def default_data() -> Path:
    """The shared test images: ``$RESTORER_SHARED_DIR/data``, else ``shared/data`` beside the
    checkout, else inside it (a copy of the working tree on a leased machine)."""
    repo = Path(__file__).resolve().parents[2]
    candidates = [Path(os.environ["RESTORER_SHARED_DIR"]) / "data"] if os.environ.get(
        "RESTORER_SHARED_DIR") else []
    candidates += [repo.parent / "shared" / "data", repo / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["restore-default", "denoise-gray"])
    parser.add_argument("--sizes", type=int, nargs="+", help="square image sides, px "
                        "(default 512 1024; with --cpu 64 96)")
    parser.add_argument("--images", type=int, help="images per size (default 16; --cpu 2)")
    parser.add_argument("--batch", type=int, default=8, help="images per restore_arrays call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=str(default_data()),
                        help="folder with set12/ and set5/ (default $RESTORER_SHARED_DIR/data, "
                        "../shared/data or ./shared/data, the first found)")
    parser.add_argument("--crop", type=int, help="quality check on central crops of this side "
                        "(default: whole images; --cpu 48)")
    parser.add_argument("--cpu", action="store_true", help="smoke run on the CPU, tiny sizes")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False); run it on a GPU machine, or pass --cpu "
              "for a smoke run on tiny sizes", file=sys.stderr)
        return 1
    device = torch.device("cpu" if args.cpu else "cuda")
    sizes = args.sizes or ([64, 96] if args.cpu else [512, 1024])
    images = args.images or (2 if args.cpu else 16)
    crop = args.crop if args.crop is not None else (48 if args.cpu else 0)
    data = Path(args.data) if args.data and Path(args.data).is_dir() else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
        note = ""
    else:
        name = "CPU (smoke run)"
        from restorer.pipeline.actor import cpu_has_bf16

        note = ("This CPU has native bf16: bf16 rows are bf16 autocast." if cpu_has_bf16()
                else "This CPU has no native bf16: the actor runs bf16 emulated (slow).")
    if data is None:
        note += f" No data folder at {args.data}: synthetic scenes stand in for Set12/Set5."
    report = Report(name, torch.__version__, note.strip())
    for model in args.models:
        report.speed += speed_rows(model, sizes, images, args.batch, args.repeats, device)
        report.quality += quality_rows(model, data, crop, device)
    print_tables(report)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
