"""What a Ray Train run reads and measures: clean images, degraded batches, validation.

Images are float32 ``[0, 1]``, HW (gray) or HWC (RGB), in numpy; nets take float32 NCHW
``[0, 1]`` tensors. Every random draw comes from an explicit ``numpy.random.Generator``
(:mod:`restorer.train.distributed` seeds one per (seed, rank, step)); validation draws per-image
seeds so that every validation of a run sees the same degraded images. No Ray here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from restorer.errors import JobError
from restorer.image import degrade
from restorer.image.pixels import float_to_uint8, to_float, to_planes
from restorer.io import storage
from restorer.job.specs import Degradation, TrainSpec

# --- data ------------------------------------------------------------------------------------

def load_clean_images(uri: str, channels: int, options: storage.StorageOptions,
                      limit: int = 0, min_side: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Clean images under ``uri`` as float32 HW (gray: a colour file's luma) or HWC (RGB: a
    gray file as three equal planes) in ``[0, 1]`` (:func:`restorer.image.pixels.to_planes`)."""
    from restorer.io.codec import decode

    images, keys = [], []
    for entries in storage.walk_files(uri, options=options):
        for entry in entries:
            pixels = decode(storage.read_bytes(entry.uri, options), name=entry.key).pixels
            image = to_planes(to_float(pixels), channels)
            if min(image.shape[:2]) >= min_side:
                images.append(image)
                keys.append(entry.key)
            if limit and len(images) >= limit:
                return images, keys
    if not images:
        raise JobError(f"No usable images (at least {min_side}px on each side) under {uri}")
    return images, keys


def degrade_batch(clean: np.ndarray, spec: Degradation, rng: np.random.Generator,
                  scale: int = 1) -> np.ndarray:
    """Degrade each patch of ``clean`` (N, H, W[, C]) float32 [0, 1] as ``spec`` says; kind
    ``sr`` shrinks by ``scale`` (MATLAB bicubic, unrounded)."""
    out = []
    for patch in clean:
        kind = spec.kind if spec.kind != "blind" else ("noise", "jpeg")[int(rng.integers(2))]
        if kind == "sr":
            out.append(degrade.bicubic_downscale(patch, scale))
        elif kind == "noise":
            out.append(degrade.add_gaussian_noise(
                patch, float(rng.uniform(spec.sigma_min, spec.sigma_max)), rng))
        elif kind == "jpeg":
            quality = int(rng.integers(spec.quality_min, spec.quality_max + 1))
            as_uint8 = np.round(np.clip(patch, 0, 1) * 255).astype(np.uint8)
            out.append(degrade.jpeg_compress(as_uint8, quality).astype(np.float32) / 255.0)
        else:
            out.append(degrade.gaussian_blur(
                patch, float(rng.uniform(spec.blur_min, spec.blur_max))))
    return np.stack(out).astype(np.float32)


def to_nchw(batch: np.ndarray) -> torch.Tensor:
    """N HW[C] float32 images -> an NCHW tensor (sharing memory where it can)."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch))
    return tensor[:, None] if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)


# --- validation ------------------------------------------------------------------------------

def validate_net(net: torch.nn.Module, images: list[np.ndarray], spec: Degradation,
                 crop: int, seed: int = 0) -> dict[str, float]:
    """Mean PSNR/SSIM of ``net`` on degraded copies of ``images`` (fixed per-image seeds;
    output clamped, x255, rounded to uint8, as the reference code)."""
    from restorer.image import metrics

    psnrs, ssims, inputs = [], [], []
    net.eval()
    for index, image in enumerate(images):
        if crop:
            top = max(0, (image.shape[0] - crop) // 2)
            left = max(0, (image.shape[1] - crop) // 2)
            image = image[top:top + crop, left:left + crop]
        rng = np.random.default_rng([seed, index])
        kind = "noise" if spec.kind in ("noise", "blind") else spec.kind
        scale = net.scale
        if kind == "sr":
            image = image[: image.shape[0] - image.shape[0] % scale,
                          : image.shape[1] - image.shape[1] % scale]
            degraded = degrade.bicubic_downscale(image, scale)
        elif kind == "noise":
            degraded = degrade.add_gaussian_noise(image, spec.val_sigma, rng)
        elif kind == "jpeg":
            degraded = degrade.jpeg_compress(np.round(image * 255).astype(np.uint8),
                                             spec.val_quality).astype(np.float32) / 255.0
        else:
            degraded = degrade.gaussian_blur(image, (spec.blur_min + spec.blur_max) / 2)
        with torch.no_grad():
            restored = net(to_nchw(degraded[None]))[0]
        restored = restored[0] if image.ndim == 2 else restored.permute(1, 2, 0)
        clean8 = float_to_uint8(image)
        psnrs.append(metrics.psnr(float_to_uint8(restored.numpy()), clean8))
        ssims.append(metrics.ssim(float_to_uint8(restored.numpy()), clean8))
        shown = degrade.bicubic_resize(degraded, float(scale)) if kind == "sr" else degraded
        inputs.append(metrics.psnr(float_to_uint8(shown), clean8))
    return {"val_psnr": float(np.mean(psnrs)), "val_ssim": float(np.mean(ssims)),
            "val_input_psnr": float(np.mean(inputs))}


def validation_samples(spec: TrainSpec, model: bytes, count: int = 3,
                       crop: int = 128) -> list[dict[str, Any]]:
    """Degraded / restored / clean centre crops of the first validation images (uint8 HWC)."""
    from restorer.image import metrics
    from restorer.weights.checkpoint import load_model_bytes

    if not spec.data.val_uri:
        return []
    net = load_model_bytes(model, "the run's best model").net
    images, keys = load_clean_images(spec.data.val_uri, net.channels, spec.storage.options(),
                                     limit=count)
    samples = []
    scale = net.scale
    for index, (image, key) in enumerate(zip(images, keys)):
        top, left = max(0, (image.shape[0] - crop) // 2), max(0, (image.shape[1] - crop) // 2)
        clean = image[top:top + crop, left:left + crop]
        clean = clean[: clean.shape[0] - clean.shape[0] % scale,
                      : clean.shape[1] - clean.shape[1] % scale]
        degraded = degrade_batch(clean[None], dataclasses.replace(
            spec.degradation, sigma_min=spec.degradation.val_sigma,
            sigma_max=spec.degradation.val_sigma, kind="noise" if spec.degradation.kind in (
                "noise", "blind") else spec.degradation.kind,
            quality_min=spec.degradation.val_quality, quality_max=spec.degradation.val_quality),
            np.random.default_rng([spec.optim.seed, index]), scale)[0]
        with torch.no_grad():
            restored = net(to_nchw(degraded[None]))[0]
        if scale > 1:  # shown (and measured) at the clean image's size, as bicubic upscales
            degraded = degrade.bicubic_resize(degraded, float(scale))
        restored = restored[0].numpy() if clean.ndim == 2 else restored.permute(1, 2, 0).numpy()

        def hwc(array):
            array = float_to_uint8(array)
            return array[..., None] if array.ndim == 2 else array

        samples.append({"name": key, "degraded": hwc(degraded), "restored": hwc(restored),
                        "clean": hwc(clean),
                        "input_psnr": metrics.psnr(hwc(degraded), hwc(clean)),
                        "psnr": metrics.psnr(hwc(restored), hwc(clean))})
    return samples


__all__ = ["degrade_batch", "load_clean_images", "to_nchw", "validate_net", "validation_samples"]
