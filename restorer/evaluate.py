"""Measure a restoration model on a folder of clean test images (Set12, classic5, Set5 ...).

The protocol is that of the DnCNN/FFDNet reference code (``shared/data/README.md``):

1. each clean image is read as uint8 and converted to the net's planes (1: Pillow ``"L"``,
   3: ``"RGB"``), then to float32 ``[0, 1]``;
2. the degraded input is synthesised with :mod:`restorer.degrade`. Noise is drawn from
   ``numpy.random.default_rng(zlib.crc32(file name))``, a seed fixed per image that depends on
   the file name only (not on listing order or sigma), and it is *not* clipped: the net sees the
   unclipped noisy float;
3. the net runs on the whole image under ``torch.no_grad()`` (float32 NCHW ``[0, 1]``);
4. its output is clamped to ``[0, 1]``, scaled by 255 and rounded to uint8;
5. PSNR (float64, ``[0, 255]``) and SSIM (11x11 Gaussian window, sigma 1.5) against the clean
   uint8 image: on the whole image for denoising, on the Y channel for JPEG on colour images,
   and on Y with the border cropped by the scale for super-resolution.

``input_psnr`` measures the degraded input the same way (clamped, scaled, rounded), i.e. the
image a user would have saved; for unclipped sigma-25 noise that is a little above the
20.17 dB of the raw noise.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from restorer import degrade, metrics
from restorer.checkpoint import LoadedModel
from restorer.models import get_model

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
TASKS = ("denoise", "jpeg", "sr")
BASELINES = ("nlm",)


def image_files(folder: str | Path) -> list[Path]:
    """The image files (by suffix, see ``IMAGE_SUFFIXES``) directly in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    return files


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """``path`` as uint8: HW for ``channels=1`` (Pillow ``"L"``), HWx3 for ``channels=3``."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with Image.open(path) as im:
        return np.asarray(im.convert("L" if channels == 1 else "RGB"))


def image_seed(name: str) -> int:
    """The noise seed of the test image called ``name`` (a file name): its CRC-32."""
    return zlib.crc32(name.encode("utf-8"))


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float ``[0, 1]`` (any range accepted) -> uint8: clamp to ``[0, 1]``, x255, round."""
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def run_net(net: nn.Module, img: np.ndarray) -> np.ndarray:
    """Run ``net`` on one whole float32 image HW or HWC (any range) and return float32 HW/HWC.

    The output is not clamped. The net is used in eval mode under ``torch.no_grad()``; its
    train/eval mode is restored afterwards.
    """
    was_training = net.training
    net.eval()
    try:
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        x = x[None, None] if img.ndim == 2 else x.permute(2, 0, 1)[None]
        device = next(net.parameters()).device
        with torch.no_grad():
            y = net(x.to(device))[0].cpu()
    finally:
        net.train(was_training)
    return (y[0] if img.ndim == 2 else y.permute(1, 2, 0)).numpy()


def _as_net(model: str | LoadedModel | nn.Module) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, LoadedModel):
        return model.net
    return get_model(model).net


def _measured(img: np.ndarray, task: str, scale: int | None) -> np.ndarray:
    """The part of a uint8 image that the task's convention measures."""
    if task in ("jpeg", "sr") and img.ndim == 3:
        img = metrics.rgb_to_y(img)
    if task == "sr":
        img = metrics.crop_border(img, scale)
    return img


def _nlm_baseline(noisy: np.ndarray, sigma_255: float) -> np.ndarray:
    """scikit-image non-local means told the true noise std (as BM3D is in published tables)."""
    from skimage.restoration import denoise_nl_means

    sigma = sigma_255 / 255.0
    return denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5,
                            patch_distance=6, channel_axis=2 if noisy.ndim == 3 else None)


