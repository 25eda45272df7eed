"""Planning an overnight job before running it: ``restorer restore ... --dry-run``.

Lists the inputs (streaming, counting only), reads the headers of a random sample to estimate
megapixels (Pillow reads sizes without decoding pixels), and estimates wall time and GPU-hours
from the ``restorer bench`` calibration (megapixels per second per worker) of this model (by
sha256), on this kind of device, with this tile side; without one, from a quick timing of this
model here. The estimate scales with the sampled megapixels, counts only the workers that
have an image to restore (one 12 MP photo keeps one worker busy, whatever ``--workers``), and
adds the start-up of an embedded Ray (:data:`EMBEDDED_STARTUP_SECONDS`).
"""

from __future__ import annotations

import io
import logging
import os
import random
from typing import Any

from PIL import Image

from restorer.io import codec, storage
from restorer.job.specs import RestoreSpec
from restorer.pipeline.graph import source_config
from restorer.pipeline.sources.listing import detect_layout, expand, listing_tasks
from restorer.quality.bench import load_calibration

log = logging.getLogger(__name__)

# Start-up of a job on an embedded Ray before its first image is restored: Ray, the actors,
# torch and the model in them. Measured on the 2-core development machine (2026-12-06), the
# README's main job (6 samples, 0.3 MP, ~1 s of restoring): first results after 11.6 s beside a
# training process at nice 19, the whole job in 8.6 s on the quiet machine. A connected
# cluster's start-up (its actors only, or nodes to add) is not estimated.
EMBEDDED_STARTUP_SECONDS = 10.0


def forecast_job(spec: RestoreSpec, workers: int, sample_size: int = 200,
             seed: int = 0) -> dict[str, Any]:
    """Count inputs and estimate megapixels, wall time and GPU-hours for ``workers`` workers."""
    spec = spec.validate()
    options = spec.storage.options()
    layout = detect_layout(spec.input.uri, spec.input.layout, options)
    config = source_config(spec, layout)
    rng = random.Random(seed)
    count = refused = input_bytes = 0
    sample: list[dict[str, Any]] = []
    for task in listing_tasks(spec.input.uri, config):
        for unit in expand(task, config):
            for row in unit:
                if spec.input.limit and count >= spec.input.limit:
                    break
                if row["status"] == "failed":
                    refused += 1
                    continue
                count += 1
                input_bytes += row["size"]
                if len(sample) < sample_size:  # reservoir sample of the listing
                    sample.append(row)
                elif rng.random() < sample_size / count:
                    sample[rng.randrange(sample_size)] = row
    pixels = []
    for row in sample:
        try:
            data = row["data"] or storage.read_bytes(row["uri"], options)
            width, height = Image.open(io.BytesIO(data), formats=codec.DECODE_FORMATS).size
            pixels.append(width * height)
        except Exception as e:  # noqa: BLE001 - unreadable samples are simply not measured
            log.debug("not measuring %s: %s", row.get("uri"), e)
            continue
    mean_megapixels = sum(pixels) / len(pixels) / 1e6 if pixels else 0.0
    megapixels = mean_megapixels * count
    model, device, tile = _what_runs(spec)
    calibration = (load_calibration(model.sha256, device, tile)
                   or quick_calibration(spec, mean_megapixels, device))
    plan: dict[str, Any] = {
        "input": spec.input.uri, "layout": layout, "images": count,
        "refused_at_listing": refused, "input_bytes": input_bytes,
        "sampled": len(pixels), "mean_megapixels": round(mean_megapixels, 4),
        "megapixels": round(megapixels, 1), "workers": workers,
        "model": model.source, "model_sha256": model.sha256, "device": device, "tile": tile,
    }
    if calibration:
        busy = max(1, min(workers, count))  # an image is restored by one worker
        rate = calibration["megapixels_per_second_per_worker"] * busy
        work = megapixels / rate if rate else float("inf")
        embedded = not (spec.resources.address or os.environ.get("RAY_ADDRESS"))
        startup = EMBEDDED_STARTUP_SECONDS if embedded else None
        seconds = work + (startup or 0.0)
        plan.update(calibration_from=f"{calibration['machine']} on {calibration['date']} "
                                     f"({calibration['device']})",
                    busy_workers=busy,
                    work_seconds=float(f"{work:.4g}"),  # 4 significant digits: small jobs too
                    startup_seconds=startup,
                    estimated_seconds=float(f"{seconds:.4g}"),
                    estimated_hours=round(seconds / 3600, 2),
                    gpu_hours=round(seconds / 3600 * workers, 2)
                    if calibration["device"] == "cuda" else 0.0)
    else:
        plan["estimate"] = "no estimate: the model could not be timed here"
    return plan


def _what_runs(spec: RestoreSpec) -> tuple[Any, str, int]:
    """(the loaded model, the device kind its actors would use, the tile side they would use):
    what a calibration must match."""
    import torch

    from restorer.pipeline.actor import tile_settings
    from restorer.weights.zoo import get_model

    model = get_model(spec.model.name or None, spec.storage.options())
    gpus = spec.resources.gpus_per_worker
    device = "cuda" if gpus > 0 or gpus == -1.0 and torch.cuda.is_available() else "cpu"
    return model, device, tile_settings(model.net, spec.model.tile, spec.model.overlap)[0]


def quick_calibration(spec: RestoreSpec, mean_megapixels: float, device: str = "auto",
                      seconds: float = 3.0) -> dict[str, Any] | None:
    """Time the job's model on this machine's device (a GPU if it has one) for a few seconds
    on synthetic images of the inputs' mean size (capped at 1 MP), through the same actor and
    tiling as the job. The actor alone: decode, encode and storage are not counted, so on a
    fast GPU the estimate is optimistic; ``restorer bench`` measures the whole pipeline."""
    import platform
    import time

    import numpy as np
    import torch

    from restorer.pipeline import RestoreActor

    try:
        actor = RestoreActor(spec.model.name or None, tile=spec.model.tile,
                             overlap=spec.model.overlap, precision=spec.model.precision,
                             storage_options=spec.storage.options(),
                             device=device if device != "cuda" or torch.cuda.is_available()
                             else "cpu")
    except Exception as e:  # noqa: BLE001 - no estimate is better than no plan
        log.warning("could not time the model for an estimate: %s", e)
        return None
    side = int(min(max(mean_megapixels, 0.01), 1.0) ** 0.5 * 1000)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(2)]
    actor.restore_arrays(images[:1])  # warm-up: first-call costs are not the job's rate
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done == 0:
        actor.restore_arrays(images)
        done += len(images)
    rate = done * side * side / 1e6 / (time.perf_counter() - started)
    return {"megapixels_per_second_per_worker": round(rate, 4), "device": actor.device.type,
            "machine": f"this machine ({platform.machine()}, quick timing of the model alone)",
            "date": time.strftime("%Y-%m-%d")}
