"""Measure a restoration model on a folder of clean test images (Set12, classic5, Set5 ...).

The protocol is that of the DnCNN/FFDNet reference code (``shared/data/README.md``):

1. each clean image is read as uint8 as the restore pipeline would see it: a gray file as
   one plane (a 3-channel net sees three equal planes, with equal noise, and its output
   planes are averaged), a colour file as RGB (a 1-channel net restores each plane on its own
   and JPEG/SR are measured on Y), except that 1-channel denoising reads colour files as
   Pillow ``"L"``; then to float32 ``[0, 1]``;
2. the degraded input is synthesised with :mod:`restorer.image.degrade`. Noise is drawn from
   ``numpy.random.default_rng(zlib.crc32(file name))``, a seed fixed per image that depends on
   the file name only (not on listing order or sigma), and it is *not* clipped: the net sees the
   unclipped noisy float;
3. the net runs on the whole image under ``torch.no_grad()`` (float32 NCHW ``[0, 1]``);
   a 1-channel net on an RGB image runs once per plane;
4. its output is clamped to ``[0, 1]``, scaled by 255 and rounded to uint8;
5. PSNR (float64, ``[0, 255]``) and SSIM (11x11 Gaussian window, sigma 1.5) against the clean
   uint8 image: on the whole image for denoising, on the Y channel for JPEG on colour images,
   and on Y with the border cropped by the scale for super-resolution.

``input_psnr`` measures the degraded input the same way (clamped, scaled, rounded), i.e. the
image a user would have saved; for unclipped sigma-25 noise that is a little above the
20.17 dB of the raw noise.

Options that look at what the whole-image means hide:

- ``trim=(rows, columns)`` cuts rows off the bottom and columns off the right of every clean
  image before anything else, so that a set of 256/512 px images (Set12, classic5) becomes a set
  whose sides are not multiples of 8 (``(1, 3)``: 255x253 and 511x509), made at run time;
- ``edges=True`` adds the PSNR of the outermost ``EDGE_BAND`` (16) pixels on all four sides
  (``band_psnr``) and of the pixels at least ``EDGE_INNER`` (32) from every side
  (``interior_psnr``): a net that restores less well near the image's sides shows a gap;
- ``frame=LEVEL`` places each clean image inside a flat frame of ``FRAME`` (48) pixels of that
  gray level (0 black, 128 mid-gray) and degrades the image inside only; the model restores the
  framed image, PSNR/SSIM are taken on the image inside, and ``band_psnr`` / ``interior_psnr``
  are its ``FRAME_BAND`` (24) pixels next to the frame and its pixels at least that far from it
  (72 px from the outer border): a blind denoiser that reads the clean frame as "no noise here"
  leaves the band noisy;
- ``through="actor"`` scores what ``restorer restore`` writes: the degraded image is saved as
  uint8 (clamped, rounded) and restored by :class:`restorer.pipeline.driver.RestoreActor`
  in-process, with its tiling (``tile``) and precision, instead of the bare net on the unclipped
  float;
- ``baseline="bm3d"`` adds BM3D (gray) or CBM3D (colour), from the ``bm3d`` package (the
  ``baseline`` extra), told the true sigma, on the same input the model sees.

:func:`contact_sheet` draws degraded / restored / clean side by side, with zoomed crops, for
a look at what the numbers mean (``restorer eval --sheet OUT.png``).

Size: the measuring protocol, its variants (trim, edges, frame, through the actor, baselines)
and the contact sheet share the per-image loop.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from restorer.image import degrade, flat, metrics
from restorer.image.pixels import (
    float_to_uint8 as to_uint8,  # float [0, 1] -> uint8 (restorer.image.pixels)
)
from restorer.io.codec import DECODE_FORMATS
from restorer.job.progress import Progress
from restorer.weights.checkpoint import LoadedModel
from restorer.weights.zoo import get_model

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
TASKS = ("denoise", "jpeg", "sr", "noise+jpeg", "poisson", "blur+noise")
# Degradations as photos have them: always saved as 8-bit (clipped, rounded) before the model
# sees them, and measured on RGB: Gaussian noise then JPEG, Poisson-Gaussian (signal-dependent)
# noise, Gaussian blur then noise.
PHOTO_TASKS = ("noise+jpeg", "poisson", "blur+noise")
MEASURES = ("auto", "rgb", "y")
BASELINES = ("nlm", "bm3d")
THROUGH = ("net", "actor")
EDGE_BAND = 16  # pixels: the band along the image's sides that `edges` measures
EDGE_INNER = 32  # pixels: the interior it is compared with lies at least this far from every side
FRAME = 48  # pixels: width of the flat frame placed around each image by `frame`
FRAME_BAND = 24  # pixels: the band of the image next to the frame, and the interior's distance


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
    with Image.open(path, formats=DECODE_FORMATS) as im:
        return np.asarray(im.convert("L" if channels == 1 else "RGB"))


def _read_test_image(path: Path, channels: int, task: str) -> np.ndarray:
    """The clean uint8 image the protocol measures, as the restore pipeline would see it.

    A gray file (one plane, or three equal planes) is HW whatever the net: a 3-channel net is
    shown it as three equal planes by :func:`_run_planes`, with equal noise, as the pipeline
    does. A colour file is HWx3 for a 3-channel net, and for a 1-channel net in JPEG and
    super-resolution (restored plane by plane, measured on Y); for 1-channel denoising it is
    Pillow ``"L"`` (the reference convention for gray denoisers).
    """
    rgb = read_image(path, 3)
    if degrade.is_gray(rgb):
        return rgb[..., 0]
    if channels == 1 and task == "denoise":
        return read_image(path, 1)
    return rgb


def image_seed(name: str) -> int:
    """The noise seed of the test image called ``name`` (a file name): its CRC-32."""
    return zlib.crc32(name.encode("utf-8"))


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


def _run_planes(net: nn.Module, img: np.ndarray) -> np.ndarray:
    """:func:`run_net`, adapted as the pipeline adapts: a 1-channel net restores each plane
    of an HWC image on its own; a 3-channel net sees an HW image as three equal planes and
    returns the mean of its output planes."""
    channels = getattr(net, "channels", 1)
    if img.ndim == 3 and channels == 1:
        return np.stack([run_net(net, img[..., c]) for c in range(img.shape[2])], axis=2)
    if img.ndim == 2 and channels > 1:
        return run_net(net, np.repeat(img[..., None], channels, axis=2)).mean(axis=2)
    return run_net(net, img)


def _as_net(model: str | LoadedModel | nn.Module, flat_fill: str = "off") -> nn.Module:
    """The net to run on whole images: with flat regions filled (:mod:`restorer.image.flat`) when
    ``flat_fill`` says so for this model (``auto``: from its provenance; a bare net has none)."""
    if isinstance(model, nn.Module):
        net, provenance = model, {}
    else:
        loaded = model if isinstance(model, LoadedModel) else get_model(model)
        net, provenance = loaded.net, loaded.provenance
    if flat.wanted(flat_fill, provenance, getattr(net, "scale", 1)):
        return flat.FlatFilled(net)
    return net


def _measured(img: np.ndarray, task: str, scale: int | None, measure: str = "auto"
              ) -> np.ndarray:
    """The part of a uint8 image that the task's convention measures (``measure="auto"``: Y
    for JPEG and SR on colour images, all planes otherwise), or the planes ``measure`` names
    (``"rgb"``: all, ``"y"``: luma)."""
    luma = task in ("jpeg", "sr") if measure == "auto" else measure == "y"
    if luma and img.ndim == 3:
        img = metrics.rgb_to_y(img)
    if task == "sr":
        img = metrics.crop_border(img, scale)
    return img


def photo_degradation(clean: np.ndarray, task: str, rng: np.random.Generator,
                      sigma: float = 15.0, quality: int | None = 75, shot: float = 0.004,
                      read: float = (2 / 255) ** 2, blur: float = 1.2) -> np.ndarray:
    """A photo task's degraded image (float ``[0, 1]``, on the 8-bit grid) of ``clean`` (float
    HW or HWC ``[0, 1]``): ``"noise+jpeg"``: white Gaussian noise of std ``sigma`` (0-255),
    saved as 8-bit, then JPEG at ``quality``; ``"poisson"``: noise of variance ``shot * x +
    read`` at intensity ``x`` (:func:`restorer.image.degrade.add_poisson_gaussian_noise`), 8-bit;
    ``"blur+noise"``: Gaussian blur of std ``blur`` px, noise ``sigma``, 8-bit. A gray image's
    planes share their noise."""
    if task == "noise+jpeg":
        noisy = degrade.to_8bit(degrade.add_gaussian_noise(clean, sigma, rng))
        return degrade.jpeg_float(noisy, quality)
    if task == "poisson":
        return degrade.to_8bit(degrade.add_poisson_gaussian_noise(clean, shot, read, rng))
    if task == "blur+noise":
        return degrade.to_8bit(degrade.add_gaussian_noise(degrade.gaussian_blur(clean, blur),
                                                          sigma, rng))
    raise ValueError(f"Unknown photo task {task!r}; choose from {list(PHOTO_TASKS)}")


def _nlm_baseline(noisy: np.ndarray, sigma_255: float) -> np.ndarray:
    """scikit-image non-local means told the true noise std (as BM3D is in published tables)."""
    from skimage.restoration import denoise_nl_means

    sigma = sigma_255 / 255.0
    return denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5,
                            patch_distance=6, channel_axis=2 if noisy.ndim == 3 else None)


def _bm3d_baseline(noisy: np.ndarray, sigma_255: float) -> np.ndarray:
    """BM3D (HW) or CBM3D (HWx3) from the ``bm3d`` package, told the true noise std."""
    try:
        import bm3d
    except ImportError as e:
        raise ValueError("baseline 'bm3d' needs the bm3d package: pip install 'restorer[baseline]'"
                         ) from e
    noisy = noisy.astype(np.float64)
    if noisy.ndim == 3:
        return bm3d.bm3d_rgb(noisy, sigma_psd=sigma_255 / 255.0)
    return bm3d.bm3d(noisy, sigma_psd=sigma_255 / 255.0)


def _baseline(name: str, noisy: np.ndarray, sigma_255: float) -> np.ndarray:
    """The classical denoiser ``name`` (one of ``BASELINES``) on ``noisy``, told ``sigma_255``."""
    return (_bm3d_baseline if name == "bm3d" else _nlm_baseline)(noisy, sigma_255)


def band_psnrs(restored: np.ndarray, clean: np.ndarray, box: tuple[int, int, int, int],
               band: int, inner: int) -> tuple[float, float]:
    """PSNR (dB, ``[0, 255]`` scale) of a band along the sides of a box, and of its interior.

    ``restored``, ``clean``: same-shape HW or HWC uint8 arrays. ``box``: ``(top, left, height,
    width)`` of the region measured. The band is the box's pixels less than ``band`` pixels from
    one of its sides; the interior its pixels at least ``inner`` pixels from all of them.
    """
    top, left, height, width = box
    if min(height, width) <= 2 * inner:
        raise ValueError(f"a region of {height}x{width} px has no interior {inner} px from its "
                         f"sides; use images larger than {2 * inner} px on both sides")
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    distance = np.minimum(np.minimum(rows, height - 1 - rows), np.minimum(cols, width - 1 - cols))
    region = (slice(top, top + height), slice(left, left + width))
    a, b = restored[region], clean[region]
    return (metrics.psnr(a[distance < band][None], b[distance < band][None]),
            metrics.psnr(a[distance >= inner][None], b[distance >= inner][None]))


def _framed(img: np.ndarray, level: float) -> np.ndarray:
    """``img`` (HW or HWC) inside a flat frame of ``FRAME`` pixels of value ``level``."""
    pad = ((FRAME, FRAME), (FRAME, FRAME)) + ((0, 0),) * (img.ndim - 2)
    return np.pad(img, pad, mode="constant", constant_values=level)


def _actor_runner(model: str | LoadedModel | nn.Module | None, tile: int, precision: str,
                  flat_fill: str = "auto", strength: float = 1.0):
    """A function float HW/HWC -> uint8 restoring as ``restorer restore`` does (see the module
    docstring), through one in-process :class:`RestoreActor`."""
    from restorer.pipeline import RestoreActor

    if isinstance(model, nn.Module):
        raise TypeError("through='actor' needs a model name or path (the actor loads it), "
                        "not a bare net")
    actor = RestoreActor(model=model.source if isinstance(model, LoadedModel) else model,
                         tile=tile, precision=precision, flat_fill=flat_fill, strength=strength)

    def run(degraded: np.ndarray) -> np.ndarray:
        saved = to_uint8(degraded)
        (out,), _ = actor.restore_arrays([saved[..., None] if saved.ndim == 2 else saved])
        return out[..., 0] if saved.ndim == 2 else out

    return run


def _check_evaluate_args(task: str, sigma: float, quality: int | None, scale: int | None,
                         baseline: str | None, sheet_rows: int, sheet: str | Path | None,
                         trim: tuple[int, int], frame: float | None, through: str,
                         measure: str) -> None:
    """Refuse :func:`evaluate`'s arguments that do not go together, naming the fix."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {list(TASKS)}")
    if task == "jpeg" and (quality is None or not 1 <= quality <= 100):
        raise ValueError(f"task 'jpeg' needs quality in [1, 100], got {quality}")
    if task == "sr" and not (isinstance(scale, int) and scale >= 2):
        raise ValueError(f"task 'sr' needs an integer scale >= 2, got {scale!r}")
    if task in ("denoise", "noise+jpeg", "blur+noise") and not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if task == "noise+jpeg" and (quality is None or not 1 <= quality <= 100):
        raise ValueError(f"task 'noise+jpeg' needs quality in [1, 100], got {quality}")
    if measure not in MEASURES:
        raise ValueError(f"Unknown measure {measure!r}; choose from {list(MEASURES)}")
    if baseline is not None and (baseline not in BASELINES or task != "denoise"):
        raise ValueError(f"Unknown baseline {baseline!r} for task {task!r}; "
                         f"denoising offers {list(BASELINES)}")
    if sheet is not None and sheet_rows < 1:
        raise ValueError(f"sheet_rows must be >= 1, got {sheet_rows}")
    if len(trim) != 2 or min(trim) < 0:
        raise ValueError(f"trim must be (rows, columns) >= 0, got {trim}")
    if frame is not None and (task == "sr" or not 0 <= frame <= 255):
        raise ValueError(f"frame must be a gray level in [0, 255] for denoising or JPEG, got "
                         f"{frame} for task {task!r}")
    if through not in THROUGH:
        raise ValueError(f"Unknown through {through!r}; choose from {list(THROUGH)}")


