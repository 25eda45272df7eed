"""Training pairs made on the training device, so that a GPU never waits on Python.

The CPU functions of :mod:`restorer.image.degrade` define the degradations; this module makes
batches of them in bulk with torch. Clean images are loaded once into an :class:`ImageBank` (uint8,
on the device, padded to one shape); each batch is one gather of random crops, with one of the 8
flips/rotations per crop built into the gather's indices. Degradations that are cheap in torch
(Gaussian noise) are drawn per batch; the others are computed once per image on the CPU with
:mod:`restorer.image.degrade` and banked beside the clean images: JPEG at every quality of a range
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
from PIL import Image

from restorer.image import degrade


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


def float_batch(batch: torch.Tensor) -> torch.Tensor:
    """A batch of crops on the training device, uint8 -> float32 ``[0, 1]``; float crops (super-
    resolution's low images) pass as float32. (:func:`restorer.image.pixels.to_float` is the
    I/O boundary's: numpy, integer pixels only.)"""
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


@dataclass(frozen=True)
class PracticalMixture:
    """Per crop of a noise-aware net's batch: clean (identity), white Gaussian noise in the
    reference convention (unclipped, sigma uniform in ``sigma_range``), JPEG alone at a
    quality uniform in ``quality_range``, or :func:`restorer.image.degrade.practical_degradation`
    (camera and web degradations), with these probabilities (normalised). ``gray`` is the
    share of crops drawn from gray images (shown as three equal planes)."""
    clean: float = 0.08
    gaussian: float = 0.12
    jpeg: float = 0.10
    practical: float = 0.70
    gray: float = 0.2
    sigma_range: tuple[float, float] = (0.0, 50.0)
    quality_range: tuple[int, int] = (10, 90)
    # share of crops taken as the smoothest of ``smooth_pick`` random crops (the least mean
    # absolute difference between neighbouring pixels, :func:`roughness`): walls, sky, skin and
    # studio backgrounds, where noise shows most, are scarce in texture-heavy training photos
    # (urban100) and common in real ones. 0 draws no extra random numbers (the batches of a
    # seed stay as they were).
    smooth: float = 0.0
    smooth_pick: int = 4
    # share of crops cut from the photo enlarged by a factor uniform in ``enlarge_range``
    # (bicubic): a camera's own pixels are softer than those of a photo published downscaled
    # (lens, anti-aliasing filter, demosaicing), and real noisy photos are full-resolution
    # crops, smooth at the pixel scale, where filtering the noise harder (in chroma above all)
    # pays. 0 draws no extra random numbers.
    enlarge: float = 0.0
    enlarge_range: tuple[float, float] = (1.5, 3.0)

    def __post_init__(self):
        if not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"practical.smooth = {self.smooth}: a share of the crops, 0..1")
        if self.smooth_pick < 1:
            raise ValueError(f"practical.smooth_pick = {self.smooth_pick}: the number of random "
                             "crops to pick the smoothest from, 1 or more (4 is the default)")
        if not 0.0 <= self.enlarge <= 1.0:
            raise ValueError(f"practical.enlarge = {self.enlarge}: a share of the crops, 0..1")
        low, high = self.enlarge_range
        if not 1.0 <= low <= high:
            raise ValueError(f"practical.enlarge_range = {self.enlarge_range}: two factors, "
                             "1 <= low <= high, e.g. 1.5,3.0")


def roughness(crop: np.ndarray) -> float:
    """Mean absolute difference between horizontally and vertically neighbouring pixels of
    ``crop`` (HW or HWxC, any scale): 0 on a flat crop, larger the more texture it has."""
    crop = np.asarray(crop, np.float32)
    return float(np.abs(np.diff(crop, axis=0)).mean() + np.abs(np.diff(crop, axis=1)).mean()) / 2


