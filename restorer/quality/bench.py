"""Side-by-side throughput of one model on the same images, measured in one run.

Three ways to restore the same images with the same model and batch size:

1. **ceiling**: the net's forward pass alone on pre-decoded tensors, in this process, with as
   many torch threads as the machine has cores, at the precision the job's actors run
   (:func:`restorer.pipeline.actor.resolve_precision`: bf16 autocast + channels_last where the CPU
   has native bf16), so that ``efficiency`` compares like with like;
2. **naive**: a plain sequential loop (Pillow decode -> model -> encode -> write), the same
   threads, in eager fp32: what one writes without restorer;
3. **restorer**: the full ``restore`` job on Ray, end to end; start-up (Ray, actors, model
   load) is reported apart from the steady state.

``efficiency = restorer / ceiling`` and ``speedup = restorer / naive`` use the steady state.
The run also writes a calibration (megapixels per second per worker) that ``--dry-run`` uses
to estimate a job's wall time.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from restorer.errors import JobError, SpecError
from restorer.io import codec
from restorer.io.samples import noisy, scene
from restorer.pipeline.actor import resolve_precision, tile_settings
from restorer.weights.zoo import get_model

log = logging.getLogger(__name__)

CALIBRATION = Path(os.environ.get("RESTORER_CACHE", Path.home() / ".cache" / "restorer")) / \
    "bench.json"


def make_images(folder: Path, count: int, size: int, channels: int = 1) -> list[Path]:
    """``count`` noisy synthetic PNGs of ``size`` x ``size`` (a few distinct scenes reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    scenes = [noisy(scene(size, size, channels, seed=s), 25, seed=s) for s in range(4)]
    for i in range(count):
        pixels = np.round(scenes[i % 4] * 255).astype(np.uint8)
        path = folder / f"img{i:05d}.png"
        path.write_bytes(codec.encode(pixels, None, "png"))
        paths.append(path)
    return paths


def ceiling(net: torch.nn.Module, arrays: list[np.ndarray], batch_size: int,
            precision: str = "fp32") -> float:
    """Images/s of the forward pass alone on pre-decoded float tensors (one warm-up batch).

    ``batch_size`` is the number of images per forward pass, as the actor batches tiles;
    ``precision`` ``bf16`` runs it as a CPU actor does (autocast, channels_last).
    """
    import contextlib

    tensors = [torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1) for a in arrays]
    batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]
    low = precision == "bf16"
    if low:
        net = net.to(memory_format=torch.channels_last)
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    with torch.inference_mode(), (torch.autocast("cpu", dtype=torch.bfloat16) if low
                                  else contextlib.nullcontext()):
        net(batches[0])
        started = time.perf_counter()
        for batch in batches:
            net(batch)
    if low:
        net.to(memory_format=torch.contiguous_format)
    return len(tensors) / (time.perf_counter() - started)