def _clean_image(path: Path, channels: int, task: str, trim: tuple[int, int],
                 scale: int | None) -> np.ndarray:
    """The uint8 ground truth :func:`evaluate` measures against: the test image less ``trim``
    rows and columns, cropped to a multiple of ``scale`` for super-resolution."""
    clean8 = _read_test_image(path, channels, task)
    height, width = clean8.shape[:2]
    if trim[0] >= height or trim[1] >= width:
        raise ValueError(f"trim {trim} leaves nothing of {path.name} ({height}x{width})")
    clean8 = clean8[: height - trim[0], : width - trim[1]]
    if task == "sr":
        height, width = clean8.shape[:2]
        clean8 = clean8[: height - height % scale, : width - width % scale]
    return clean8


def _degraded(clean8: np.ndarray, name: str, task: str, sigma: float, quality: int | None,
              scale: int | None, shot: float, read: float, blur: float) -> np.ndarray:
    """What :func:`evaluate` restores for ``task``: the float degraded image of the clean
    uint8 ``clean8`` (noise drawn from the image's name, :func:`image_seed`)."""
    clean = clean8.astype(np.float32) / 255.0
    if task == "denoise":
        return degrade.add_gaussian_noise(clean, sigma, np.random.default_rng(image_seed(name)))
    if task in PHOTO_TASKS:
        return photo_degradation(clean, task, np.random.default_rng(image_seed(name)),
                                 sigma=sigma, quality=quality, shot=shot, read=read, blur=blur)
    if task == "jpeg":
        return degrade.jpeg_compress(clean8, quality).astype(np.float32) / 255.0
    return degrade.bicubic_downscale(clean, scale)


