"""Split images into overlapping tiles of one shape, run a net on full batches, stitch back.

Images are float32 CHW tensors in ``[0, 1]``. A tile of ``tile`` x ``tile`` pixels (or the whole
side, when the image is smaller) is cut every ``tile - overlap`` pixels or less, spread evenly so
that neighbours overlap by at least ``overlap``. Outputs are blended with weights that are zero
within ``halo`` pixels of a tile side that lies inside the image and ramp up to one after it.
With ``halo`` at least the net's receptive radius (``receptive_field // 2``), every pixel that
gets weight was computed with its whole receptive field inside the tile, so the tiled output
equals the whole-image output up to float rounding; the ramp hides any remaining seam for nets
whose receptive field is larger than the overlap (U-Nets with pooling).

Tiles of one shape from many images are packed into batches of ``batch_size`` tiles, so a large
image never has to fit on the device whole, and small images share batches.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TilePlan:
    height: int
    width: int
    tile_height: int
    tile_width: int
    ys: tuple[int, ...]  # top rows of the tiles
    xs: tuple[int, ...]  # left columns of the tiles

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)


def tile_positions(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``."""
    if length <= tile:
        return (0,)
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile size ({tile})")
    count = math.ceil((length - overlap) / (tile - overlap))
    count = max(count, 2)
    return tuple(round(i * (length - tile) / (count - 1)) for i in range(count))


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TilePlan:
    """Tiles for an image of ``height`` x ``width``; ``tile = 0`` means one whole-image tile."""
    if tile <= 0:
        return TilePlan(height, width, height, width, (0,), (0,))
    tile_height, tile_width = min(tile, height), min(tile, width)
    return TilePlan(height, width, tile_height, tile_width,
                    tile_positions(height, tile, overlap), tile_positions(width, tile, overlap))


def _ramp(length: int, start: int, total: int, halo: int, overlap: int,
          device: torch.device) -> torch.Tensor:
    """1-D blend weights of a tile spanning ``[start, start+length)`` in a side of ``total``."""
    index = torch.arange(length, device=device, dtype=torch.float32)
    span = max(overlap - 2 * halo, 1)
    weight = torch.ones(length, device=device)
    if start > 0:
        weight = torch.minimum(weight, ((index - halo + 1) / span).clamp(0, 1))
    if start + length < total:
        weight = torch.minimum(weight, ((length - index - halo) / span).clamp(0, 1))
    return weight


def run_tiled(
    images: Sequence[torch.Tensor],
    forward: Callable[[torch.Tensor], torch.Tensor],
    tile: int,
    overlap: int,
    halo: int,
    scale: int = 1,
    batch_size: int | Callable[[int, int], int] = 8,
) -> list[torch.Tensor]:
    """Restore ``images`` (float32 CHW, any sizes) with ``forward`` on batches of tiles.

    ``forward`` maps an NCHW batch to an ``N x C x (H*scale) x (W*scale)`` batch. ``halo`` is the
    net's receptive radius in input pixels; ``overlap`` must be at least ``2 * halo + 1``.
    ``batch_size`` is tiles per forward pass, or a function of the tile's (height, width).
    Returns float32 CHW tensors on the images' device.
    """
    if tile > 0 and overlap < 2 * halo + 1:
        raise ValueError(f"overlap {overlap} is smaller than the net's receptive field "
                         f"{2 * halo + 1}; tiles would show seams")
    plans = [plan_tiles(img.shape[-2], img.shape[-1], tile, overlap) for img in images]
    outputs = [torch.zeros(img.shape[0], img.shape[-2] * scale, img.shape[-1] * scale,
                           device=img.device) for img in images]
    weights = [torch.zeros(1, img.shape[-2] * scale, img.shape[-1] * scale, device=img.device)
               for img in images]
    # Group every tile by shape so that each batch holds tiles of one shape.
    groups: dict[tuple[int, int, int], list[tuple[int, int, int]]] = defaultdict(list)
    for index, (image, plan) in enumerate(zip(images, plans)):
        for y in plan.ys:
            for x in plan.xs:
                groups[(image.shape[0], plan.tile_height, plan.tile_width)].append((index, y, x))
    for (_, tile_height, tile_width), members in groups.items():
        size = batch_size(tile_height, tile_width) if callable(batch_size) else batch_size
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            batch = torch.stack([images[i][:, y:y + tile_height, x:x + tile_width]
                                 for i, y, x in chunk])
            restored = forward(batch).float()
            for (i, y, x), out in zip(chunk, restored):
                plan = plans[i]
                wy = _ramp(tile_height * scale, y * scale, plan.height * scale, halo * scale,
                           overlap * scale, out.device)
                wx = _ramp(tile_width * scale, x * scale, plan.width * scale, halo * scale,
                           overlap * scale, out.device)
                w = wy[:, None] * wx[None, :]
                ys = slice(y * scale, (y + tile_height) * scale)
                xs = slice(x * scale, (x + tile_width) * scale)
                outputs[i][:, ys, xs] += out * w
                weights[i][:, ys, xs] += w
    return [out / weight.clamp_min(1e-8) for out, weight in zip(outputs, weights)]
