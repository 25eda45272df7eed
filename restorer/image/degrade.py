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
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from restorer.image.pixels import (  # is_gray: the gray/colour rule, importable here too
    LUMA,
    is_gray,
)

DEGRADATIONS = ("noise", "jpeg", "blur", "downscale")
BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


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
        raise ValueError(
            f"jpeg_compress takes HW, HWx1 or HWx3 images, got shape {img_uint8.shape}")
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


# --- Degradations as real photos have them ------------------------------------------------------
# A camera records linear light on a Bayer mosaic with signal-dependent noise (shot noise, whose
# variance grows with the signal, plus read noise), then demosaics (which correlates the noise of
# neighbouring pixels), white-balances and colour-corrects (which correlates it across channels),
# applies a tone curve (which reshapes it by brightness), clips and rounds to 8 bits and
# JPEG-compresses; the web adds resizing and a second compression. The functions below are those
# steps; :func:`practical_degradation` draws and chains them (after the practical degradation
# models of BSRGAN, Real-ESRGAN and SCUNet, and the "unprocessing" of Brooks et al. 2019).

# The 2x2 Bayer tile of each pattern: index of the colour (0 R, 1 G, 2 B) at (row % 2, col % 2).
_BAYER = {"RGGB": ((0, 1), (1, 2)), "BGGR": ((2, 1), (1, 0)),
          "GRBG": ((1, 0), (2, 1)), "GBRG": ((1, 2), (0, 1))}
_BILINEAR_RB = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4.0
_BILINEAR_G = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4.0


def add_poisson_gaussian_noise(img: np.ndarray, shot: float, read: float,
                               rng: np.random.Generator, shared: bool = False) -> np.ndarray:
    """``img`` plus signal-dependent noise of variance ``shot * x + read`` at intensity ``x``.

    The heteroscedastic Gaussian approximation of Poisson shot noise plus Gaussian read noise
    (Foi et al. 2008), on the ``[0, 1]`` scale: ``shot`` in about ``[1e-4, 0.02]`` (variance per
    unit of signal), ``read`` in about ``[0, 1e-3]`` (variance). ``img``: float HW or HWC in
    ``[0, 1]`` (values outside count as clipped for the variance). ``shared``: one noise draw
    for every channel (a gray image stored as equal planes). Returns float32, not clipped.
    """
    _check_image(img)
    if not (shot >= 0 and read >= 0):
        raise ValueError(f"shot and read variances must be >= 0, got {shot}, {read}")
    img = img.astype(np.float32)
    std = np.sqrt(shot * np.clip(img, 0.0, 1.0) + read)
    shape = img.shape[:2] + (1,) if shared and img.ndim == 3 else img.shape
    return img + std * rng.standard_normal(shape, dtype=np.float32)


def add_correlated_gaussian_noise(img: np.ndarray, sigma_255: float, rng: np.random.Generator,
                                  correlation: float) -> np.ndarray:
    """``img`` (float HWC, 3 channels) plus Gaussian noise of std ``sigma_255 / 255`` per channel
    whose channels are correlated by ``correlation`` in ``[0, 1)`` (0 = independent, near 1 =
    nearly the same noise in every channel, as luminance noise). Not clipped."""
    _check_image(img)
    if img.ndim != 3 or not 0.0 <= correlation < 1.0:
        raise ValueError(f"needs HWC and 0 <= correlation < 1, got {img.shape}, {correlation}")
    channels = img.shape[2]
    covariance = np.full((channels, channels), correlation) + (1 - correlation) * np.eye(channels)
    factor = np.linalg.cholesky(covariance).astype(np.float32)
    white = rng.standard_normal(img.shape, dtype=np.float32)
    return img.astype(np.float32) + (white @ factor.T) * np.float32(sigma_255 / 255.0)