def _image_row(name: str, clean8: np.ndarray, restored8: np.ndarray, degraded8: np.ndarray,
               baseline8: np.ndarray | None, task: str, scale: int | None, measure: str,
               edges: bool, framed: bool) -> dict[str, Any]:
    """One image's row of :func:`evaluate`: PSNR and SSIM of the output, the input's PSNR, the
    baseline's, and the band and interior PSNRs with ``edges`` or a frame."""
    target = _measured(clean8, task, scale, measure)
    measured = _measured(restored8, task, scale, measure)
    row = {"name": name, "psnr": metrics.psnr(measured, target),
           "ssim": metrics.ssim(measured, target),
           "input_psnr": metrics.psnr(_measured(degraded8, task, scale, measure), target)}
    if baseline8 is not None:
        row["baseline_psnr"] = metrics.psnr(baseline8, clean8)
    if edges or framed:
        band, inner = (FRAME_BAND, FRAME_BAND) if framed else (EDGE_BAND, EDGE_INNER)
        box = (0, 0) + target.shape[:2]
        row["band_psnr"], row["interior_psnr"] = band_psnrs(measured, target, box, band, inner)
        if baseline8 is not None:
            row["baseline_band_psnr"], row["baseline_interior_psnr"] = band_psnrs(
                baseline8, clean8, box, band, inner)
    return row


