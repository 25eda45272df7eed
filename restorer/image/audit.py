"""What a restoration took away: a residual-structure score of the method noise.

The residual ``input - output`` ("method noise", Buades, Coll and Morel 2005) is what the model
removed. For a denoiser that works, on a noisy image, it is the noise: white and unrelated to
the image. Where the model also removed detail (blurred texture, text, fine lines), the residual
carries the image's structure: its neighbouring pixels agree, and its energy sits where the
output still has edges. :func:`residual_structure` scores that, per image, in ``[0, 1]``::

    score = (min(whiteness_defect, 1) + max(energy_colocation, 0)) / 2

- ``whiteness_defect`` (:func:`whiteness_defect`): the root sum of squares of the residual's
  normalised autocorrelation at the 12 lags of a 5x5 half-neighbourhood (a 2-D Ljung-Box
  statistic). White noise gives ~0 (each term ~N(0, 1/pixels)); a smooth residual gives ~1 or
  more; a residual that is a fine periodic pattern (a texture blurred away) gives large
  negative and positive terms, so the sum of squares catches it where a lag-1 correlation
  alone does not.
- ``energy_colocation`` (:func:`energy_colocation`): the Pearson correlation, over windows,
  of the local (9x9 mean, every 3 px) squared gradient of the residual and of the output.
  Noise removed from an image is spread evenly, whatever the image holds (~0, slightly
  negative for a denoiser, which leaves a little more noise at edges); detail removed sits on
  the output's edges (strongly positive). Averaging energies over a window lets it see
  structure under strong noise, where the residual as a whole still looks white (blur of a
  noisy image).

Each part alone separates the cases less well; together they do. Measured by
``python tests/benchmarks/bench_audit_candidates.py --data ../shared/data`` on 207 cases
(128x128 central crops of Set12 and classic5, gray, and Set5, colour): 67 noise-like (noisy
sigma 15/25/50 restored by ``denoise-gray`` or ``restore-default``, noisy text denoised) and
140 detail-destroying (Gaussian blur sigma 2 of clean and sigma-25 images, blur 1.5 of the
denoised sigma-25 image, 5x5 median of clean and sigma-15 images, JPEG q5, text and
period-3/4 textures blurred away); ROC AUC by the rank formula:

=============================================  =====  ==========================
score                                          AUC    median noise-like / detail
=============================================  =====  ==========================
lag-1 autocorrelation (plain whiteness)        0.986  -0.07 / 0.30 (detail min -0.19)
whiteness defect, 12 lags                      0.948  0.12 / 0.69
gradient-magnitude local correlation, 7x7      0.896  0.03 / 0.20
residual energy explained by the output's      0.856  0.08 / 0.18
Laplacians (3 scales, least-squares R^2)
energy co-location, 9x9 windows, stride 1      0.995  -0.24 / 0.41 (detail min -0.16)
energy co-location, 9x9 windows, stride 3      0.993  -0.24 / 0.41 (detail min -0.20)
**this score** (12 lags + 9x9/3 co-location)   0.998  0.058 / 0.54 (noise-like max 0.12)
=============================================  =====  ==========================

Co-location misses a periodic texture blurred away (its residual's energy is spread evenly,
like noise's); the whiteness defect misses structure under strong noise; the sum catches both.
Stride 3 costs a ninth of stride 1 for the same separation: the score takes ~2 ms per
256x256 crop on one CPU thread.

The hard cases are blurred noisy crops with little structure to lose (a smooth sky): the
score rightly calls what was removed there noise. The score is scale-free: a model that
changed an image by a fraction of a level can still score high, so read it with the change
(``change_mean``) and flag outliers against the job's own typical score.

Input and output are float NCHW tensors of one shape (values in any one scale, e.g. ``[0, 1]``);
the channels are averaged first. Everything stays on the tensors' device, batched, with no
host synchronisation. Images under ``MIN_SIDE`` pixels on a side score 0.

The module also holds the restore job's one noise estimator (:func:`noise_sigma`, the ledger's
``noise_in``/``noise_out``; :func:`input_noise` gives the same figure for a decoded image, as the
report shows it) and the actor's 99th percentile (:func:`p99`).

torch is imported inside the functions, not at module import: restorer.pipeline.driver imports this
module, and its read/decode and encode/write Ray tasks must not pay for loading torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from restorer.image.pixels import to_float

if TYPE_CHECKING:
    import torch

WINDOW = 9  # side of the local mean of gradient energies in energy_colocation ...
STRIDE = 3  # ... taken every STRIDE pixels (windows overlap; 1/9 of the work of stride 1)
MAX_LAG = 2  # whiteness_defect uses lags with |dy|, |dx| <= MAX_LAG (12 lags for 2)
MIN_SIDE = 8  # images smaller than this on a side score 0: too few pixels for the statistics
EPS = 1e-30  # guards divisions by a zero energy (an unchanged or a flat image)
AUDIT_SIDE = 128  # px: the actor measures noise and residual structure on the central crop
# of this side (the score was calibrated on 128 px crops), the change on a strided view of it


MAD_GAUSSIAN = 0.6745  # median absolute value of a unit Gaussian: MAD / this = its std


def haar_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The finest-scale diagonal Haar coefficients of ``x`` (``...HW``; an odd last row or
    column is left out), float32: ``(a - b - c + d) / 2`` of each 2x2 block. For white noise
    of std s they are white with std s, and a smooth image adds little to them: the basis of
    :func:`noise_sigma` and of the flat fill's ``restorer.image.flat.noise_level``."""
    height, width = (x.shape[-2] // 2) * 2, (x.shape[-1] // 2) * 2
    x = x[..., :height, :width].float()
    return (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2]
            + x[..., 1::2, 1::2]) / 2