def mosaic(img: np.ndarray, pattern: str = "RGGB") -> np.ndarray:
    """The Bayer mosaic of an RGB image: float HWC -> HW, each pixel keeping the one colour its
    site of ``pattern`` (``BAYER_PATTERNS``) records."""
    if pattern not in _BAYER or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"mosaic takes HWx3 and a pattern of {BAYER_PATTERNS}, got "
                         f"{img.shape}, {pattern!r}")
    rows = np.arange(img.shape[0])[:, None] % 2
    cols = np.arange(img.shape[1])[None, :] % 2
    colour = np.array(_BAYER[pattern])[rows, cols]
    return np.take_along_axis(img, colour[..., None], axis=2)[..., 0]


def demosaic_bilinear(raw: np.ndarray, pattern: str = "RGGB") -> np.ndarray:
    """Bilinear demosaicing of a Bayer mosaic (HW float) -> HWx3 float32.

    Each colour is interpolated from its own sites by normalised convolution (3x3 kernels; the
    recorded sites keep their values exactly). Like a camera's demosaicing it spreads each
    site's noise over its neighbours: demosaiced noise is spatially correlated.
    """
    if pattern not in _BAYER or raw.ndim != 2:
        raise ValueError(f"demosaic takes HW and a pattern of {BAYER_PATTERNS}, got "
                         f"{raw.shape}, {pattern!r}")
    rows = np.arange(raw.shape[0])[:, None] % 2
    cols = np.arange(raw.shape[1])[None, :] % 2
    colour = np.array(_BAYER[pattern])[rows, cols]
    out = np.empty(raw.shape + (3,), np.float32)
    for channel in range(3):
        mask = (colour == channel).astype(np.float32)
        kernel = _BILINEAR_G if channel == 1 else _BILINEAR_RB
        total = ndimage.convolve(raw.astype(np.float32) * mask, kernel, mode="mirror")
        weight = ndimage.convolve(mask, kernel, mode="mirror")
        out[..., channel] = total / weight
    return out


def tone_curve(linear: np.ndarray, gamma: float, contrast: float) -> np.ndarray:
    """A camera-like tone curve on ``[0, 1]``: ``x ** (1 / gamma)`` (``gamma`` in about
    ``[1.8, 2.6]``) blended with the smoothstep S-curve by ``contrast`` in ``[0, 1]``. Values
    are clipped to ``[0, 1]`` first (the sensor saturates). Monotone; float32 out."""
    x = np.clip(linear, 0.0, 1.0).astype(np.float32) ** np.float32(1.0 / gamma)
    return ((1 - contrast) * x + contrast * (3 * x * x - 2 * x * x * x)).astype(np.float32)


def inverse_tone_curve(img: np.ndarray, gamma: float, contrast: float) -> np.ndarray:
    """The inverse of :func:`tone_curve` (an 8-bit-accurate table inversion), ``[0, 1]`` in and
    out."""
    grid = np.linspace(0.0, 1.0, 4097, dtype=np.float32)
    return np.interp(np.clip(img, 0, 1), tone_curve(grid, gamma, contrast), grid
                     ).astype(np.float32)


def random_colour_matrix(rng: np.random.Generator, strength: tuple[float, float] = (0.1, 0.45)
                         ) -> np.ndarray:
    """A 3x3 camera colour-correction matrix (camera RGB -> sRGB, linear): rows sum to 1,
    diagonal ``1 + 2k`` and off-diagonal entries near ``-k`` with ``k`` drawn per row from
    ``strength``. It saturates colours and so mixes (anti-correlates) the channels' noise."""
    matrix = np.zeros((3, 3), np.float32)
    for row in range(3):
        k = rng.uniform(*strength)
        share = rng.dirichlet((4.0, 4.0))
        others = [c for c in range(3) if c != row]
        matrix[row, row] = 1 + 2 * k
        matrix[row, others] = -2 * k * share
    return matrix


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """A normalised 2-D Gaussian kernel with stds ``sigma_x``, ``sigma_y`` (pixels, > 0) along
    axes rotated by ``theta`` radians; its side is ``2 * ceil(3 * max(sigma)) + 1``."""
    if not (sigma_x > 0 and sigma_y > 0):
        raise ValueError(f"blur stds must be > 0, got {sigma_x}, {sigma_y}")
    radius = int(math.ceil(3 * max(sigma_x, sigma_y)))
    axis = np.arange(-radius, radius + 1, dtype=np.float64)
    cols, rows = np.meshgrid(axis, axis)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * cols + s * rows, -s * cols + c * rows
    kernel = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (kernel / kernel.sum()).astype(np.float32)


