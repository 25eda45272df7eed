"""Synthetic degradations that make (degraded, clean) training and test pairs.

Every function takes and returns numpy arrays laid out ``HW`` (gray) or ``HWC`` (colour, channels
last), float32 in ``[0, 1]`` unless its docstring says otherwise (``jpeg_compress`` works on
``uint8``). Functions that draw random numbers take an explicit ``numpy.random.Generator``, so a
pair is reproducible from its seed; none of them touches numpy's global random state.

Conventions follow the reference code of DnCNN/FFDNet (see ``shared/data/README.md``): Gaussian
noise is added on the ``[0, 1]`` scale with sigma given on the 0-255 scale and is *not* clipped;
JPEG goes through Pillow (4:2:0 chroma subsampling for colour, as its default); downscaling is
MATLAB's ``imresize`` (antialiased bicubic).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from restorer.pixels import is_gray  # the gray/colour rule, kept importable from here

DEGRADATIONS = ("noise", "jpeg", "blur", "downscale")


def _check_image(img: np.ndarray, name: str = "img") -> None:
    if img.ndim not in (2, 3):
        raise ValueError(f"{name} must be HW or HWC, got shape {img.shape}")


def add_gaussian_noise(img: np.ndarray, sigma_255: float, rng: np.random.Generator) -> np.ndarray:
    """``img`` plus white Gaussian noise of std ``sigma_255 / 255``, not clipped.

    ``img``: float HW or HWC in ``[0, 1]``; returns float32 of the same shape, which may leave
    ``[0, 1]`` (the reference convention: the net sees the unclipped noisy image).
    """
    _check_image(img)
    if not sigma_255 >= 0:
        raise ValueError(f"sigma_255 must be >= 0, got {sigma_255}")
    noise = rng.normal(0.0, sigma_255 / 255.0, size=img.shape)
    return (img.astype(np.float32) + noise.astype(np.float32)).astype(np.float32)


def jpeg_compress(img_uint8: np.ndarray, quality: int, subsampling: str = "4:2:0") -> np.ndarray:
    """Encode ``img_uint8`` as JPEG at ``quality`` with Pillow and decode it again.

    ``img_uint8``: uint8 HW (gray) or HWC with 3 channels (RGB) in ``[0, 255]``; ``quality`` in
    ``[1, 100]`` (Pillow's/MATLAB's scale); ``subsampling`` of the chroma planes for RGB input
    (``"4:2:0"`` as Pillow's default, ``"4:4:4"``, ``"4:2:2"``). Returns uint8 of the same shape.
    """
    if img_uint8.dtype != np.uint8:
        raise ValueError(f"jpeg_compress takes uint8 images, got dtype {img_uint8.dtype}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    if subsampling not in ("4:4:4", "4:2:2", "4:2:0"):
        raise ValueError(f"subsampling must be 4:4:4, 4:2:2 or 4:2:0, got {subsampling!r}")
    squeeze = img_uint8.ndim == 3 and img_uint8.shape[2] == 1
    arr = img_uint8[..., 0] if squeeze else img_uint8
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"jpeg_compress takes HW, HWx1 or HWx3 images, got shape {img_uint8.shape}")
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=int(quality), subsampling=subsampling)
    out = np.asarray(Image.open(io.BytesIO(buffer.getvalue()), formats=("JPEG",)))
    return out[..., None] if squeeze else out


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Blur the spatial axes of ``img`` with an isotropic Gaussian of std ``sigma`` pixels.

    ``img``: float HW or HWC; the kernel is truncated at 4 sigma and the border mirrored
    (``reflect``). Channels are blurred independently. Returns float32 of the same shape.
    """
    _check_image(img)
    if not sigma >= 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    spatial = (sigma, sigma) + (0,) * (img.ndim - 2)
    return ndimage.gaussian_filter(img.astype(np.float32), sigma=spatial, mode="reflect",
                                   truncate=4.0)


def _cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB's bicubic kernel (Keys, a = -0.5)."""
    ax = np.abs(x)
    ax2, ax3 = ax ** 2, ax ** 3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _resize_weights(in_length: int, out_length: int, scale: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Weights and source indices of MATLAB ``imresize`` along one axis (``contributions``)."""
    kernel_width = 4.0
    antialias = scale < 1
    if antialias:  # stretch the kernel to low-pass before decimating
        kernel_width /= scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # 1-based position in the input
    left = np.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    distance = u[:, None] - indices
    weights = scale * _cubic(scale * distance) if antialias else _cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    keep = np.any(weights != 0, axis=0)  # drop all-zero tap columns, as MATLAB does
    weights, indices = weights[:, keep], indices[:, keep]
    # Mirror out-of-range indices (MATLAB pads symmetrically), then go 0-based.
    mirrored = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = mirrored[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    return weights, indices


def _resize_axis(img: np.ndarray, axis: int, out_length: int, scale: float) -> np.ndarray:
    weights, indices = _resize_weights(img.shape[axis], out_length, scale)
    moved = np.moveaxis(img, axis, 0)  # (L, ...)
    gathered = moved[indices]  # (out, taps, ...)
    extra = (1,) * (moved.ndim - 1)
    out = (gathered * weights.reshape(weights.shape + extra)).sum(axis=1)
    return np.moveaxis(out, 0, axis)


def bicubic_resize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` on a float image, antialiased when shrinking.

    ``img``: float HW or HWC; ``scale`` > 0 (0.5 halves each side). The output is
    ``ceil(H * scale) x ceil(W * scale)`` (channels kept), float32, computed in float64 and *not*
    clipped or rounded (MATLAB rounds only for uint8 input; do that at the I/O boundary).
    """
    _check_image(img)
    if not scale > 0:
        raise ValueError(f"resize scale must be > 0, got {scale}")
    out = img.astype(np.float64)
    for axis in (0, 1):  # equal scales on both axes: MATLAB resizes rows first, then columns
        out = _resize_axis(out, axis, math.ceil(img.shape[axis] * scale), scale)
    return out.astype(np.float32)


def bicubic_downscale(img: np.ndarray, scale: int) -> np.ndarray:
    """Shrink ``img`` by an integer factor ``scale`` (2, 3, 4) as MATLAB ``imresize(img, 1/scale)``.

    ``img``: float HW or HWC in ``[0, 1]``; the output is ``ceil(H / scale) x ceil(W / scale)``,
    float32, unclipped. The SR convention crops H and W to multiples of ``scale`` first
    (``modcrop``); this function does not.
    """
    if not (isinstance(scale, (int, np.integer)) and scale >= 1):
        raise ValueError(f"downscale factor must be an integer >= 1, got {scale!r}")
    return bicubic_resize(img, 1.0 / scale)


def random_degradation(img: np.ndarray, rng: np.random.Generator,
                       kinds: Sequence[str] = DEGRADATIONS,
                       sigma_range: tuple[float, float] = (0.0, 55.0),
                       quality_range: tuple[int, int] = (10, 90),
                       blur_range: tuple[float, float] = (0.2, 2.0),
                       scales: Sequence[int] = (2, 3, 4)) -> np.ndarray:
    """One degradation drawn uniformly from ``kinds``, for blind (DnCNN-3 style) training.

    ``img``: float HW or HWC in ``[0, 1]``. Kinds and their parameter draws:

    - ``"noise"``: Gaussian noise, sigma uniform in ``sigma_range`` (0-255 scale), unclipped;
    - ``"jpeg"``: JPEG at a quality drawn uniformly from ``quality_range`` (inclusive);
    - ``"blur"``: Gaussian blur with std uniform in ``blur_range`` pixels;
    - ``"downscale"``: bicubic down by a factor from ``scales`` and back up to the original size.

    Returns float32 of the same shape as ``img``.
    """
    _check_image(img)
    unknown = sorted(set(kinds) - set(DEGRADATIONS))
    if unknown or not kinds:
        raise ValueError(f"Unknown degradation kinds {unknown or list(kinds)}; "
                         f"choose from {list(DEGRADATIONS)}")
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "noise":
        return add_gaussian_noise(img, float(rng.uniform(*sigma_range)), rng)
    if kind == "jpeg":
        quality = int(rng.integers(quality_range[0], quality_range[1] + 1))
        as_uint8 = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
        return jpeg_compress(as_uint8, quality).astype(np.float32) / 255.0
    if kind == "blur":
        return gaussian_blur(img, float(rng.uniform(*blur_range)))
    scale = int(scales[int(rng.integers(len(scales)))])
    small = bicubic_downscale(img, scale)
    up = bicubic_resize(small, float(scale))
    return up[: img.shape[0], : img.shape[1]]


# The 8 symmetries of the square: (number of 90-degree rotations, flip left-right).
_DIHEDRAL = [(k, flip) for k in range(4) for flip in (False, True)]


def sample_patches(images: Sequence[np.ndarray], patch_size: int, count: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``count`` random square crops from ``images``, each flipped/rotated at random.

    ``images``: arrays HW or HWC (all the same layout and dtype), each at least ``patch_size`` on
    both sides; images are picked uniformly, then a position, then one of the 8 flips/rotations
    by multiples of 90 degrees (the DnCNN augmentation). Returns
    ``(count, patch_size, patch_size[, C])`` with the dtype of the images.
    """
    if not images:
        raise ValueError("sample_patches needs at least one image")
    if patch_size < 1 or count < 0:
        raise ValueError(f"patch_size must be >= 1 and count >= 0, got {patch_size}, {count}")
    small = [i for i, im in enumerate(images) if min(im.shape[:2]) < patch_size]
    if small:
        raise ValueError(f"images {small[:5]} are smaller than patch_size {patch_size}")
    patches = []
    for _ in range(count):
        img = images[int(rng.integers(len(images)))]
        top = int(rng.integers(img.shape[0] - patch_size + 1))
        left = int(rng.integers(img.shape[1] - patch_size + 1))
        patch = img[top:top + patch_size, left:left + patch_size]
        turns, flip = _DIHEDRAL[int(rng.integers(len(_DIHEDRAL)))]
        patch = np.rot90(patch, turns, axes=(0, 1))
        if flip:
            patch = patch[:, ::-1]
        patches.append(patch)
    if not patches:
        return np.empty((0, patch_size, patch_size) + images[0].shape[2:], images[0].dtype)
    return np.ascontiguousarray(np.stack(patches))


__all__ = [
    "DEGRADATIONS",
    "add_gaussian_noise",
    "bicubic_downscale",
    "bicubic_resize",
    "gaussian_blur",
    "is_gray",
    "jpeg_compress",
    "random_degradation",
    "sample_patches",
]
