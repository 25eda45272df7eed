"""Training pairs made on the training device, so that a GPU never waits on Python.

The CPU functions of :mod:`restorer.degrade` define the degradations; this module makes batches
of them in bulk with torch. Clean images are loaded once into an :class:`ImageBank` (uint8, on
the device, padded to one shape); each batch is one gather of random crops, with one of the 8
flips/rotations per crop built into the gather's indices. Degradations that are cheap in torch
(Gaussian noise) are drawn per batch; the others are computed once per image on the CPU with
:mod:`restorer.degrade` and banked beside the clean images: JPEG at every quality of a range
(Pillow, exactly as evaluation does it) and MATLAB bicubic downscales for super-resolution
(low-resolution crops aligned with their high-resolution crops). Random numbers come from a
``torch.Generator`` seeded by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from restorer import degrade


def _padded(images: Sequence[np.ndarray], dtype: np.dtype, height: int, width: int,
            channels: int) -> np.ndarray:
    out = np.zeros((len(images), height, width, channels), dtype)
    for index, image in enumerate(images):
        image = image if image.ndim == 3 else image[..., None]
        out[index, : image.shape[0], : image.shape[1]] = image
    return out


class ImageBank:
    """Images of one channel count on one device, padded to one shape, for random crops.

    ``images``: HW or HWC arrays (uint8 or float32, all of one dtype). ``variants``: optional
    extra versions of every image, aligned pixel for pixel (a list per variant, e.g. the JPEG
    of each image at one quality). ``scale``: the images are ``scale`` times larger than
    ``low`` (low-resolution versions for super-resolution).
    """

    def __init__(self, images: Sequence[np.ndarray], device: torch.device | str,
                 variants: Sequence[Sequence[np.ndarray]] = (),
                 low: Sequence[np.ndarray] | None = None, scale: int = 1):
        if not images:
            raise ValueError("ImageBank needs at least one image")
        self.device = torch.device(device)
        self.scale = scale
        shapes = np.array([image.shape[:2] for image in images])
        self.channels = images[0].shape[2] if images[0].ndim == 3 else 1
        height, width = shapes.max(0)
        self.sizes = torch.as_tensor(shapes, device=self.device)
        self.clean = torch.from_numpy(_padded(images, images[0].dtype, height, width,
                                              self.channels)).to(self.device)
        self.variants = [torch.from_numpy(_padded(v, v[0].dtype, height, width, self.channels)
                                          ).to(self.device) for v in variants]
        self.low = None
        if low is not None:
            self.low = torch.from_numpy(_padded(low, low[0].dtype, height // scale,
                                                width // scale, self.channels)).to(self.device)

    def __len__(self) -> int:
        return len(self.sizes)

    def _grids(self, size: int, count: int, flips: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Row and column offsets (count, size, size) inside a crop, per flip/rotation code."""
        axis = torch.arange(size, device=self.device)
        rows, cols = torch.meshgrid(axis, axis, indexing="ij")
        rows, cols = rows.expand(count, -1, -1), cols.expand(count, -1, -1)
        flip_rows = (flips & 1).bool()[:, None, None]
        flip_cols = (flips & 2).bool()[:, None, None]
        transpose = (flips & 4).bool()[:, None, None]
        rows = torch.where(flip_rows, size - 1 - rows, rows)
        cols = torch.where(flip_cols, size - 1 - cols, cols)
        return torch.where(transpose, cols, rows), torch.where(transpose, rows, cols)

    def sample(self, size: int, count: int, generator: torch.Generator,
               permute_channels: bool = False) -> dict[str, torch.Tensor]:
        """``count`` random ``size`` x ``size`` crops, each with a random flip/rotation.

        Images are picked with probability proportional to the number of crop positions they
        offer (images smaller than ``size`` are never picked). For a bank with ``low``, ``size``
        is the low-resolution side and the clean crops are ``scale`` times larger, aligned.
        ``permute_channels`` shuffles the colour planes per crop (an augmentation for colour
        nets). Returns ``{"image": index (count,), "clean": uint8 (count, C, S, S), "variant":
        (V, count, C, size, size) of the banked variants, "low": (count, C, size, size)}``.
        """
        scale = self.scale
        clean_size = size * scale
        room = (self.sizes - clean_size + 1).clamp_min(0)
        weights = (room[:, 0] * room[:, 1]).double()
        if not bool((weights > 0).any()):
            raise ValueError(f"no image in the bank is at least {clean_size} pixels on a side")
        image = torch.multinomial(weights, count, replacement=True, generator=generator)
        top = (torch.rand(count, device=self.device, generator=generator)
               * (room[image, 0] // scale)).long()
        left = (torch.rand(count, device=self.device, generator=generator)
                * (room[image, 1] // scale)).long()
        flips = torch.randint(8, (count,), device=self.device, generator=generator)
        channel = torch.arange(self.channels, device=self.device).expand(count, -1)
        if permute_channels and self.channels > 1:
            channel = torch.argsort(torch.rand(count, self.channels, device=self.device,
                                               generator=generator), dim=1)
        channel = channel[:, None, None, :]

        def gather(bank: torch.Tensor, crop: int, factor: int) -> torch.Tensor:
            rows, cols = self._grids(crop, count, flips)
            rows = rows + (top * factor)[:, None, None]
            cols = cols + (left * factor)[:, None, None]
            index = image[:, None, None, None]
            return bank[index, rows[..., None], cols[..., None], channel].permute(0, 3, 1, 2)

        out = {"image": image, "clean": gather(self.clean, clean_size, scale)}
        if self.variants:
            out["variant"] = torch.stack([gather(v, size, 1) for v in self.variants])
        if self.low is not None:
            out["low"] = gather(self.low, size, 1)
        return out


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 ``[0, 1]``; float input is returned as float32."""
    if batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    return batch.float()


def add_noise(clean: torch.Tensor, sigma_range: tuple[float, float], generator: torch.Generator,
              shared_planes: torch.Tensor | None = None) -> torch.Tensor:
    """``clean`` (float NCHW) plus unclipped white Gaussian noise, sigma (0-255 scale) uniform
    in ``sigma_range`` per image. Where ``shared_planes`` (bool, N) is set, every plane gets
    the same noise (a gray image shown to a colour net as three equal planes)."""
    count = clean.shape[0]
    low, high = sigma_range
    sigma = low + (high - low) * torch.rand(count, device=clean.device, generator=generator)
    noise = torch.randn(clean.shape, device=clean.device, generator=generator)
    if shared_planes is not None:
        noise = torch.where(shared_planes[:, None, None, None], noise[:, :1].expand_as(noise),
                            noise)
    return clean + noise * (sigma / 255.0)[:, None, None, None]


def _jpeg_versions(args: tuple[np.ndarray, Sequence[int]]) -> list[np.ndarray]:
    image, qualities = args
    return [degrade.jpeg_compress(image, q) for q in qualities]


def jpeg_variants(images: Sequence[np.ndarray], qualities: Sequence[int], workers: int = 4
                  ) -> list[list[np.ndarray]]:
    """Per quality, the Pillow JPEG of every uint8 image (``degrade.jpeg_compress``), made in
    ``workers`` processes. A gray image stored as three equal planes is compressed as gray and
    expanded again, as a gray file would be."""
    def as_stored(image: np.ndarray) -> np.ndarray:
        if image.ndim == 3 and image.shape[2] == 3 and degrade.is_gray(image):
            return image[..., 0]
        return image

    jobs = [(as_stored(image), list(qualities)) for image in images]
    with ProcessPoolExecutor(workers) as pool:
        per_image = list(pool.map(_jpeg_versions, jobs, chunksize=8))
    result = []
    for q in range(len(qualities)):
        versions = []
        for image, done in zip(images, per_image):
            version = done[q]
            if image.ndim == 3 and version.ndim == 2:
                version = np.repeat(version[..., None], image.shape[2], axis=2)
            versions.append(version)
        result.append(versions)
    return result


def bicubic_lows(images: Sequence[np.ndarray], scale: int) -> tuple[list[np.ndarray], ...]:
    """(clean, low) per uint8 image: cropped to a multiple of ``scale`` (``modcrop``), and its
    MATLAB bicubic downscale as float32 ``[0, 1]``, unclipped, unrounded (as evaluation)."""
    cleans, lows = [], []
    for image in images:
        height, width = image.shape[:2]
        image = image[: height - height % scale, : width - width % scale]
        cleans.append(image)
        lows.append(degrade.bicubic_downscale(image.astype(np.float32) / 255.0, scale))
    return cleans, lows


@dataclass(frozen=True)
class Mixture:
    """Blind mixture for a ``restore-default`` style net: per crop, one of clean (identity),
    Gaussian noise or one banked JPEG quality, with these probabilities (normalised)."""
    clean: float = 0.1
    noise: float = 0.5
    jpeg: float = 0.4


__all__ = ["ImageBank", "Mixture", "add_noise", "bicubic_lows", "jpeg_variants", "to_float"]