def anisotropic_blur(img: np.ndarray, sigma_x: float, sigma_y: float, theta: float
                     ) -> np.ndarray:
    """Blur the spatial axes of ``img`` (float HW or HWC) with :func:`gaussian_kernel`, the
    border mirrored; channels independently. float32 out."""
    _check_image(img)
    kernel = gaussian_kernel(sigma_x, sigma_y, theta)
    if img.ndim == 2:
        return ndimage.convolve(img.astype(np.float32), kernel, mode="reflect")
    return np.stack([ndimage.convolve(img[..., c].astype(np.float32), kernel, mode="reflect")
                     for c in range(img.shape[2])], axis=2)


RESAMPLERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "area": Image.Resampling.BOX}


def resize_down_up(img: np.ndarray, factor: float, down: str, up: str) -> np.ndarray:
    """Shrink ``img`` (float HW or HWC) by ``factor`` in ``(0, 1]`` with resampler ``down`` and
    bring it back to its size with ``up`` (names of ``RESAMPLERS``): the softening of a photo
    that was resized for the web and enlarged again. float32 out, not clipped."""
    _check_image(img)
    if not 0 < factor <= 1 or down not in RESAMPLERS or up not in RESAMPLERS:
        raise ValueError(f"factor in (0, 1] and resamplers of {sorted(RESAMPLERS)}, got "
                         f"{factor}, {down!r}, {up!r}")
    height, width = img.shape[:2]
    small = (max(1, round(width * factor)), max(1, round(height * factor)))
    planes = img[..., None] if img.ndim == 2 else img
    out = []
    for c in range(planes.shape[2]):
        plane = Image.fromarray(planes[..., c].astype(np.float32), mode="F")
        plane = plane.resize(small, RESAMPLERS[down]).resize((width, height), RESAMPLERS[up])
        out.append(np.asarray(plane, np.float32))
    return out[0] if img.ndim == 2 else np.stack(out, axis=2)