def _summary(rows: list[dict[str, Any]], task: str, sigma: float, quality: int | None,
             scale: int | None, shot: float, read: float, blur: float, measure: str,
             colour: bool) -> dict[str, Any]:
    """:func:`evaluate`'s result before its timing and rows: the task's settings, what was
    measured, and the means over ``rows`` (with the band gaps where rows have bands)."""
    result: dict[str, Any] = {"task": task}
    if task in ("denoise", "noise+jpeg", "blur+noise"):
        result["sigma"] = sigma
    if task in ("jpeg", "noise+jpeg"):
        result["quality"] = quality
    if task == "sr":
        result["scale"] = scale
    if task == "poisson":
        result.update(shot=shot, read=read)
    if task == "blur+noise":
        result["blur"] = blur
    luma = task in ("jpeg", "sr") if measure == "auto" else measure == "y"
    result["measured_on"] = "Y" if luma and colour else "RGB" if colour else "gray"
    result["count"] = len(rows)
    for key in ("psnr", "ssim", "input_psnr", "baseline_psnr", "band_psnr", "interior_psnr",
                "baseline_band_psnr", "baseline_interior_psnr"):
        if key in rows[0]:
            result[key] = float(np.mean([row[key] for row in rows]))
    if "band_psnr" in rows[0]:
        gaps = [row["interior_psnr"] - row["band_psnr"] for row in rows]
        result["band_gap_mean"], result["band_gap_max"] = float(np.mean(gaps)), float(max(gaps))
    if "baseline_band_psnr" in rows[0]:
        result["baseline_band_gap_mean"] = float(np.mean(
            [row["baseline_interior_psnr"] - row["baseline_band_psnr"] for row in rows]))
    return result


