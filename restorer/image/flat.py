"""Blind denoisers next to clean flat regions: show them the image's own noise there.

A blind denoiser judges the noise level from what it sees. Beside a clean flat region - a
letterbox or scanner frame, a clipped highlight or shadow, a clean overlay - it sees no noise
and leaves the photo next to it nearly as noisy as it came (measured on Set12 cropped to
255x253 / 511x509 inside a 48 px clean frame, sigma 25, ``denoise-gray``: the 24 px next to
the frame at 20.3 dB, the noisy input's level, against 27.5 dB inside; the whole image loses
~2 dB to a frameless one, the frame dragging the net's estimate down further in).

So before such a net runs, :func:`fill_flat` finds the clean flat regions - pixels covered by
a ``FLAT_WINDOW`` x ``FLAT_WINDOW`` window whose values are all equal, in every channel - and
adds Gaussian noise of the level measured outside them (per channel, Donoho's estimator on the
diagonal Haar coefficients of the rest of the image; one noise plane for a gray image given as
equal planes), from a fixed seed so that a rerun writes the same pixels. The noise is not
clipped: clipped to ``[0, 1]`` a black frame's noise turns half-rectified and the nets read it
as structure (measured: band gap 2.8 dB instead of -0.9 for ``denoise-gray`` on Set12). The
net then sees one noisy image and denoises it evenly up to the frame; afterwards the flat
regions less a ``FLAT_WINDOW // 2`` px rim along their borders inside the image are put back
exactly as they were (the rim takes the net's output, so that steps at the borders of flat
regions are treated as the net treats any edge). An image without noise (a clean photo, a
screenshot) gets a fill of about zero, and an image without flat regions is not touched at
all.

The window is 9 px, one more than a JPEG block: the flat 8x8 blocks of a compressed image are
not taken for clean regions (measured: ``restore-default`` on classic5 at quality 10, 5 px
windows pasted whole cost 0.15 dB, 9 px windows with the rim 0.002 dB).

Measured with ``restorer eval --trim 1x3 --frame 0|128 --sigma 25`` (see the model cards):
``denoise-gray`` on Set12 in a black frame, band / interior 20.3 / 27.5 dB without the fill,
30.7 / 29.8 dB with it. Only models trained to denoise use it (:func:`wanted`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from restorer.image.audit import MAD_GAUSSIAN, haar_diagonal

FLAT_WINDOW = 9  # px: a clean flat region holds windows of this side with one value
SEED = 0  # of the fill's noise: the same image gets the same fill, run after run
MODES = ("auto", "on", "off")
DENOISING_TASKS = ("denoise", "mixture")  # training tasks (recipes, Ray Train) that add noise


def wanted(mode: str, provenance: dict[str, Any] | None, scale: int = 1) -> bool:
    """Whether a model fills flat regions: ``on``/``off`` as given; ``auto`` for models whose
    provenance says they were trained to remove noise (task ``denoise``, or a ``mixture`` that
    includes noise) and that do not change the image's size."""
    if mode not in MODES:
        raise ValueError(f"flat_fill {mode!r}: use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "on"
    config = (provenance or {}).get("config") or {}
    task = config.get("task")
    if scale != 1 or task not in DENOISING_TASKS:
        return False
    return task == "denoise" or float((config.get("mixture") or {}).get("noise", 0)) > 0


def flat_regions(image: torch.Tensor, window: int = FLAT_WINDOW
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(covered, kept) boolean masks (1HW) of a CHW image: pixels that some flat ``window`` x
    ``window`` window inside the image covers (a window is flat where every channel holds one
    value in it), and those of them whose whole window-sized neighbourhood in the image is
    covered (the regions less a rim of ``window // 2`` px along their borders inside the
    image; a frame keeps its outer side)."""
    x = image[None].float()
    pad = window // 2
    high = F.max_pool2d(x, window, 1, pad)
    low = -F.max_pool2d(-x, window, 1, pad)
    centres = (high - low).amax(1, keepdim=True) <= 1e-6
    # Only whole windows: near the sides max_pool2d sees part of one (it pads with -inf), and
    # an 8x8 JPEG block in a corner would pass for a 9x9 flat window.
    centres[..., :pad, :] = centres[..., -pad:, :] = False
    centres[..., :, :pad] = centres[..., :, -pad:] = False
    covered = F.max_pool2d(centres.float(), window, 1, pad) > 0
    # Erosion that ignores what lies outside the image (max_pool2d's -inf padding).
    kept = F.max_pool2d((~covered).float(), window, 1, pad) == 0
    return covered[0], kept[0]


def noise_level(image: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Per-channel noise std (C11) of a CHW image outside the ``exclude`` mask (1HW): the
    estimator of :func:`restorer.image.audit.noise_sigma` (median absolute diagonal Haar coefficient
    over 0.6745) on the 2x2 blocks that ``exclude`` does not touch; 0 where fewer than 16 such
    blocks remain."""
    height, width = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    diagonal = haar_diagonal(image)
    touched = F.max_pool2d(exclude[None, :, :height, :width].float(), 2)[0, 0] > 0
    keep = ~touched
    if int(keep.sum()) < 16:
        return image.new_zeros(image.shape[0], 1, 1)
    values = diagonal[:, keep].abs()
    return (values.median(1).values / MAD_GAUSSIAN)[:, None, None]


def fill_flat(image: torch.Tensor, window: int = FLAT_WINDOW
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(filled image, mask of the pixels to put back) for a CHW float image, or None when it
    has no clean flat region. See the module docstring."""
    if min(image.shape[-2:]) < window:
        return None
    covered, kept = flat_regions(image, window)
    if not bool(covered.any()):
        return None
    sigma = noise_level(image, covered)
    generator = torch.Generator(device=image.device).manual_seed(SEED)
    noise = torch.randn(image.shape, generator=generator, device=image.device)
    if all(torch.equal(image[0], plane) for plane in image[1:]):
        noise = noise[:1].expand_as(image)  # a gray image as equal planes: gray noise
    filled = torch.where(covered, image + sigma * noise, image)
    return filled, kept


def put_back(output: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``output`` (CHW, the image's size) with the ``keep`` pixels of ``image`` restored."""
    return torch.where(keep, image.to(output.dtype), output)


class FlatFilled(nn.Module):
    """A net run on whole images with their flat regions filled (for ``restorer eval``'s
    bare-net path; the restore actor fills whole images before it tiles them)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        for name in ("channels", "scale", "alignment", "receptive_field", "runs_per_pixel"):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        outputs = []
        for image in batch:
            filled = fill_flat(image)
            if filled is None:
                outputs.append(self.net(image[None])[0])
            else:
                outputs.append(put_back(self.net(filled[0][None])[0], image, filled[1]))
        return torch.stack(outputs)


__all__ = [
    "FLAT_WINDOW",
    "MODES",
    "FlatFilled",
    "fill_flat",
    "flat_regions",
    "noise_level",
    "put_back",
    "wanted",
]