def to_8bit(img: np.ndarray) -> np.ndarray:
    """Clip to ``[0, 1]`` and round to the 256 levels of an 8-bit file (float32 out)."""
    return (np.round(np.clip(img, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def jpeg_float(img: np.ndarray, quality: int) -> np.ndarray:
    """:func:`jpeg_compress` of a float ``[0, 1]`` image (clipped, rounded to 8 bits first); a
    colour image whose planes are equal is compressed as gray, as a gray file would be."""
    as_uint8 = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    if as_uint8.ndim == 3 and as_uint8.shape[2] == 3 and is_gray(as_uint8):
        out = jpeg_compress(as_uint8[..., 0], quality)
        return np.repeat(out[..., None], 3, axis=2).astype(np.float32) / 255.0
    return jpeg_compress(as_uint8, quality).astype(np.float32) / 255.0


def camera_noise(img: np.ndarray, rng: np.random.Generator, shot: float, read: float,
                 pattern: str, gains: tuple[float, float], colour_matrix: np.ndarray,
                 gamma: float, contrast: float, luma_sigma: float = 0.0,
                 chroma_sigma: float = 0.0, chroma_keep: float = 1.0) -> np.ndarray:
    """An sRGB-like image (float HWx3 ``[0, 1]``) with the noise a camera at high ISO leaves:
    undo the tone curve, the colour matrix and the white balance (``gains``: red, blue), sample
    the Bayer mosaic, add shot/read noise (:func:`add_poisson_gaussian_noise` on the raw
    signal), then demosaic, white-balance, colour-correct and tone-map again; the noise is what
    that development gives with the noise less what it gives without, added to ``img``. The
    signal itself is not developed: a camera demosaics it far better than bilinear
    interpolation, whose loss (7-8 levels RMS on McMaster's detail, up to 30 at edges) a net
    would otherwise learn to undo, and then "sharpen" every photo it is given. float32, clipped
    to ``[0, 1]``, not rounded.

    ``luma_sigma`` / ``chroma_sigma`` > 0: the camera's own processing shapes the noise
    (:func:`isp_shape_noise`: the noise's luma spread over ``luma_sigma`` px at its variance,
    its chroma smoothed over ``chroma_sigma`` px and kept at ``chroma_keep`` of its std).
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"camera_noise takes HWx3 images, got {img.shape}")
    img = img.astype(np.float32)
    gain = np.array([gains[0], 1.0, gains[1]], np.float32)
    linear = inverse_tone_curve(img, gamma, contrast)
    camera = linear @ np.linalg.inv(colour_matrix).T.astype(np.float32) / gain
    raw = np.clip(mosaic(camera, pattern), 0.0, 1.0)

    def develop(mosaicked: np.ndarray) -> np.ndarray:
        rgb = demosaic_bilinear(mosaicked, pattern) * gain
        return tone_curve(rgb @ colour_matrix.T, gamma, contrast)

    developed = develop(add_poisson_gaussian_noise(raw, shot, read, rng)) - develop(raw)
    if luma_sigma > 0 or chroma_sigma > 0 or chroma_keep != 1.0:
        developed = isp_shape_noise(developed, luma_sigma, chroma_sigma, chroma_keep)
    return np.clip(img + developed, 0.0, 1.0).astype(np.float32)


def isp_shape_noise(noise: np.ndarray, luma_sigma: float, chroma_sigma: float,
                    chroma_keep: float) -> np.ndarray:
    """Noise (float HWx3) as a camera's processing leaves it: split into luma
    (:data:`restorer.image.pixels.LUMA` weights) and the three planes' differences from it (chroma);
    the luma smoothed by a Gaussian of ``luma_sigma`` px and scaled back to its std (noise
    reduction and sharpening spread it over neighbours without removing it), the chroma
    smoothed by ``chroma_sigma`` px and scaled to ``chroma_keep`` times its std (chroma noise
    reduction removes most of it).

    Measured on ``cc15`` (15 real camera photos, residual = shot - mean of ~500 shots): the
    residual's channels correlate by +0.2..+0.7, luma carries 46-79% of its variance, and its
    autocorrelation is 0.6-0.76 at 1 px, 0.23-0.47 at 2, 0.15-0.3 at 3 px. Bilinear demosaicing
    with a colour matrix alone gives -0.1..-0.5, 13-20% and 0.55 / 0.16 / 0.03: the noise it
    makes is chroma, fine-grained. ``luma_sigma`` in 0.3-0.9 and ``chroma_keep`` in 0.15-0.5
    bring both into the measured ranges. A ``sigma`` of 0 leaves that part's shape as it is.
    """
    luma = noise @ np.asarray(LUMA, np.float32)
    chroma = noise - luma[..., None]

    def smooth(plane: np.ndarray, sigma: float) -> np.ndarray:
        return ndimage.gaussian_filter(plane, sigma, mode="mirror") if sigma > 0 else plane

    def rescaled(shaped: np.ndarray, original: np.ndarray, keep: float) -> np.ndarray:
        scale = keep * float(original.std()) / max(float(shaped.std()), 1e-12)
        return shaped * np.float32(scale)

    shaped_luma = rescaled(smooth(luma, luma_sigma), luma, 1.0)
    shaped_chroma = np.stack([smooth(chroma[..., c], chroma_sigma) for c in range(3)], axis=-1)
    shaped_chroma = rescaled(shaped_chroma, chroma, chroma_keep)
    return (shaped_luma[..., None] + shaped_chroma).astype(np.float32)


def local_rms(residual: np.ndarray, window: int = 7) -> np.ndarray:
    """Root mean square of ``residual`` (HW or HWC float) in a ``window`` x ``window`` box
    around each pixel, per channel (mirrored border): a noise level map. float32 out."""
    size = (window, window) + (1,) * (residual.ndim - 2)
    mean_square = ndimage.uniform_filter(residual.astype(np.float32) ** 2, size, mode="reflect")
    return np.sqrt(np.maximum(mean_square, 0.0))


def noise_level_map(residual: np.ndarray, window: int = 7) -> np.ndarray:
    """The noise level map a noise-aware net is trained on: per pixel and plane, the std of
    *white* noise that has the residual's power at twice the pixel scale, i.e. twice the local
    RMS (:func:`local_rms`, ``window`` blocks) of its 2x2 block means (HW or HWC float, odd
    sides mirrored; float32 out, the residual's shape).

    For white noise it is its std, as :func:`local_rms` gives. Noise spread over neighbours
    (a camera's, JPEG'd noise) keeps more power in block means, and reads higher: cc15's
    residuals (autocorrelation ~0.7 at 1 px) read 1.6-1.85x their std. The std alone told the
    net less than it needed: a stage trained on std maps restored cc15 better when given a
    constant map twice their std (35.59 dB at 12/255 against 35.38 with its own estimate,
    whose mean level was 4.6-7.3/255).
    """
    height, width = residual.shape[:2]
    pad = ((0, height % 2), (0, width % 2)) + ((0, 0),) * (residual.ndim - 2)
    even = np.pad(residual.astype(np.float32, copy=False), pad, mode="reflect")
    blocks = even.reshape(even.shape[0] // 2, 2, even.shape[1] // 2, 2, *even.shape[2:])
    level = 2.0 * local_rms(blocks.mean(axis=(1, 3)), window)
    return np.repeat(np.repeat(level, 2, axis=0), 2, axis=1)[:height, :width]


@dataclass(frozen=True)
class PracticalConfig:
    """Parameter ranges of :func:`practical_degradation` (all drawn per image).

    Probabilities are per image; ranges are inclusive. Noise levels: ``camera_shot`` is the
    raw shot-noise variance per unit signal, drawn log-uniformly, with the read-noise variance
    tied to it as in Brooks et al. (log read = 2.18 log shot + 1.2 + N(0, 0.26)); ``srgb_shot``
    / ``srgb_read`` the same for noise added directly to the 8-bit-like image; ``gaussian``
    the white-noise std on the 0-255 scale.
    """

    blur: float = 0.35  # probability of a first-round blur
    blur_sigma: tuple[float, float] = (0.3, 2.0)  # std in pixels, each axis
    anisotropic: float = 0.5  # share of blurs with two stds and a rotation
    resize: float = 0.3  # probability of a down-then-up resize
    resize_factor: tuple[float, float] = (0.5, 0.95)
    noise: float = 0.9  # probability of a first-round noise
    camera: float = 0.55  # share of noises made by the camera pipeline (the rest in sRGB)
    camera_shot: tuple[float, float] = (1e-4, 1.2e-2)
    # share of camera noises shaped by the camera's own processing (isp_shape_noise): luma
    # spread over luma_sigma px, chroma smoothed over chroma_sigma px and kept at chroma_keep
    isp: float = 0.8
    isp_luma_sigma: tuple[float, float] = (0.3, 0.9)
    isp_chroma_sigma: tuple[float, float] = (1.0, 3.0)
    isp_chroma_keep: tuple[float, float] = (0.15, 0.5)
    srgb_shot: tuple[float, float] = (1e-4, 1e-2)
    srgb_read: tuple[float, float] = (0.0, 4e-4)
    gaussian: tuple[float, float] = (1.0, 30.0)
    shuffle: float = 0.3  # probability that blur, resize and noise run in a random order
    jpeg: float = 0.7  # probability of a first JPEG
    jpeg_quality: tuple[int, int] = (30, 95)
    second_round: float = 0.25  # probability of a second round (web: resize, noise, JPEG)
    second_noise: tuple[float, float] = (1.0, 8.0)  # its Gaussian noise std, 0-255 scale


def _draw_noise(rng: np.random.Generator, config: PracticalConfig, gray: bool,
                sigma_range: tuple[float, float]) -> dict:
    seed = int(rng.integers(2 ** 31))
    if not gray and rng.random() < config.camera:
        shot = float(np.exp(rng.uniform(*np.log(config.camera_shot))))
        read = float(np.exp(2.18 * np.log(shot) + 1.2 + rng.normal(0, 0.26)))
        step = {"op": "camera", "seed": seed, "shot": shot, "read": read,
                "pattern": BAYER_PATTERNS[int(rng.integers(4))],
                "gains": (float(rng.uniform(1.6, 2.4)), float(rng.uniform(1.4, 2.2))),
                "colour_matrix": random_colour_matrix(rng),
                "gamma": float(rng.uniform(1.8, 2.6)), "contrast": float(rng.uniform(0, 1))}
        if rng.random() < config.isp:
            step.update(luma_sigma=float(rng.uniform(*config.isp_luma_sigma)),
                        chroma_sigma=float(rng.uniform(*config.isp_chroma_sigma)),
                        chroma_keep=float(rng.uniform(*config.isp_chroma_keep)))
        return step
    if rng.random() < 0.5:
        shot = float(np.exp(rng.uniform(*np.log(config.srgb_shot))))
        return {"op": "poisson_gaussian", "seed": seed, "shot": shot,
                "read": float(rng.uniform(*config.srgb_read)),
                "shared": bool(gray or rng.random() < 0.2)}
    return {"op": "gaussian", "seed": seed, "sigma": float(rng.uniform(*sigma_range)),
            "correlation": 0.0 if gray else float(rng.choice([0.0, rng.uniform(0, 0.9)])),
            "shared": gray}


def _draw_blur(rng: np.random.Generator, config: PracticalConfig) -> dict:
    sigma_x = float(rng.uniform(*config.blur_sigma))
    anisotropic = rng.random() < config.anisotropic
    return {"op": "blur", "sigma_x": sigma_x,
            "sigma_y": float(rng.uniform(*config.blur_sigma)) if anisotropic else sigma_x,
            "theta": float(rng.uniform(0, math.pi)) if anisotropic else 0.0}


def _draw_resize(rng: np.random.Generator, factor: tuple[float, float]) -> dict:
    names = sorted(RESAMPLERS)
    return {"op": "resize", "factor": float(rng.uniform(*factor)),
            "down": names[int(rng.integers(3))], "up": names[int(rng.integers(3))]}


def draw_practical_plan(rng: np.random.Generator, gray: bool,
                        config: PracticalConfig = PracticalConfig()) -> list[dict]:
    """The steps of one :func:`practical_degradation`, parameters drawn: a list of
    ``{"op": NAME, ...}`` (ops: blur, resize, camera, poisson_gaussian, gaussian, jpeg). The
    noises carry their own seed, so a plan applies the same way twice."""
    first = []
    if rng.random() < config.blur:
        first.append(_draw_blur(rng, config))
    if rng.random() < config.resize:
        first.append(_draw_resize(rng, config.resize_factor))
    if rng.random() < config.noise:
        first.append(_draw_noise(rng, config, gray, config.gaussian))
    if rng.random() < config.shuffle:
        first = [first[i] for i in rng.permutation(len(first))]
    plan = first
    if rng.random() < config.jpeg:
        plan.append({"op": "jpeg", "quality": int(rng.integers(config.jpeg_quality[0],
                                                                config.jpeg_quality[1] + 1))})
    if rng.random() < config.second_round:
        if rng.random() < 0.5:
            plan.append(_draw_resize(rng, (0.6, 0.95)))
        if rng.random() < 0.3:
            noise = _draw_noise(rng, config, gray, config.second_noise)
            if noise["op"] == "camera":  # a second camera makes no sense: white noise instead
                noise = {"op": "gaussian", "seed": noise["seed"], "shared": gray,
                         "sigma": float(rng.uniform(*config.second_noise)), "correlation": 0.0}
            plan.append(noise)
        plan.append({"op": "jpeg", "quality": int(rng.integers(config.jpeg_quality[0],
                                                                config.jpeg_quality[1] + 1))})
    return plan


def apply_practical_plan(img: np.ndarray, plan: Sequence[dict], noise: bool = True
                         ) -> np.ndarray:
    """Run ``plan`` (:func:`draw_practical_plan`) on ``img`` (float HWx3 ``[0, 1]``);
    ``noise=False`` skips the noise draws (the camera's too: it adds noise and leaves the
    photo's signal as it was; the reference that makes the noise map). Returns the 8-bit
    result as float32 ``[0, 1]`` (clipped and rounded at the end, and before each JPEG)."""
    out = img.astype(np.float32)
    for step in plan:
        op = step["op"]
        if op == "blur":
            out = anisotropic_blur(out, step["sigma_x"], step["sigma_y"], step["theta"])
        elif op == "resize":
            out = resize_down_up(out, step["factor"], step["down"], step["up"])
        elif op == "jpeg":
            out = jpeg_float(out, step["quality"])
        elif noise and op == "camera":
            out = camera_noise(out, np.random.default_rng(step["seed"]), step["shot"],
                               step["read"], step["pattern"], step["gains"],
                               step["colour_matrix"], step["gamma"], step["contrast"],
                               step.get("luma_sigma", 0.0), step.get("chroma_sigma", 0.0),
                               step.get("chroma_keep", 1.0))
        elif noise and op == "poisson_gaussian":
            out = add_poisson_gaussian_noise(out, step["shot"], step["read"],
                                             np.random.default_rng(step["seed"]), step["shared"])
        elif noise and op == "gaussian":
            noise_rng = np.random.default_rng(step["seed"])
            if step["shared"] or step["correlation"] == 0.0:
                out = (add_poisson_gaussian_noise(out, 0.0, (step["sigma"] / 255) ** 2,
                                                  noise_rng, step["shared"]))
            else:
                out = add_correlated_gaussian_noise(out, step["sigma"], noise_rng,
                                                    step["correlation"])
    return to_8bit(out)


def practical_degradation(img: np.ndarray, rng: np.random.Generator,
                          config: PracticalConfig = PracticalConfig(), window: int = 7
                          ) -> tuple[np.ndarray, np.ndarray]:
    """A degraded photo as cameras and the web make them, and its noise level map.

    ``img``: clean float HWx3 in ``[0, 1]`` (a gray image as three equal planes gets gray
    noise: one draw shared by the planes, no camera pipeline). One plan is drawn
    (:func:`draw_practical_plan`) and run twice, with and without its noise; the noise map is
    the white-equivalent level (:func:`noise_level_map`, ``window`` blocks) of their difference:
    how much noise each pixel carries after everything that followed it (demosaicing, the
    camera's processing, tone curve, JPEG), and how far it spreads. Returns
    ``(degraded, noise_map)``, float32 HWx3, the degraded image on the 8-bit grid.
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"practical_degradation takes HWx3 images, got {img.shape}")
    plan = draw_practical_plan(rng, bool(is_gray(img)), config)
    degraded = apply_practical_plan(img, plan, noise=True)
    reference = apply_practical_plan(img, plan, noise=False)
    return degraded, noise_level_map(degraded - reference, window)


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
    "BAYER_PATTERNS",
    "DEGRADATIONS",
    "PracticalConfig",
    "RESAMPLERS",
    "add_correlated_gaussian_noise",
    "add_poisson_gaussian_noise",
    "anisotropic_blur",
    "apply_practical_plan",
    "camera_noise",
    "demosaic_bilinear",
    "draw_practical_plan",
    "gaussian_kernel",
    "inverse_tone_curve",
    "isp_shape_noise",
    "jpeg_float",
    "local_rms",
    "mosaic",
    "noise_level_map",
    "practical_degradation",
    "random_colour_matrix",
    "resize_down_up",
    "to_8bit",
    "tone_curve",
    "add_gaussian_noise",
    "bicubic_downscale",
    "bicubic_resize",
    "gaussian_blur",
    "is_gray",
    "jpeg_compress",
    "random_degradation",
    "sample_patches",
]
