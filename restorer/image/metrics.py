"""Image quality metrics with the conventions of the restoration literature.

Inputs are 8-bit images at the I/O boundary: numpy arrays ``HW`` (gray) or ``HWC`` (colour,
channels last) holding values on the ``[0, 255]`` scale, normally ``uint8`` after the restored
output was clamped to ``[0, 1]``, scaled by 255 and rounded (see ``shared/data/README.md``).
Floats on that scale are accepted too; nothing is rescaled or rounded here.

- PSNR is computed in float64 over the whole array (all channels), in dB.
- SSIM follows Wang et al. 2004 as scikit-image implements it: 11x11 Gaussian window of std 1.5,
  population covariances, K1 = 0.01, K2 = 0.03; colour images are averaged over channels.
- Super-resolution is measured on the luma ``rgb_to_y`` (BT.601, MATLAB ``rgb2ycbcr``) with the
  border cropped by the scale (``crop_border``).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"images must be HW or HWC, got shape {a.shape}")


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio of ``a`` against ``b`` in dB: ``10 log10(range^2 / MSE)``.

    ``a``, ``b``: same-shape HW or HWC arrays on the ``[0, data_range]`` scale (uint8 with the
    default 255). Computed in float64. Identical images give ``inf``.
    """
    _check_pair(a, b)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Structural similarity of ``a`` and ``b`` in ``[-1, 1]`` (1 for identical images).

    ``a``, ``b``: same-shape HW (gray) or HWC (colour, the mean over channels is returned)
    arrays on the ``[0, data_range]`` scale; both sides must be at least 11 pixels. Gaussian
    window sigma 1.5 (11x11), population covariance, computed in float64.
    """
    _check_pair(a, b)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got shape {a.shape}")
    return float(structural_similarity(
        a.astype(np.float64), b.astype(np.float64), data_range=data_range,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        channel_axis=2 if a.ndim == 3 else None,
    ))


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Luma Y of an RGB image as MATLAB ``rgb2ycbcr`` (ITU-R BT.601, studio range [16, 235]).

    ``img``: HWC with 3 channels, uint8 or float on the ``[0, 255]`` scale. Returns float64 HW
    on the ``[0, 255]`` scale, not rounded (the SR reference code measures PSNR on this).
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb_to_y takes HWx3 RGB images, got shape {img.shape}")
    rgb = img.astype(np.float64)
    return (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0 + 16.0


def crop_border(img: np.ndarray, n: int) -> np.ndarray:
    """``img`` (HW or HWC) without ``n`` pixels on each side; ``n = 0`` returns it unchanged."""
    if n < 0:
        raise ValueError(f"border must be >= 0, got {n}")
    if 2 * n >= min(img.shape[:2]):
        raise ValueError(f"cannot crop {n} pixels from each side of an image of shape {img.shape}")
    return img[n:img.shape[0] - n, n:img.shape[1] - n] if n else img


__all__ = ["crop_border", "psnr", "rgb_to_y", "ssim"]