class PracticalPairs:
    """Batches ``(clean, degraded, noise_map)`` (float32 NCHW on the CPU) for a noise-aware
    net, made on the CPU with :mod:`restorer.image.degrade`, ahead of the training step.

    ``workers = 0``: one background thread makes them (numpy, Pillow and scipy release the GIL
    for most of it), ``prefetch`` batches ahead: enough beside a CPU training step. ``workers =
    N``: N processes make them (a ``torch.utils.data.DataLoader`` over :class:`PairStream`,
    batches handed over in shared memory, ``prefetch`` batches ahead per process), so that a GPU
    step, ~100x faster than a CPU one, is not left waiting on one core. The batches are the same
    for the same ``seed`` and ``workers``; process ``k`` draws from ``SeedSequence([seed, k])``.
    ``pin_memory`` (for a CUDA step) pins them, so that the copy to the GPU can overlap.

    ``images``: uint8 HWx3 arrays (gray images as three equal planes, see
    :func:`restorer.image.degrade.is_gray`); each crop is ``patch`` px, flipped/rotated at random
    (:func:`restorer.image.degrade.sample_patches`). The noise map of a Gaussian crop is its
    :func:`restorer.image.degrade.noise_level_map`, of a clean or JPEG-only crop zero.
    """

    def __init__(self, images: Sequence[np.ndarray], patch: int, batch: int, seed: int,
                 mixture: PracticalMixture = PracticalMixture(),
                 config: degrade.PracticalConfig = degrade.PracticalConfig(), prefetch: int = 2,
                 workers: int = 0, pin_memory: bool = False):
        self.maker = PairMaker(images, patch, batch, mixture, config)
        self.patch, self.batch, self.mixture, self.config = patch, batch, mixture, config
        self.workers = workers
        if workers > 0:
            loader = torch.utils.data.DataLoader(
                PairStream(self.maker, seed), batch_size=None, num_workers=workers,
                prefetch_factor=prefetch, persistent_workers=True, pin_memory=pin_memory)
            self._batches = iter(loader)
            return
        import queue
        import threading

        self.rng = np.random.default_rng(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="practical-pairs")
        self._thread.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.maker.batch(self.rng)
            except Exception as e:  # noqa: BLE001 - handed to the consumer, raised there
                batch = e
            self._queue.put(batch)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.workers > 0:
            return next(self._batches)  # a worker's exception is raised here by the loader
        batch = self._queue.get()
        if isinstance(batch, Exception):
            raise batch
        return batch

    def close(self) -> None:
        """Stop making batches (the thread, or the worker processes)."""
        if self.workers > 0:
            self._batches._shutdown_workers()  # what the loader's iterator does when collected
            return
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()


class PairMaker:
    """Makes one batch of :class:`PracticalPairs` from a numpy generator: the crops, the
    mixture's choice per crop and its degradation (picklable, for worker processes)."""

    def __init__(self, images: Sequence[np.ndarray], patch: int, batch: int,
                 mixture: PracticalMixture, config: degrade.PracticalConfig):
        usable = [image for image in images if min(image.shape[:2]) >= patch]
        self.gray = [image for image in usable if degrade.is_gray(image)]
        self.colour = [image for image in usable if not degrade.is_gray(image)]
        if not self.colour and not self.gray:
            raise ValueError(f"no training image is at least {patch} px on a side")
        self.patch, self.size, self.mixture, self.config = patch, batch, mixture, config

    def _crop(self, rng: np.random.Generator) -> np.ndarray:
        gray = bool(self.gray) and (not self.colour or rng.random() < self.mixture.gray)
        pool = self.gray if gray else self.colour
        mix = self.mixture
        count = mix.smooth_pick if mix.smooth > 0 and rng.random() < mix.smooth else 1
        size = self.patch
        if mix.enlarge > 0 and rng.random() < mix.enlarge:
            size = max(2, round(self.patch / rng.uniform(*mix.enlarge_range)))
        crops = degrade.sample_patches(pool, size, count, rng)
        crop = crops[0] if count == 1 else min(crops, key=roughness)  # no measure on a lone crop
        if size != self.patch:  # uint8 in, uint8 out: a clean target as a stored photo is
            crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(
                (self.patch, self.patch), Image.Resampling.BICUBIC))
        return crop.astype(np.float32) / 255

    def _pair(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mix = self.mixture
        clean = self._crop(rng)
        weights = np.array([mix.clean, mix.gaussian, mix.jpeg, mix.practical], np.float64)
        kind = int(rng.choice(4, p=weights / weights.sum()))
        zero = np.zeros_like(clean)
        if kind == 0:
            return clean, clean, zero
        if kind == 1:
            sigma = float(rng.uniform(*mix.sigma_range))
            shared = degrade.is_gray(clean)
            noisy = degrade.add_poisson_gaussian_noise(clean, 0.0, (sigma / 255) ** 2, rng,
                                                       shared=shared)
            return clean, noisy, degrade.noise_level_map(noisy - clean)
        if kind == 2:
            quality = int(rng.integers(mix.quality_range[0], mix.quality_range[1] + 1))
            return clean, degrade.jpeg_float(clean, quality), zero
        degraded, noise_map = degrade.practical_degradation(clean, rng, self.config)
        return clean, degraded, noise_map

    def batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        pairs = [self._pair(rng) for _ in range(self.size)]
        return tuple(torch.from_numpy(np.stack([p[i] for p in pairs])).permute(0, 3, 1, 2)
                     .contiguous() for i in range(3))


class PairStream(torch.utils.data.IterableDataset):
    """An endless stream of :class:`PairMaker` batches for a ``DataLoader``; each worker
    process draws from its own generator, ``SeedSequence([seed, worker id])``."""

    def __init__(self, maker: PairMaker, seed: int):
        self.maker, self.seed = maker, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info is not None else 0])
        while True:
            yield self.maker.batch(rng)


__all__ = ["ImageBank", "Mixture", "PairMaker", "PairStream", "PracticalMixture",
           "PracticalPairs", "add_noise", "bicubic_lows", "float_batch", "jpeg_variants",
           "roughness"]