def evaluate(model: str | LoadedModel | nn.Module | None, data_dir: str | Path,
             task: str = "denoise", sigma: float = 25, quality: int | None = None,
             scale: int | None = None, baseline: str | None = None,
             sheet: str | Path | None = None, sheet_rows: int = 4,
             trim: tuple[int, int] = (0, 0), edges: bool = False, frame: float | None = None,
             through: str = "net", tile: int = 256, precision: str = "auto",
             flat_fill: str = "auto", shot: float = 0.004, read: float = (2 / 255) ** 2,
             blur: float = 1.2, measure: str = "auto", strength: float = 1.0
             ) -> dict[str, Any]:
    """Restore every image in ``data_dir`` after degrading it, and measure PSNR/SSIM.

    ``model``: a zoo name, a model path, a ``LoadedModel`` or a net (float32 NCHW ``[0, 1]`` in
    and out). ``task``: ``"denoise"`` (Gaussian noise of std ``sigma`` on the 0-255 scale),
    ``"jpeg"`` (Pillow JPEG at ``quality`` in [1, 100]) or ``"sr"`` (MATLAB bicubic downscale by
    ``scale``; a net with ``scale == 1`` gets the bicubic upscale back to full size, as DnCNN-3,
    and the image is first cropped to a multiple of ``scale``). ``baseline="nlm"`` adds
    scikit-image non-local means given the true sigma (denoising only; a few seconds per
    512x512 image), ``"bm3d"`` BM3D/CBM3D (denoising only; 4 s per 256x256 gray image on one
    CPU core, about 4x that per 512x512). ``sheet``: also write a PNG :func:`contact_sheet` of
    the first ``sheet_rows`` images there. ``trim``, ``edges``, ``frame`` (a gray level on the
    0-255 scale; denoising and JPEG only), ``through`` (``"net"`` or ``"actor"``, the latter with
    the actor's ``tile`` and ``precision``): see the module docstring. ``flat_fill`` (``auto``,
    ``on``, ``off``): fill clean flat regions with the image's noise before the net, as
    ``restorer restore`` does (:mod:`restorer.image.flat`; ``auto``: for models trained to denoise).
    Photo tasks (``PHOTO_TASKS``, see :func:`photo_degradation`): ``"noise+jpeg"`` (noise
    ``sigma`` then JPEG ``quality``), ``"poisson"`` (variance ``shot * x + read`` on
    ``[0, 1]``), ``"blur+noise"`` (Gaussian blur of std ``blur`` px then noise ``sigma``);
    their input is the 8-bit image a camera or browser saves. ``measure``: ``"auto"`` (the
    task's convention: Y for JPEG and SR on colour, all planes otherwise), ``"rgb"``, ``"y"``;
    the result says which (``"measured_on"``). ``strength``: a noise-map net's strength.

    Returns ``{"task", "sigma"|"quality"|"scale", "count", "psnr", "ssim", "input_psnr",
    ["baseline_psnr"], "seconds", "rows", "through", "trim", ["frame"]}`` where ``rows`` holds
    one dict per image with ``name``, ``psnr``, ``ssim``, ``input_psnr`` (and
    ``baseline_psnr``); means are in dB. With ``edges`` or ``frame``, rows and means also have
    ``band_psnr`` and ``interior_psnr`` (and ``baseline_band_psnr``, ``baseline_interior_psnr``),
    and the result has ``band_gap_mean`` and ``band_gap_max``: interior minus band PSNR, mean and
    largest over the images (and ``baseline_band_gap_mean``). With ``sheet``, ``"sheet"`` is its
    path.
    """
    _check_evaluate_args(task, sigma, quality, scale, baseline, sheet_rows, sheet, trim, frame,
                         through, measure)
    asked = _Asked(task, sigma, quality, scale, shot, read, blur, trim, frame, through, baseline,
                   measure, edges)
    net = _as_net(model, flat_fill)
    restore = _restorer(model, net, through, tile, precision, flat_fill, strength)
    started = time.perf_counter()
    rows, sheet_samples = [], []
    paths = list(image_files(data_dir))
    progress = Progress(f"eval {task}", len(paths))
    colour = False  # any colour image measured
    for path in paths:
        row, sample = _evaluate_image(path, net, restore, asked)
        colour = colour or sample.clean.ndim == 3
        log.debug("%s: %s", path.name, row)
        rows.append(row)
        progress.update(1, psnr=f"{np.mean([r['psnr'] for r in rows]):.2f}")
        if sheet is not None and len(sheet_samples) < sheet_rows:
            sheet_samples.append(sample)
    progress.close()
    result = _summary(rows, task, sigma, quality, scale, shot, read, blur, measure, colour)
    result["seconds"] = time.perf_counter() - started
    result["through"] = through
    result["trim"] = list(trim)
    if frame is not None:
        result["frame"] = frame
    result["rows"] = rows
    if sheet is not None:
        Image.fromarray(contact_sheet(sheet_samples)).save(sheet, format="PNG")
        result["sheet"] = str(sheet)
    return result


@dataclass(frozen=True)
class _Asked:
    """What :func:`evaluate` was asked to degrade and measure, for its per-image steps."""

    task: str
    sigma: float
    quality: int | None
    scale: int | None
    shot: float
    read: float
    blur: float
    trim: tuple[int, int]
    frame: float | None
    through: str
    baseline: str | None
    measure: str
    edges: bool


def _restorer(model: str | LoadedModel | nn.Module | None, net: nn.Module, through: str,
              tile: int, precision: str, flat_fill: str, strength: float):
    """A function float HW/HWC -> uint8 that restores as :func:`evaluate` was asked: through
    the actor (as ``restorer restore`` does) or the bare ``net`` on whole images."""
    if through == "actor":
        return _actor_runner(model, tile, precision, flat_fill, strength)
    if strength != 1.0:
        _set_strength(net, strength)

    def restore(degraded: np.ndarray) -> np.ndarray:
        return to_uint8(_run_planes(net, degraded))

    return restore