def naive(net: torch.nn.Module, paths: list[Path], out: Path) -> dict[str, float]:
    """A plain sequential loop; returns images/s and seconds per image for each stage."""
    out.mkdir(parents=True, exist_ok=True)
    stages = {"read": 0.0, "decode": 0.0, "model": 0.0, "encode": 0.0, "write": 0.0}
    started = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        data = path.read_bytes()
        t1 = time.perf_counter()
        image = codec.decode(data)
        t2 = time.perf_counter()
        with torch.inference_mode():
            x = torch.from_numpy(image.pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
            y = net(x)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        t3 = time.perf_counter()
        encoded = codec.encode(y, None, "png")
        t4 = time.perf_counter()
        (out / path.name).write_bytes(encoded)
        t5 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[name] += seconds
    total = time.perf_counter() - started
    return {"images_per_second": len(paths) / total,
            **{f"{k}_ms_per_image": 1000 * v / len(paths) for k, v in stages.items()}}


def run_bench(count: int = 128, size: int = 256, model: str | None = None, batch_size: int = 8,
              folder: str | None = None, num_cpus: int = 0) -> dict[str, Any]:
    """Measure ceiling, naive loop and restorer on ``count`` images of ``size`` pixels."""
    from restorer.pipeline import restore

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    loaded = get_model(model)
    net = loaded.net
    with tempfile.TemporaryDirectory(prefix="restorer-bench-") as scratch:
        scratch_path = Path(scratch)
        if folder:
            paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in
                           (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"))[:count]
        else:
            paths = make_images(scratch_path / "in", count, size, net.channels)
        arrays = [codec.decode(p.read_bytes()).pixels for p in paths]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise SpecError(f"bench needs images of one shape, found {sorted(shapes)}")
        if arrays[0].shape[-1] != net.channels:
            arrays = [a[..., :1] if net.channels == 1 else np.repeat(a, 3, -1) for a in arrays]
        megapixels = arrays[0].shape[0] * arrays[0].shape[1] / 1e6

        precision = resolve_precision("auto", False, net)  # the CPU job's, as resolved
        log.info("bench: ceiling (forward only, %d threads, %s)", threads, precision)
        tile_batch = max(1, 65536 // (arrays[0].shape[0] * arrays[0].shape[1]))  # as the actor
        ceiling_ips = max(ceiling(net, arrays, tile_batch, precision)
                          for _ in range(3))  # best of 3
        log.info("bench: naive sequential loop")
        naive_result = naive(net, paths, scratch_path / "naive")
        log.info("bench: restorer job")
        tile = max(arrays[0].shape[:2])
        summary = restore(str(paths[0].parent), str(scratch_path / "restored"),
                          model=loaded.source, tile=tile, batch_size=batch_size,
                          tile_batch=tile_batch, format="png", num_cpus=num_cpus)
    restorer_ips = summary["steady_images_per_second"]
    rate_kind = "steady"
    if not restorer_ips:  # the results came in one burst: no pace to read from them
        restorer_ips, rate_kind = summary["images_per_second"], "end-to-end"
        log.warning("bench: the %d images' results reached the driver in one burst, so the "
                    "job's rate is end to end (start-up included: a low figure); bench with "
                    "more or larger images for a steady rate", len(paths))
    if not restorer_ips:
        raise JobError(f"{len(paths)} images gave no rate; bench with more images")
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                   f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
        "date": time.strftime("%Y-%m-%d"),
        "model": loaded.source, "model_sha256": loaded.sha256,
        "images": len(paths), "image_shape": list(arrays[0].shape), "batch_size": batch_size,
        "tile_batch": tile_batch,
        "torch_threads": threads,
        "precision": precision, "naive_precision": "fp32",
        "ceiling_images_per_second": round(ceiling_ips, 3),
        "naive_images_per_second": round(naive_result["images_per_second"], 3),
        "restorer_images_per_second": round(restorer_ips, 3),
        "restorer_rate": rate_kind,  # "steady" (after start-up) or "end-to-end"
        "restorer_startup_seconds": summary["startup_seconds"],
        "restorer_end_to_end_images_per_second": summary["images_per_second"],
        "efficiency": round(restorer_ips / ceiling_ips, 3),
        "speedup": round(restorer_ips / naive_result["images_per_second"], 3),
        "naive_stages_ms_per_image": {k[:-len("_ms_per_image")]: round(v, 3) for k, v in
                                      naive_result.items() if k.endswith("_ms_per_image")},
        "megapixels_per_second_per_worker": round(restorer_ips * megapixels, 4),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "tile": tile_settings(net, tile, 0)[0],  # as the job's actors ran it
    }
    bound = max(result["naive_stages_ms_per_image"], key=result["naive_stages_ms_per_image"].get)
    result["slowest_stage"] = bound
    save_calibration(result)
    return result


def calibration_key(model_sha256: str, device: str, tile: int) -> str:
    """What a calibration holds for: one model file, on one kind of device, with one tile
    side (tiles of another side overlap more or less, and cost another share)."""
    return f"{model_sha256}/{device}/tile-{tile}"


def save_calibration(result: dict[str, Any]) -> None:
    """Keep ``result`` (with ``model_sha256``, ``device`` and ``tile``) beside the
    calibrations of other models, devices and tiles in :data:`CALIBRATION`."""
    entries = _calibrations()
    entries[calibration_key(result.get("model_sha256", ""), result.get("device", ""),
                            result.get("tile", 0))] = result
    CALIBRATION.parent.mkdir(parents=True, exist_ok=True)
    CALIBRATION.write_text(json.dumps({"calibrations": entries}, indent=2))


def load_calibration(model_sha256: str, device: str, tile: int) -> dict[str, Any] | None:
    """The saved calibration of this model on this kind of device with this tile side, or
    None: a calibration of another model says nothing about this one's speed."""
    return _calibrations().get(calibration_key(model_sha256, device, tile))


def _calibrations() -> dict[str, dict[str, Any]]:
    if not CALIBRATION.exists():
        return {}
    data = json.loads(CALIBRATION.read_text())
    if "calibrations" not in data:  # one result, as restorer before 0.2 saved it
        return {calibration_key(data.get("model_sha256", ""), data.get("device", ""),
                                data.get("tile", 0)): data}
    return data["calibrations"]