def evaluate(model: str | LoadedModel | nn.Module, data_dir: str | Path, task: str = "denoise",
             sigma: float = 25, quality: int | None = None, scale: int | None = None,
             baseline: str | None = None) -> dict[str, Any]:
    """Restore every image in ``data_dir`` after degrading it, and measure PSNR/SSIM.

    ``model``: a zoo name, a model path, a ``LoadedModel`` or a net (float32 NCHW ``[0, 1]`` in
    and out). ``task``: ``"denoise"`` (Gaussian noise of std ``sigma`` on the 0-255 scale),
    ``"jpeg"`` (Pillow JPEG at ``quality`` in [1, 100]) or ``"sr"`` (MATLAB bicubic downscale by
    ``scale``; a net with ``scale == 1`` gets the bicubic upscale back to full size, as DnCNN-3,
    and the image is first cropped to a multiple of ``scale``). ``baseline="nlm"`` adds
    scikit-image non-local means given the true sigma (denoising only; a few seconds per
    512x512 image).

    Returns ``{"task", "sigma"|"quality"|"scale", "count", "psnr", "ssim", "input_psnr",
    ["baseline_psnr"], "seconds", "rows"}`` where ``rows`` holds one dict per image with
    ``name``, ``psnr``, ``ssim``, ``input_psnr`` (and ``baseline_psnr``); means are in dB.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {list(TASKS)}")
    if task == "jpeg" and (quality is None or not 1 <= quality <= 100):
        raise ValueError(f"task 'jpeg' needs quality in [1, 100], got {quality}")
    if task == "sr" and not (isinstance(scale, int) and scale >= 2):
        raise ValueError(f"task 'sr' needs an integer scale >= 2, got {scale!r}")
    if task == "denoise" and not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if baseline is not None and (baseline not in BASELINES or task != "denoise"):
        raise ValueError(f"Unknown baseline {baseline!r} for task {task!r}; "
                         f"denoising offers {list(BASELINES)}")
    net = _as_net(model)
    channels = getattr(net, "channels", 1)
    net_scale = getattr(net, "scale", 1)
    started = time.perf_counter()
    rows = []
    for path in image_files(data_dir):
        clean8 = read_image(path, channels)
        if task == "sr":
            height, width = clean8.shape[:2]
            clean8 = clean8[: height - height % scale, : width - width % scale]
        clean = clean8.astype(np.float32) / 255.0
        if task == "denoise":
            degraded = degrade.add_gaussian_noise(clean, sigma, np.random.default_rng(
                image_seed(path.name)))
        elif task == "jpeg":
            degraded = degrade.jpeg_compress(clean8, quality).astype(np.float32) / 255.0
        else:
            degraded = degrade.bicubic_downscale(clean, scale)
        if task == "sr" and net_scale == 1:
            degraded = degrade.bicubic_resize(degraded, float(scale))
        restored8 = to_uint8(run_net(net, degraded))
        if restored8.shape != clean8.shape:
            raise ValueError(f"the net turned {path.name} of shape {clean8.shape} into "
                             f"{restored8.shape}; does its scale match the task?")
        target = _measured(clean8, task, scale)
        row = {"name": path.name,
               "psnr": metrics.psnr(_measured(restored8, task, scale), target),
               "ssim": metrics.ssim(_measured(restored8, task, scale), target)}
        if degraded.shape == clean8.shape:
            row["input_psnr"] = metrics.psnr(_measured(to_uint8(degraded), task, scale), target)
        else:  # LR input of an SR net: measure the bicubic upscale
            upscaled = to_uint8(degrade.bicubic_resize(degraded, float(scale)))
            row["input_psnr"] = metrics.psnr(_measured(upscaled, task, scale), target)
        if baseline == "nlm":
            row["baseline_psnr"] = metrics.psnr(to_uint8(_nlm_baseline(degraded, sigma)), clean8)
        log.debug("%s: %s", path.name, row)
        rows.append(row)
    result: dict[str, Any] = {"task": task}
    if task == "denoise":
        result["sigma"] = sigma
    elif task == "jpeg":
        result["quality"] = quality
    else:
        result["scale"] = scale
    result["count"] = len(rows)
    for key in ("psnr", "ssim", "input_psnr", "baseline_psnr"):
        if key in rows[0]:
            result[key] = float(np.mean([row[key] for row in rows]))
    result["seconds"] = time.perf_counter() - started
    result["rows"] = rows
    return result


__all__ = ["IMAGE_SUFFIXES", "TASKS", "evaluate", "image_files", "image_seed", "read_image",
           "run_net", "to_uint8"]