def _evaluate_image(path: Path, net: nn.Module, restore, asked: _Asked
                    ) -> tuple[dict[str, Any], SheetRow]:
    """One image of :func:`evaluate`: its clean image degraded as asked (in a frame, when
    asked), restored, and measured (inside the frame); its row and its contact-sheet row."""
    task, scale, frame = asked.task, asked.scale, asked.frame
    clean8 = _clean_image(path, getattr(net, "channels", 1), task, asked.trim, scale)
    degraded = _degraded(clean8, path.name, task, asked.sigma, asked.quality, scale, asked.shot,
                         asked.read, asked.blur)
    if task == "sr" and getattr(net, "scale", 1) == 1:
        degraded = degrade.bicubic_resize(degraded, float(scale))
    height, width = clean8.shape[:2]  # of the image inside the frame, with a frame
    if frame is not None:
        clean8 = _framed(clean8, round(frame))
        degraded = _framed(degraded, round(frame) / 255.0)
    # What the model and the baseline are given: the unclipped float, or the saved uint8.
    given = degraded if asked.through == "net" else to_uint8(degraded).astype(np.float32) / 255
    if task in PHOTO_TASKS:  # a photo is saved before anyone restores it
        degraded = given = to_uint8(degraded).astype(np.float32) / 255.0
    restored8 = restore(degraded)
    if restored8.shape != clean8.shape:
        raise ValueError(f"the net turned {path.name} of shape {clean8.shape} into "
                         f"{restored8.shape}; does its scale match the task?")
    if degraded.shape == clean8.shape:
        degraded8 = to_uint8(degraded)
    else:  # LR input of an SR net: measure the bicubic upscale
        degraded8 = to_uint8(degrade.bicubic_resize(degraded, float(scale)))
    baseline8 = (None if asked.baseline is None
                 else to_uint8(_baseline(asked.baseline, given, asked.sigma)))
    if frame is not None:  # measure the image inside the frame
        inside = (slice(FRAME, FRAME + height), slice(FRAME, FRAME + width))
        clean8, restored8, degraded8 = clean8[inside], restored8[inside], degraded8[inside]
        baseline8 = None if baseline8 is None else baseline8[inside]
    row = _image_row(path.name, clean8, restored8, degraded8, baseline8, task, scale,
                     asked.measure, asked.edges, frame is not None)
    return row, SheetRow(path.name, degraded8, restored8, clean8, row["input_psnr"], row["psnr"])


# --- real noisy / clean pairs ------------------------------------------------------------------

# (noisy suffix, clean suffix) of the file stems of a pairs folder, tried in this order.
PAIR_SUFFIXES = (("_real", "_mean"), ("_noisy", "_gt"), ("_noisy", "_clean"))


