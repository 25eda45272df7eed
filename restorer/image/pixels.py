"""Image conventions, defined once for every module (numpy only).

- At the I/O boundary (:mod:`restorer.io.codec`, storage, the Ray Data rows) an image is a
  ``uint8`` or ``uint16`` HWC array with 1 (gray) or 3 (RGB) planes; alpha travels beside it.
- Inside the maths (nets, degradations, metrics) it is float32 in ``[0, 1]``:
  :func:`to_float` divides by the dtype's :func:`peak` (255 or 65535).
- Back to 8 bits there are two conversions, for two jobs, named for what they do:

  - :func:`float_to_uint8`: a float ``[0, 1]`` image -> uint8 by clamp, x255, round: the
    reference convention of the restoration papers, used wherever PSNR/SSIM are measured
    (``restorer.quality.evaluate.to_uint8`` is this function);
  - :func:`to_8bit`: a uint8/uint16 image -> uint8 (16-bit divided by 257 and rounded), for
    8-bit-only formats (JPEG, WebP, the report's PNG crops) (``restorer.io.codec.to_uint8`` is
    this function).

- The gray/colour rule (:func:`is_gray`): an image is gray when it has one plane, or planes
  that are all equal (a gray file saved as RGB); gray images stay gray through every stage.
  Where a gray net is trained or measured on a colour file, the file becomes its luma
  (:func:`to_planes`: ITU-R 601, Pillow's ``"L"``, the reference convention of the gray
  denoising papers); a gray image shown to a colour net is three equal planes.
"""

from __future__ import annotations

import numpy as np

PEAKS = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def peak(dtype: np.dtype | type) -> float:
    """The largest value of the unsigned image dtype ``dtype``: 255.0 (uint8), 65535.0
    (uint16); a ``ValueError`` for any other dtype."""
    try:
        return PEAKS[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"image dtype {np.dtype(dtype)} is neither uint8 nor uint16") from None


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8/uint16 ``pixels`` (any shape) as float32 in ``[0, 1]``."""
    return pixels.astype(np.float32) / np.float32(peak(pixels.dtype))


def float_to_uint8(image: np.ndarray) -> np.ndarray:
    """Float ``[0, 1]`` (any range accepted) -> uint8: clamp to ``[0, 1]``, x255, round."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``pixels`` unchanged; uint16 divided by 257 and rounded to uint8 (65535 -> 255)."""
    if pixels.dtype == np.uint8:
        return pixels
    return np.round(pixels.astype(np.float32) / 257.0).astype(np.uint8)


def is_gray(image: np.ndarray) -> bool:
    """Whether ``image`` (HW or HWC) is gray: one plane, or planes that are all equal (a gray
    file read as RGB)."""
    return image.ndim == 2 or image.shape[2] == 1 or bool((image == image[..., :1]).all())


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights of R, G, B (Pillow's "L")


def to_planes(image: np.ndarray, channels: int) -> np.ndarray:
    """A float HWC (or HW) image with ``channels`` planes: HW for 1 (a colour image's
    :data:`LUMA`), HWx3 for 3 (a gray image as three equal planes)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    planes = image if image.ndim == 3 else image[..., None]
    if channels == 1:
        if planes.shape[-1] == 1 or is_gray(planes):
            return planes[..., 0]
        return (planes[..., :3] @ np.asarray(LUMA, dtype=np.float32)).astype(planes.dtype)
    return np.repeat(planes, 3, -1) if planes.shape[-1] == 1 else planes


__all__ = ["LUMA", "PEAKS", "float_to_uint8", "is_gray", "peak", "to_8bit", "to_float",
           "to_planes"]