def noise_sigma(plane: torch.Tensor) -> torch.Tensor:
    """Std of white Gaussian noise in ``plane`` (``...HW``: one value per plane), by Donoho's
    robust estimator: the median absolute :func:`haar_diagonal` coefficient over
    :data:`MAD_GAUSSIAN` (``skimage``'s ``estimate_sigma`` does the same with a db2 wavelet, on
    the CPU). Image edges inflate it a little; a plane under 8 pixels on a side gives 0."""
    if min(plane.shape[-2] // 2 * 2, plane.shape[-1] // 2 * 2) < 8:
        return plane.new_zeros(plane.shape[:-2])
    return haar_diagonal(plane).abs().flatten(-2).median(-1).values / MAD_GAUSSIAN


def audit_crop(height: int, width: int) -> tuple[int, int]:
    """(top, left) of the central <= ``AUDIT_SIDE`` px crop of a ``height`` x ``width`` image:
    where the actor measures noise and residual structure, and :func:`input_noise` too."""
    return max(0, (height - AUDIT_SIDE) // 2), max(0, (width - AUDIT_SIDE) // 2)


def input_noise(pixels: np.ndarray) -> float:
    """The restore actor's ``noise_in`` for an HWC uint8/uint16 image: :func:`noise_sigma` of
    the central <= ``AUDIT_SIDE`` px crop of its first plane, in 8-bit levels (0 for an image
    under 8 pixels on a side)."""
    import torch

    top, left = audit_crop(*pixels.shape[:2])
    crop = to_float(pixels[top:top + AUDIT_SIDE, left:left + AUDIT_SIDE, 0])
    return float(noise_sigma(torch.from_numpy(crop)) * 255.0)


def p99(values: torch.Tensor) -> torch.Tensor:
    """The 99th percentile of a 1-D tensor, nearest rank: one selection (``kthvalue``), not
    ``torch.quantile``'s full sort (a third of the actor's time per image with a small net)."""
    return values.kthvalue(max(1, math.ceil(0.99 * values.numel()))).values


def residual_structure(source: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Per-image score in ``[0, 1]``: ~0.05 when ``source - output`` is noise-like, ~0.5 and up
    when it carries the image's structure (see the module docstring).

    ``source`` and ``output`` are (N, C, H, W) float tensors of one shape; returns (N,) float32
    on their device. 0 for images under ``MIN_SIDE`` pixels on a side and for an unchanged
    image (zero residual).
    """
    import torch

    if source.shape != output.shape or source.dim() != 4:
        raise ValueError(f"need two (N, C, H, W) tensors of one shape, got {tuple(source.shape)} "
                         f"and {tuple(output.shape)}")
    if min(source.shape[-2:]) < MIN_SIDE:
        return source.new_zeros(source.shape[0], dtype=torch.float32)
    out = output.float().mean(1, keepdim=True)
    residual = source.float().mean(1, keepdim=True) - out
    whiteness = whiteness_defect(residual).clamp(max=1.0)
    colocation = energy_colocation(residual, out).clamp(min=0.0)
    return (whiteness + colocation) / 2


def whiteness_defect(residual: torch.Tensor, max_lag: int = MAX_LAG) -> torch.Tensor:
    """sqrt(sum of squared normalised autocorrelations) of (N, 1, H, W) ``residual`` over the
    lags (dy, dx) of the half-neighbourhood ``0 < |(dy, dx)| <= max_lag`` (each lag once);
    (N,), >= 0, ~0 for white noise. A zero residual gives 0."""
    centred = residual - residual.mean((2, 3), keepdim=True)
    energy = centred.pow(2).mean((1, 2, 3)).clamp_min(EPS)
    height, width = centred.shape[-2:]
    total = centred.new_zeros(centred.shape[0])
    lags = [(0, dx) for dx in range(1, max_lag + 1)] + [
        (dy, dx) for dy in range(1, max_lag + 1) for dx in range(-max_lag, max_lag + 1)]
    for dy, dx in lags:
        a = centred[..., dy:, max(dx, 0):width + min(dx, 0)]
        b = centred[..., :height - dy, max(-dx, 0):width - max(dx, 0)]
        total = total + ((a * b).mean((1, 2, 3)) / energy).pow(2)
    return total.sqrt()


def energy_colocation(residual: torch.Tensor, output: torch.Tensor, window: int = WINDOW,
                      stride: int = STRIDE) -> torch.Tensor:
    """Pearson correlation, over windows, of the ``window`` x ``window`` local means (every
    ``stride`` pixels) of the squared gradients of (N, 1, H, W) ``residual`` and ``output``;
    (N,) in ``[-1, 1]``, 0 where either is constant."""
    import torch
    import torch.nn.functional as F

    both = torch.cat([residual, output], 1)
    gx = F.pad(both[..., :, 1:] - both[..., :, :-1], (0, 1, 0, 0))
    gy = F.pad(both[..., 1:, :] - both[..., :-1, :], (0, 0, 0, 1))
    energy = F.avg_pool2d(gx * gx + gy * gy, window, stride, window // 2,
                          count_include_pad=False).flatten(2)
    energy = energy - energy.mean(2, keepdim=True)
    a, b = energy[:, 0], energy[:, 1]
    norm = (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()
    return torch.where(norm > 0, (a * b).sum(1) / norm.clamp_min(EPS), torch.zeros_like(norm))