def pair_files(folder: str | Path) -> list[tuple[str, Path, Path]]:
    """``(name, noisy, clean)`` of every pair in ``folder``, sorted by name.

    A pair is two images whose stems end in ``_real`` / ``_mean`` (CC15, PolyU), ``_noisy`` /
    ``_gt`` or ``_noisy`` / ``_clean`` with the same beginning, or files of the same stem in
    the sub-folders ``noisy/`` and ``clean/``. A noisy file without its clean one is an error
    naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"pairs folder {str(folder)!r} does not exist or is not a folder")
    if (folder / "noisy").is_dir() and (folder / "clean").is_dir():
        clean = {p.stem: p for p in image_files(folder / "clean")}
        pairs = []
        for noisy in image_files(folder / "noisy"):
            if noisy.stem not in clean:
                raise ValueError(f"{noisy} has no clean image of the same name in "
                                 f"{folder / 'clean'}")
            pairs.append((noisy.stem, noisy, clean[noisy.stem]))
        return pairs
    files = {p.stem: p for p in image_files(folder)}
    for noisy_suffix, clean_suffix in PAIR_SUFFIXES:
        noisy = sorted(stem for stem in files if stem.endswith(noisy_suffix))
        if not noisy:
            continue
        pairs = []
        for stem in noisy:
            name = stem[: -len(noisy_suffix)]
            if name + clean_suffix not in files:
                raise ValueError(f"{files[stem]} has no clean image {name}{clean_suffix}.* "
                                 f"beside it")
            pairs.append((name, files[stem], files[name + clean_suffix]))
        return pairs
    raise ValueError(f"no noisy/clean pairs in {str(folder)!r}: name them NAME_real / "
                     f"NAME_mean, NAME_noisy / NAME_gt, or put them in noisy/ and clean/")


def estimated_sigma(noisy8: np.ndarray) -> float:
    """The noise std (0-255 scale) of a uint8 image by Donoho's estimator
    (:func:`restorer.image.audit.noise_sigma`), averaged over its planes: the sigma a classical
    denoiser is told when no true sigma exists."""
    from restorer.image.audit import noise_sigma

    planes = noisy8[None] if noisy8.ndim == 2 else np.moveaxis(noisy8, 2, 0)
    sigmas = noise_sigma(torch.from_numpy(planes.astype(np.float32) / 255.0))
    return float(sigmas.mean() * 255.0)


def evaluate_pairs(model: str | LoadedModel | nn.Module | None, folder: str | Path,
                   through: str = "actor", baseline: str | None = None, tile: int = 256,
                   precision: str = "auto", flat_fill: str = "auto", strength: float = 1.0
                   ) -> dict[str, Any]:
    """Restore the noisy image of every pair in ``folder`` (:func:`pair_files`) and measure
    PSNR and SSIM against its clean image, on RGB (or gray), as the files are stored.

    The noisy file is given as it is (8-bit, clipped: what a camera wrote). ``through="actor"``
    restores it as ``restorer restore`` does (:class:`restorer.pipeline.driver.RestoreActor`: tiles,
    precision, ``strength``; 8-bit out); ``"net"`` runs the bare net on the whole image.
    ``baseline="bm3d"`` adds CBM3D (BM3D for gray) told the sigma estimated from the noisy image
    (:func:`estimated_sigma`), ``"nlm"`` non-local means the same way. Returns ``{"task":
    "pairs", "count", "psnr", "ssim", "input_psnr", ["baseline_psnr"], "worse": names of images
    whose output scores below their input, "seconds", "through", "channels": "RGB", "rows"}``.
    """
    if through not in THROUGH:
        raise ValueError(f"Unknown through {through!r}; choose from {list(THROUGH)}")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"Unknown baseline {baseline!r}; choose from {list(BASELINES)}")
    pairs = pair_files(folder)
    if through == "actor":
        run = _actor_runner(model, tile, precision, flat_fill, strength)
    else:
        net = _as_net(model, flat_fill)
        if strength != 1.0:
            _set_strength(net, strength)

        def run(noisy: np.ndarray) -> np.ndarray:
            return to_uint8(_run_planes(net, noisy))
    started = time.perf_counter()
    rows = []
    progress = Progress("eval pairs", len(pairs))
    for name, noisy_path, clean_path in pairs:
        noisy8, clean8 = read_image(noisy_path, 3), read_image(clean_path, 3)
        if noisy8.shape != clean8.shape:
            raise ValueError(f"{noisy_path.name} is {noisy8.shape[:2]} but {clean_path.name} is "
                             f"{clean8.shape[:2]}; pairs must be the same size")
        if degrade.is_gray(noisy8) and degrade.is_gray(clean8):
            noisy8, clean8 = noisy8[..., 0], clean8[..., 0]
        restored8 = run(noisy8.astype(np.float32) / 255.0)
        row = {"name": name, "psnr": metrics.psnr(restored8, clean8),
               "ssim": metrics.ssim(restored8, clean8),
               "input_psnr": metrics.psnr(noisy8, clean8)}
        if baseline is not None:
            sigma = estimated_sigma(noisy8)
            given = noisy8.astype(np.float32) / 255.0
            denoised = _baseline(baseline, given, sigma)
            row["baseline_psnr"] = metrics.psnr(to_uint8(denoised), clean8)
            row["baseline_sigma"] = sigma
        rows.append(row)
        progress.update(1, psnr=f"{np.mean([r['psnr'] for r in rows]):.2f}")
    progress.close()
    result: dict[str, Any] = {"task": "pairs", "count": len(rows)}
    for key in ("psnr", "ssim", "input_psnr", "baseline_psnr"):
        if key in rows[0]:
            result[key] = float(np.mean([row[key] for row in rows]))
    result["worse"] = [row["name"] for row in rows if row["psnr"] < row["input_psnr"]]
    result["seconds"] = time.perf_counter() - started
    result.update(through=through, channels="RGB", strength=strength, rows=rows)
    return result


def strength_sheet(model: str | LoadedModel, noisy8: np.ndarray, clean8: np.ndarray | None,
                   strengths: Sequence[float], tile: int = 256) -> np.ndarray:
    """A :func:`contact_sheet` of one noisy uint8 image restored by a noise-aware model
    through the actor at each of ``strengths`` (a row each: noisy | restored | clean, or the
    noisy image again when there is no clean one), to show what ``--strength`` does."""
    rows = []
    reference = noisy8 if clean8 is None else clean8
    for strength in strengths:
        run = _actor_runner(model, tile, "auto", "auto", strength)
        restored8 = run(noisy8.astype(np.float32) / 255.0)
        rows.append(SheetRow(f"strength {strength:g}", noisy8, restored8, reference,
                             metrics.psnr(noisy8, reference), metrics.psnr(restored8, reference)))
    return contact_sheet(rows)


def _set_strength(net: nn.Module, strength: float) -> None:
    """Set a noise-map net's ``strength`` (inside a flat-fill wrapper too)."""
    inner = getattr(net, "net", net)
    if not hasattr(inner, "strength"):
        raise ValueError("strength other than 1 needs a noise-aware model (a noise-map net)")
    inner.strength = strength


# --- contact sheet ---------------------------------------------------------------------------

SHEET_PANEL = 256  # longest side of a whole-image panel (larger images are shrunk to it)
SHEET_CROP = 48  # side of the zoomed crop, in pixels of the (output-size) images
SHEET_ZOOM = 3  # the crop is enlarged this many times (nearest neighbour)
SHEET_GAP = 6
SHEET_BACKGROUND = (236, 236, 236)


