"""Split images into overlapping tiles of one shape, run a net on full batches, stitch back.

Images are float32 CHW tensors in ``[0, 1]``. A tile of ``tile`` x ``tile`` pixels (or the whole
side, when the image is smaller) is cut every ``tile - overlap`` pixels or less, spread evenly so
that neighbours overlap by at least ``overlap``. Outputs are blended with weights that are zero
within ``halo`` pixels of a tile side that lies inside the image and ramp up to one after it.
With ``halo`` at least the net's receptive radius (``receptive_field // 2``), every pixel that
gets weight was computed with its whole receptive field inside the tile, so the tiled output
equals the whole-image output up to float rounding; the ramp hides any remaining seam for nets
whose receptive field is larger than the overlap (U-Nets with pooling).

Nets with pooling are translation-equivariant only in steps of their ``alignment`` (``2 **
(levels - 1)`` for a U-Net). For them each image is tiled as if padded (mirrored, bottom and
right, see :func:`pad_reflect`) to a multiple of ``alignment``, exactly as the net pads a whole
image; tile sides and
tile starts are multiples of ``alignment``, so every tile sees the pooling grid of the whole
image, and the output (``scale`` times larger) is cropped back to the image's size. Only the
tiles that cross the bottom or right edge are padded; the image itself is never copied.

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
    height: int  # the size tiled: the image's, rounded up to a multiple of the alignment
    width: int
    tile_height: int
    tile_width: int
    ys: tuple[int, ...]  # top rows of the tiles
    xs: tuple[int, ...]  # left columns of the tiles

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)


def aligned(length: int, alignment: int) -> int:
    """``length`` rounded up to a multiple of ``alignment``."""
    return -(-length // alignment) * alignment


def tile_positions(length: int, tile: int, overlap: int, alignment: int = 1) -> tuple[int, ...]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``.

    With ``alignment`` > 1, ``length`` and ``tile`` must be multiples of it; every start is a
    multiple of it too, and neighbours overlap by at least ``overlap`` rounded up to it.
    """
    if length <= tile:
        return (0,)
    if length % alignment or tile % alignment:
        raise ValueError(f"length ({length}) and tile ({tile}) must be multiples of the "
                         f"alignment ({alignment})")
    step_overlap = aligned(overlap, alignment)
    if step_overlap >= tile:
        raise ValueError(f"overlap ({overlap}, {step_overlap} at alignment {alignment}) must be "
                         f"smaller than the tile size ({tile})")
    # Count in steps of `alignment`; with alignment 1 these are pixels.
    steps, tile_steps, overlap_steps = (length // alignment, tile // alignment,
                                        step_overlap // alignment)
    count = math.ceil((steps - overlap_steps) / (tile_steps - overlap_steps))
    count = max(count, 2)
    return tuple(alignment * round(i * (steps - tile_steps) / (count - 1)) for i in range(count))


def plan_tiles(height: int, width: int, tile: int, overlap: int, alignment: int = 1,
               balanced: bool = False) -> TilePlan:
    """Tiles for an image of ``height`` x ``width``; ``tile = 0`` means one whole-image tile.

    With ``alignment`` > 1 the plan covers the image padded to a multiple of ``alignment``, and
    ``tile`` is rounded down to a multiple of it (at least ``alignment``).

    ``balanced``: tiles no larger than needed for the same count of tiles (:func:`balanced_tile`
    per side): a 384 px side takes two 200 px tiles instead of two 256 px ones, 1.1x instead of
    1.8x the pixels of a 384x384 image computed. Fewer pixels for the net, but tile shapes then
    vary with image sizes (fewer tiles share a batch): worth it where the net is compute-bound
    on small batches (CPUs); GPUs keep one shape for full batches.
    """
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, got {alignment}")
    height, width = aligned(height, alignment), aligned(width, alignment)
    if tile <= 0:
        return TilePlan(height, width, height, width, (0,), (0,))
    tile = max(alignment, tile // alignment * alignment)
    tile_height, tile_width = min(tile, height), min(tile, width)
    if balanced:
        tile_height = balanced_tile(height, tile, overlap, alignment)
        tile_width = balanced_tile(width, tile, overlap, alignment)
    return TilePlan(height, width, tile_height, tile_width,
                    tile_positions(height, tile_height, overlap, alignment),
                    tile_positions(width, tile_width, overlap, alignment))


def balanced_tile(length: int, tile: int, overlap: int, alignment: int = 1) -> int:
    """The smallest tile side (a multiple of ``alignment``, at most ``tile``) that covers
    ``length`` with as few tiles as ``tile`` does, neighbours overlapping by ``overlap``."""
    if length <= tile:
        return length
    count = len(tile_positions(length, tile, overlap, alignment))
    step_overlap = aligned(overlap, alignment)
    return min(tile, aligned(math.ceil((length + (count - 1) * step_overlap) / count), alignment))


def effective_tile(tile: int, overlap: int, alignment: int = 1, factor: int = 4) -> int:
    """The tile side to use for a configured ``tile``: at least ``factor`` x ``overlap``.

    A tile little wider than the overlap spends most of its work on pixels that its neighbours
    compute again: tiles every ``tile - overlap`` pixels compute each pixel about
    ``(tile / (tile - overlap)) ** 2`` times, 3.2 for 256 px tiles of a default 4-level U-Net
    (overlap 112), 1.8 at ``factor = 4``. Below ``factor * overlap`` the tile is raised to that,
    rounded up to a multiple of ``alignment``. ``tile = 0`` (whole images) stays 0.
    """
    if tile <= 0 or tile >= factor * overlap:
        return tile
    return aligned(factor * overlap, alignment)


def reflect_indices(start: int, stop: int, length: int, device: torch.device | None = None
                    ) -> torch.Tensor:
    """Indices into a side of ``length`` pixels for positions ``start`` ... ``stop - 1`` of the
    side mirrored without repeating its edge pixel (``dcb|abcd|cba``), as many times as needed.

    Positions inside ``[0, length)`` map to themselves. This is ``torch``'s ``"reflect"`` padding
    where that works (pad < length) and its repetition beyond (so ``length`` 1 and 2 work too:
    ``a|aaaa``, ``ab|abab``).
    """
    if length < 1:
        raise ValueError(f"cannot mirror a side of {length} pixels")
    index = torch.arange(start, stop, device=device)
    period = 2 * (length - 1)
    if period == 0:
        return torch.zeros_like(index)
    index = index.remainder(period)
    return torch.where(index < length, index, period - index)


def pad_reflect(x: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
    """``x`` (``...HW``) padded by ``bottom`` rows and ``right`` columns of its mirror image.

    Mirroring continues the image's structure and noise into the pad; edge replication would
    invent streaks (one row repeated) that a denoiser never saw in training and that cost
    about 1 dB near the bottom and right sides of noisy photos. :func:`reflect_indices` gives
    the rule, for any size down to 1x1.
    """
    if bottom:
        x = x.index_select(-2, reflect_indices(0, x.shape[-2] + bottom, x.shape[-2], x.device))
    if right:
        x = x.index_select(-1, reflect_indices(0, x.shape[-1] + right, x.shape[-1], x.device))
    return x


def _cut(image: torch.Tensor, y: int, x: int, height: int, width: int) -> torch.Tensor:
    """The ``height`` x ``width`` tile at (y, x) of ``image`` (CHW), taken from the image
    mirrored (:func:`pad_reflect`) where it runs past the bottom or right side."""
    image_height, image_width = image.shape[-2:]
    rows = (slice(y, y + height) if y + height <= image_height
            else reflect_indices(y, y + height, image_height, image.device))
    columns = (slice(x, x + width) if x + width <= image_width
               else reflect_indices(x, x + width, image_width, image.device))
    return image[:, rows][:, :, columns]


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


def _solid_spans(length: int, starts: Sequence[int], total: int, halo: int, overlap: int,
                 device: torch.device) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Along one side: each tile's 1-D blend weights (:func:`_ramp`), and the span
    ``[first, last)`` of its positions (tile-local) where it alone has weight, and weight 1.

    There the blend ``sum(out * w) / sum(w)`` is that tile's output exactly (the other tiles
    add ``out * 0``, the weights sum to 1): :func:`run_tiled` copies such pixels and blends
    only the rest. An empty span is ``(0, 0)``."""
    ramps = [_ramp(length, start, total, halo, overlap, device) for start in starts]
    covering = torch.zeros(total, dtype=torch.int32, device=device)
    for start, ramp in zip(starts, ramps):
        covering[start:start + length] += (ramp > 0).to(torch.int32)
    spans = []
    for start, ramp in zip(starts, ramps):
        alone = ((ramp == 1) & (covering[start:start + length] == 1)).nonzero().flatten()
        first, last = (int(alone[0]), int(alone[-1]) + 1) if len(alone) else (0, 0)
        spans.append((first, last) if last - first == len(alone) else (0, 0))  # one run only
    return ramps, spans


@dataclass
class _Stitch:
    """One image's output as its tiles arrive (:func:`run_tiled`): pixels where one tile alone
    has weight 1 are copied from it; the others (the overlap strips) are blended there."""

    result: torch.Tensor  # C x H x W (output pixels), every pixel written once all tiles came
    canvas: torch.Tensor  # sum of out * w, only the strips are read
    weight: torch.Tensor  # 1 x H x W: sum of w, only the strips are read
    rows: dict[int, tuple[torch.Tensor, tuple[int, int]]]  # tile top -> (weights, solid span)
    columns: dict[int, tuple[torch.Tensor, tuple[int, int]]]
    blend_rows: list[tuple[int, int]]  # [first, last) of output rows no tile owns alone
    blend_columns: list[tuple[int, int]]

    def add(self, out: torch.Tensor, y: int, x: int) -> None:
        (wy, (y0, y1)), (wx, (x0, x1)) = self.rows[y], self.columns[x]
        height, width = out.shape[-2:]
        if y1 > y0 and x1 > x0:
            self.result[:, y + y0:y + y1, x + x0:x + x1] = out[:, y0:y1, x0:x1]
        # The rest of the tile, in up to four bands around its solid rectangle (all of it when
        # it has none), is blended exactly as a whole-canvas blend would blend it.
        if y1 <= y0 or x1 <= x0:
            bands = [(0, height, 0, width)]
        else:
            bands = [(0, y0, 0, width), (y1, height, 0, width), (y0, y1, 0, x0),
                     (y0, y1, x1, width)]
        for top, bottom, left, right in bands:
            if bottom <= top or right <= left:
                continue
            w = wy[top:bottom, None] * wx[None, left:right]
            self.canvas[:, y + top:y + bottom, x + left:x + right] += out[:, top:bottom,
                                                                          left:right] * w
            self.weight[:, y + top:y + bottom, x + left:x + right] += w

    def finish(self) -> torch.Tensor:
        for first, last in self.blend_columns:
            self.result[:, :, first:last] = self.canvas[:, :, first:last].div(
                self.weight[:, :, first:last].clamp_min(1e-8))
        for first, last in self.blend_rows:  # their crossings with the columns: once more
            self.result[:, first:last] = self.canvas[:, first:last].div_(
                self.weight[:, first:last].clamp_min_(1e-8))
        return self.result


def _blend_runs(spans: list[tuple[int, int]], starts: Sequence[int], total: int
                ) -> list[tuple[int, int]]:
    """The runs ``[first, last)`` of a side's positions that no tile's solid span covers."""
    owned = sorted((start + first, start + last) for start, (first, last) in zip(starts, spans)
                   if last > first)
    runs, position = [], 0
    for first, last in owned:
        if first > position:
            runs.append((position, first))
        position = max(position, last)
    if position < total:
        runs.append((position, total))
    return runs


def _stitch(image: torch.Tensor, plan: TilePlan, scale: int, halo: int, overlap: int
            ) -> _Stitch:
    height, width = plan.height * scale, plan.width * scale
    device = image.device
    ys, xs = [y * scale for y in plan.ys], [x * scale for x in plan.xs]
    wys, row_spans = _solid_spans(plan.tile_height * scale, ys, height, halo * scale,
                                  overlap * scale, device)
    wxs, column_spans = _solid_spans(plan.tile_width * scale, xs, width, halo * scale,
                                     overlap * scale, device)
    channels = image.shape[0]
    return _Stitch(
        result=torch.empty(channels, height, width, device=device),
        canvas=torch.zeros(channels, height, width, device=device),
        weight=torch.zeros(1, height, width, device=device),
        rows={y: (w, span) for y, w, span in zip(ys, wys, row_spans)},
        columns={x: (w, span) for x, w, span in zip(xs, wxs, column_spans)},
        blend_rows=_blend_runs(row_spans, ys, height),
        blend_columns=_blend_runs(column_spans, xs, width))


def run_tiled(
    images: Sequence[torch.Tensor],
    forward: Callable[[torch.Tensor], torch.Tensor],
    tile: int,
    overlap: int,
    halo: int,
    scale: int = 1,
    batch_size: int | Callable[[int, int], int] = 8,
    alignment: int = 1,
    balanced: bool = False,
    progress: Callable[[float], None] | None = None,
) -> list[torch.Tensor]:
    """Restore ``images`` (float32 CHW, any sizes) with ``forward`` on batches of tiles.

    ``forward`` maps an NCHW batch to an ``N x C x (H*scale) x (W*scale)`` batch. ``halo`` is the
    net's receptive radius in input pixels; ``overlap`` must be at least ``2 * halo + 1``.
    ``batch_size`` is tiles per forward pass, or a function of the tile's (height, width).
    ``alignment`` is the net's (see the module docstring): tiles start on multiples of it.
    ``balanced``: see :func:`plan_tiles`. ``progress``, if given, is called after each forward
    pass with the share of the tile pixels done so far (0-1]. Returns float32 CHW tensors on the
    images' device, ``scale`` times the images' size.

    Outputs are blended ``sum(out * w) / sum(w)`` over the tiles that cover a pixel, in tile
    order; where one tile alone has weight (weight 1) that is its output, copied (the same
    float values: only the overlap strips are blended).
    """
    if tile > 0 and overlap < 2 * halo + 1:
        raise ValueError(f"overlap {overlap} is smaller than the net's receptive field "
                         f"{2 * halo + 1}; tiles would show seams")
    plans = [plan_tiles(img.shape[-2], img.shape[-1], tile, overlap, alignment, balanced)
             for img in images]
    # An image of one tile is its tile's output (its blend weights are all ones): no canvas.
    stitches: list[_Stitch | None] = [None if plan.count == 1 else
                                      _stitch(img, plan, scale, halo, overlap)
                                      for img, plan in zip(images, plans)]
    outputs: list[torch.Tensor | None] = [None] * len(images)
    # Group every tile by shape so that each batch holds tiles of one shape.
    groups: dict[tuple[int, int, int], list[tuple[int, int, int]]] = defaultdict(list)
    for index, (image, plan) in enumerate(zip(images, plans)):
        for y in plan.ys:
            for x in plan.xs:
                groups[(image.shape[0], plan.tile_height, plan.tile_width)].append((index, y, x))
    work = sum(h * w * len(members) for (_, h, w), members in groups.items())
    worked = 0
    for (_, tile_height, tile_width), members in groups.items():
        size = batch_size(tile_height, tile_width) if callable(batch_size) else batch_size
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            batch = torch.stack([_cut(images[i], y, x, tile_height, tile_width)
                                 for i, y, x in chunk])
            restored = forward(batch).float()
            for (i, y, x), out in zip(chunk, restored):
                if stitches[i] is None:
                    outputs[i] = out
                else:
                    stitches[i].add(out, y * scale, x * scale)
            if progress is not None:
                worked += tile_height * tile_width * len(chunk)
                progress(worked / work)
    for i, stitch in enumerate(stitches):
        if stitch is not None:
            outputs[i] = stitch.finish()
            stitches[i] = None
    return [out[:, :img.shape[-2] * scale, :img.shape[-1] * scale].contiguous()
            for img, out in zip(images, outputs)]
