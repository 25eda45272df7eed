"""Synthetic sample images for demos and tests: smooth scenes with edges, plus noise.

``write_samples(folder)`` writes a small mixed set (gray, RGB, RGBA, 16-bit, odd sizes) with
Gaussian noise of sigma 25 (0-255 scale), so that ``restorer restore`` has something to restore
on a fresh machine, with no download. The clean versions go to ``folder/../<name>-clean`` when
asked, so a restoration can be measured.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def scene(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """A clean float32 HWC image in [0, 1]: gradients, discs, stripes and a checker patch."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    planes = []
    for c in range(channels):
        base = 0.3 + 0.4 * (x / max(width - 1, 1)) * rng.uniform(0.5, 1.0)
        base += 0.2 * np.sin(y / rng.uniform(8, 20) + c) * (y > height / 2)
        for _ in range(4):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            radius = rng.uniform(0.08, 0.25) * min(height, width)
            base = np.where((y - cy) ** 2 + (x - cx) ** 2 < radius ** 2, rng.uniform(0, 1), base)
        checker = ((y // 6 + x // 6) % 2) * 0.3 + 0.35
        box = (y < height / 3) & (x > 2 * width / 3)
        planes.append(np.where(box, checker, base))
    return np.clip(np.stack(planes, -1), 0, 1).astype(np.float32)


def noisy(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(clean + rng.normal(0, sigma / 255.0, clean.shape), 0, 1).astype(np.float32)


def _save(array: np.ndarray, path: str, bits: int = 8, alpha: np.ndarray | None = None) -> None:
    peak = 65535 if bits == 16 else 255
    dtype = np.uint16 if bits == 16 else np.uint8
    pixels = np.round(array * peak).astype(dtype)
    if bits == 16:
        Image.fromarray(pixels[..., 0]).save(path)
        return
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    if alpha is not None:
        image.putalpha(Image.fromarray(np.round(alpha * 255).astype(np.uint8)))
    kwargs = {"quality": 98} if path.lower().endswith((".jpg", ".jpeg")) else {}
    image.save(path, **kwargs)


SAMPLES = [  # name, height, width, channels, bits, alpha
    ("street-gray.png", 256, 320, 1, 8, False),
    ("garden-rgb.png", 240, 256, 3, 8, False),
    ("photo.jpg", 300, 200, 3, 8, False),
    ("logo-rgba.png", 130, 170, 3, 8, True),
    ("scan-16bit.png", 200, 150, 1, 16, False),
    ("nested/odd-size.png", 97, 333, 1, 8, False),
]


def write_samples(folder: str, sigma: float = 25.0, clean_folder: str | None = None) -> list[str]:
    """Write the noisy sample set into ``folder``; returns the written keys."""
    keys = []
    for index, (name, height, width, channels, bits, with_alpha) in enumerate(SAMPLES):
        clean = scene(height, width, channels, seed=index)
        alpha = scene(height, width, 1, seed=100 + index)[..., 0] if with_alpha else None
        for root, image in ((folder, noisy(clean, sigma, seed=1000 + index)),
                            (clean_folder, clean)):
            if root is None:
                continue
            path = os.path.join(root, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _save(image, path, bits, alpha)
        keys.append(name)
    return keys