@dataclass(frozen=True)
class SheetRow:
    """One image of a contact sheet: uint8 HW or HWC arrays of one size (the output's)."""

    name: str
    degraded: np.ndarray  # for super-resolution, the degraded input upscaled to the output size
    restored: np.ndarray
    clean: np.ndarray
    input_psnr: float  # dB
    psnr: float  # dB


def _rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = img[..., None]
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _crop_window(row: SheetRow, size: int) -> tuple[int, int]:
    """Top-left (y, x) of the ``size`` window where the restored image differs most from the
    degraded one (the net's work), on a grid of ``size // 4`` steps."""
    diff = np.abs(_rgb(row.restored).astype(np.float32) - _rgb(row.degraded)).mean(axis=2)
    integral = np.pad(diff.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    step = max(1, size // 4)
    ys = np.arange(0, diff.shape[0] - size + 1, step)
    xs = np.arange(0, diff.shape[1] - size + 1, step)
    sums = (integral[ys[:, None] + size, xs[None, :] + size]
            - integral[ys[:, None], xs[None, :] + size]
            - integral[ys[:, None] + size, xs[None, :]] + integral[ys[:, None], xs[None, :]])
    iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(ys[iy]), int(xs[ix])


def contact_sheet(rows: Sequence[SheetRow]) -> np.ndarray:
    """A uint8 HWx3 contact sheet: one band per row, labelled with its name and PSNRs.

    Each band shows degraded | restored | clean, shrunk together to at most ``SHEET_PANEL``
    pixels on their longest side (a red box marks the crop), then the same ``SHEET_CROP``
    window of each enlarged ``SHEET_ZOOM`` times (nearest neighbour), at the place where the
    net changed its input most. Labels use Pillow's default font.
    """
    from PIL import ImageDraw, ImageFont

    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    font = ImageFont.load_default()
    line = 14  # pixels per text line
    bands = []
    for row in rows:
        panels = [_rgb(row.degraded), _rgb(row.restored), _rgb(row.clean)]
        if len({p.shape for p in panels}) != 1:
            raise ValueError(f"{row.name}: degraded, restored and clean differ in size: "
                             f"{[p.shape for p in panels]}")
        height, width = panels[0].shape[:2]
        crop = min(SHEET_CROP, height, width)
        y, x = _crop_window(row, crop)
        shrink = min(1.0, SHEET_PANEL / max(height, width))
        size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
        wholes = [Image.fromarray(p).resize(size, Image.LANCZOS) if shrink < 1
                  else Image.fromarray(p) for p in panels]
        zooms = [Image.fromarray(p[y:y + crop, x:x + crop]).resize(
            (crop * SHEET_ZOOM, crop * SHEET_ZOOM), Image.NEAREST) for p in panels]
        images = wholes + zooms
        labels = [f"degraded {row.input_psnr:.2f} dB", f"restored {row.psnr:.2f} dB", "clean",
                  f"degraded x{SHEET_ZOOM}", f"restored x{SHEET_ZOOM}", f"clean x{SHEET_ZOOM}"]
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        columns = [max(i.width, math.ceil(measure.textlength(label, font=font)))
                   for i, label in zip(images, labels)]
        band_width = sum(columns) + SHEET_GAP * (len(images) + 1)
        band_height = 2 * line + max(i.height for i in images) + 2 * SHEET_GAP
        band = Image.new("RGB", (band_width, band_height), SHEET_BACKGROUND)
        draw = ImageDraw.Draw(band)
        draw.text((SHEET_GAP, SHEET_GAP), f"{row.name}: {row.input_psnr:.2f} dB -> "
                  f"{row.psnr:.2f} dB ({row.psnr - row.input_psnr:+.2f})", fill=(0, 0, 0),
                  font=font)
        left, top = SHEET_GAP, SHEET_GAP + 2 * line
        for index, (image, label, column) in enumerate(zip(images, labels, columns)):
            band.paste(image, (left, top))
            draw.text((left, SHEET_GAP + line), label, fill=(60, 60, 60), font=font)
            if index < 3:  # where the crop comes from
                draw.rectangle([left + round(x * shrink), top + round(y * shrink),
                                left + round((x + crop) * shrink) - 1,
                                top + round((y + crop) * shrink) - 1], outline=(220, 30, 30))
            left += column + SHEET_GAP
        bands.append(band)
    sheet = Image.new("RGB", (max(b.width for b in bands), sum(b.height for b in bands)),
                      SHEET_BACKGROUND)
    top = 0
    for band in bands:
        sheet.paste(band, (0, top))
        top += band.height
    return np.asarray(sheet)


__all__ = ["IMAGE_SUFFIXES", "MEASURES", "PAIR_SUFFIXES", "PHOTO_TASKS", "TASKS", "SheetRow",
           "band_psnrs", "contact_sheet", "estimated_sigma", "evaluate", "evaluate_pairs",
           "image_files", "image_seed", "pair_files", "photo_degradation", "read_image",
           "run_net", "strength_sheet", "to_uint8"]
