"""The restore actor: one model on one device (GPU or CPU), restoring batches of images.

:class:`RestoreActor` is the stage of the restore graph that holds the model; Ray Data runs a
pool of them (:func:`restorer.pipeline.graph.build_pipeline`), and it also works in a user's own Ray
Data pipeline or called directly (``restore_arrays``, used by ``restorer eval --through
actor`` and the GPU benchmark). Besides the restored pixels it measures, cheaply and on the
device, what the model did to each image (the audit's change, noise and residual-structure
figures, :mod:`restorer.image.audit`).

torch is imported inside the methods: this module is imported by the driver and by task
workers that never run a model.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from restorer.errors import ModelError, is_device_fatal
from restorer.image.audit import AUDIT_SIDE, audit_crop, noise_sigma, p99
from restorer.io import storage
from restorer.output.records import RESTORED_SCHEMA, fail, pixels_of, to_rows, to_table

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def tile_settings(net: torch.nn.Module, tile: int, overlap: int) -> tuple[int, int]:
    """(tile, overlap) that the actor uses for ``net`` given the configured ones.

    Overlap 0 means the net's receptive field, rounded up to 8; a given overlap is raised to
    cover the receptive field. The tile is raised to 4x the overlap, rounded up to the net's
    alignment (:func:`restorer.image.tiling.effective_tile`); 0 (whole images) stays 0.
    """
    from restorer.image.tiling import effective_tile

    receptive_field = net.receptive_field
    halo = receptive_field // 2
    overlap = max(overlap, 2 * halo + 1) if overlap else 8 * math.ceil((receptive_field + 1) / 8)
    return effective_tile(tile, overlap, net.alignment), overlap


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): there bf16 autocast
    runs the zoo's convnets ~2x faster than fp32; elsewhere it is emulated and slower."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, on_gpu: bool, net: Any = None) -> str:
    """The precision actors really run. ``auto``: bf16 on GPUs; on CPUs bf16 where the CPU
    has native bf16 (:func:`cpu_has_bf16`, judged on the machine that resolves it: the
    driver) and the net does not say ``cpu_bf16 = False`` (its figures move more than
    0.01 dB), else fp32. fp16 runs as fp32 on CPUs. An explicit bf16 stays bf16 anywhere."""
    if on_gpu:
        return "bf16" if precision == "auto" else precision
    if precision == "auto":
        return "bf16" if cpu_has_bf16() and getattr(net, "cpu_bf16", True) else "fp32"
    return "bf16" if precision == "bf16" else "fp32"


def check_strength(strength: float, noise_aware: bool, model: str) -> None:
    """Refuse a ``strength`` the model cannot apply: above 1 needs a noise-aware model (one
    whose noise map it scales); other models blend with the input, 0..1."""
    if strength > 1.0 and not noise_aware:
        raise ModelError(f"strength {strength:g} needs a noise-aware model (restore-default); "
                         f"{model} blends its output with the input: use 0..1")


class RestoreActor:
    """Holds one model on one device and restores batches of images.

    Use it in the project's pipeline or in your own Ray Data pipeline::

        ds = ray.data.read_images("s3://bucket/in/")  # an "image" column of HWC uint8 arrays
        ds = ds.map_batches(RestoreActor, fn_constructor_kwargs={"model": "denoise-gray"},
                            compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1,
                            batch_size=16)

    Given a batch with an ``image`` column (numpy format), it returns the batch with restored
    images in that column. Gray nets restore each plane of an RGB image on its own; color nets
    restore a gray image as three equal planes and return their mean. Precision
    (:func:`resolve_precision`): bf16 autocast and channels_last on CUDA, and on CPUs with
    native bf16, unless ``precision="fp32"``; fp32 on other CPUs. A super-resolution
    net (``scale`` > 1) returns images ``scale`` times larger.

    Tiles overlap by the net's receptive field (``overlap=0``) and start on multiples of its
    ``alignment`` (see :mod:`restorer.image.tiling`). A ``tile`` below 4x the overlap is raised to
    that, rounded up to the alignment, and logged: with a large receptive field (a default
    4-level U-Net needs 112 px of overlap) 256 px tiles would compute each pixel about three
    times. :attr:`tile` is the tile used; job fingerprints keep the configured one. On CPUs
    tiles shrink to the smallest size that needs no more of them (``balanced``, see
    :func:`restorer.image.tiling.plan_tiles`).

    ``flat_fill`` (``auto``, ``on``, ``off``): before a blind denoiser runs, clean flat regions
    (frames, clipped highlights) are filled with the image's own noise and put back afterwards,
    so that the photo next to them is denoised like the rest (:mod:`restorer.image.flat`); ``auto``
    does it for models trained to denoise. :attr:`flat_fill` says whether this actor does.
    """

    def __init__(self, model: str | None = None, tile: int = 256, overlap: int = 0,
                 precision: str = "auto", channels_last: bool = True, strength: float = 1.0,
                 tile_batch: int = 0, threads: int = 0, device: str = "auto",
                 storage_options: storage.StorageOptions = storage.StorageOptions(),
                 compile: bool = False, model_sha256: str = "", flat_fill: str = "auto"):
        import torch

        from restorer.image import flat
        from restorer.weights.zoo import get_model

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        loaded = get_model(model, storage_options)
        if model_sha256 and loaded.sha256 != model_sha256:
            raise ModelError(f"Model {model} on this worker has sha256 {loaded.sha256[:12]}, "
                             f"not the job's {model_sha256[:12]}: the file changed after the "
                             "job started, or the nodes see different files; give every node "
                             "the same model (an s3:// URI or a bundled name)")
        self.model_sha256 = loaded.sha256
        self.net = loaded.net.to(self.device).eval()
        self.channels = self.net.channels
        self.scale = self.net.scale
        self.halo = self.net.receptive_field // 2
        self.alignment = self.net.alignment
        self.tile, self.overlap = tile_settings(self.net, tile, overlap)
        self.flat_fill = flat.wanted(flat_fill, loaded.provenance, self.scale)
        if self.tile != tile:
            log.info("RestoreActor: tile %d raised to %d (4x the overlap of %d px, a multiple of "
                     "the net's alignment %d) so that tiles do not mostly recompute their "
                     "neighbours", tile, self.tile, self.overlap, self.alignment)
        self._tile_batches: dict[tuple[int, int], int] = {}
        self.tile_batch = tile_batch or self._auto_tile_batch
        self.strength = strength
        # called with the share of the current batch's tiles restored (set per batch by
        # restorer.pipeline.poison.IsolatingRestoreActor, for the driver's progress)
        self.on_progress: Callable[[float], None] | None = None
        self.noise_aware = hasattr(self.net, "strength")  # a noise-map net: strength scales it
        check_strength(strength, self.noise_aware, loaded.source)
        if self.noise_aware:
            self.net.strength = strength
        self.precision = resolve_precision(precision, self.device.type == "cuda", self.net)
        if self.device.type == "cpu" and self.precision == "bf16" and not cpu_has_bf16():
            log.warning("RestoreActor: bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) "
                        "is emulated and slower than fp32; the job's precision was resolved "
                        "on a machine that has it. Set precision = \"fp32\" for such nodes")
        self.autocast_dtype = {"fp32": None, "fp16": torch.float16,
                               "bf16": torch.bfloat16}[self.precision]
        # channels_last: on CUDA, and on CPUs with bf16 (oneDNN's bf16 convolutions want it;
        # in fp32 on CPU it moves outputs by a level at most for ~1.2x, not taken)
        self.channels_last = channels_last and (self.device.type == "cuda"
                                                or self.autocast_dtype is not None)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net = torch.compile(self.net, dynamic=False)  # one graph per tile shape
        log.info("RestoreActor: %s on %s (tile %d, overlap %d, threads %d)", loaded.source,
                 self.device, self.tile, self.overlap, torch.get_num_threads())

    def _auto_tile_batch(self, height: int, width: int) -> int:
        """Tiles per forward pass when ``tile_batch`` is 0, from the tile's pixels.

        CPU: about 64k pixels per pass (measured: batches of 8 256x256 tiles run ~35% slower
        per image than 1 on a 2-core machine, as activations leave the cache). CUDA: half
        the free memory (read once per tile shape) over an activation estimate of 3 live
        feature maps per pixel, rounded down to a power of two and capped at 256. Fixed per
        shape, so batches keep their shapes (no cuDNN re-tuning, the same arithmetic for the
        same image).
        """
        import torch

        if (height, width) in self._tile_batches:
            return self._tile_batches[height, width]
        pixels = height * width
        if self.device.type != "cuda":
            size = max(1, 65536 // pixels)
        else:
            free, _ = torch.cuda.mem_get_info(self.device)
            width_features = max((m.out_channels for m in self.net.modules()
                                  if isinstance(m, torch.nn.Conv2d)), default=64)
            bytes_per_pixel = 3 * width_features * (2 if self.autocast_dtype else 4)
            fits = free // 2 // (bytes_per_pixel * pixels * self.scale ** 2)
            size = 2 ** int(math.log2(max(1, min(256, fits))))
        self._tile_batches[height, width] = size
        return size

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            if self.autocast_dtype is None:
                return self.net(batch)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self.net(batch).float()

    def _to_tensor(self, array: np.ndarray) -> torch.Tensor:
        import torch

        peak = 65535.0 if array.dtype == np.uint16 else 255.0
        # frombuffer arrays are read-only; torch wants writable memory, so copy (cheap vs the net)
        tensor = torch.from_numpy(array.astype(np.float32 if array.dtype == np.uint16
                                               else np.uint8, copy=True))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        # CHW in memory too: tiles, the flat-region check and the audit read planes
        return tensor.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format
                                          ).div_(peak)

    def restore_arrays(self, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[dict]]:
        """Restore HWC uint8/uint16 arrays; returns same-dtype arrays and per-image stats."""
        import torch

        with torch.inference_mode():
            return self._restore_arrays(arrays)

    def _restore_arrays(self, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[dict]]:
        import torch

        from restorer.image.flat import fill_flat, put_back
        from restorer.image.tiling import run_tiled

        tensors = [self._to_tensor(a) for a in arrays]
        # Blind denoisers: clean flat regions filled with the image's noise (restorer.image.flat),
        # on whole images before tiling, so that tiled == untiled still holds.
        fills = [fill_flat(t) if self.flat_fill else None for t in tensors]
        planes: list[torch.Tensor] = []
        owners: list[tuple[int, int]] = []  # (image index, how many net inputs it became)
        for index, tensor in enumerate(tensors):
            if fills[index] is not None:
                tensor = fills[index][0]
            if self.channels == 1:
                parts = [plane[None] for plane in tensor]
            elif tensor.shape[0] == 1:
                parts = [tensor.expand(self.channels, -1, -1)]
            else:
                parts = [tensor]
            planes.extend(parts)
            owners.append((index, len(parts)))
        restored = run_tiled(planes, self._forward, self.tile, self.overlap, self.halo,
                             self.scale, self.tile_batch, self.alignment,
                             balanced=self.device.type != "cuda", progress=self.on_progress)
        results, pairs, cursor = [], [], 0
        for (index, count), source in zip(owners, tensors):
            parts = restored[cursor:cursor + count]
            cursor += count
            out = torch.cat(parts, 0) if self.channels == 1 else parts[0]
            if out.shape[0] != source.shape[0]:
                out = out.mean(0, keepdim=True)
            if fills[index] is not None:
                out = put_back(out, source, fills[index][1])
            if self.strength < 1.0 and not self.noise_aware:
                base = source if self.scale == 1 else torch.nn.functional.interpolate(
                    source[None], scale_factor=self.scale, mode="bicubic")[0]
                out = base + self.strength * (out - base)
            pairs.append((source, out.clamp_(0, 1)))
        changes = self._changes(pairs) if pairs else None  # before the outputs are rounded
        for index, (_, out) in enumerate(pairs):
            # Round and narrow on the device, in place: 1/4 (8-bit) of the float bytes cross
            # to the host, already in the HWC order the encoder reads (one contiguous copy).
            if arrays[index].dtype == np.uint16:
                pixels = out.mul_(65535.0).round_().permute(1, 2, 0).to(torch.int32)
            else:
                pixels = out.mul_(255.0).round_().permute(1, 2, 0).to(
                    torch.uint8, memory_format=torch.contiguous_format)
            array = pixels.contiguous().to("cpu").numpy()
            results.append(array.astype(arrays[index].dtype, copy=False))
        names = ("change_mean", "change_p99", "noise_in", "noise_out", "residual_structure")
        values = changes.tolist() if changes is not None else []  # one sync for the batch
        return results, [dict(zip(names, row)) for row in values]

    def _changes(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """What the model did to each (input, output) image, cheaply and on the device, as an
        (N, 5) tensor: |output - input| (mean, 99th percentile) on a strided view of at most
        ``AUDIT_SIDE`` px a side, the noise level of input and output on the central
        ``AUDIT_SIDE`` px crop of the first plane (:func:`noise_sigma`), all in 8-bit levels,
        and the structure of the residual on that crop (0-1,
        :func:`restorer.image.audit.residual_structure`, calibrated on crops of that size; a crop,
        not the strided view, which would alias the pixel-scale detail it looks for). The
        crops of one shape are measured together (one call for the batch, not per image)."""
        import torch

        from restorer.image.audit import residual_structure

        diffs, crops = [], defaultdict(list)  # crop shape -> [(image index, input, output)]
        for index, (source, out) in enumerate(pairs):
            if self.scale > 1:
                out = torch.nn.functional.avg_pool2d(out[None], self.scale)[0]
            step = max(1, math.ceil(max(source.shape[-2:]) / AUDIT_SIDE))
            diff = (out[:, ::step, ::step] - source[:, ::step, ::step]).abs().flatten() * 255.0
            diffs.append(torch.stack([diff.mean(), p99(diff)]))
            y0, x0 = audit_crop(*source.shape[-2:])
            window = (slice(None), slice(y0, y0 + AUDIT_SIDE), slice(x0, x0 + AUDIT_SIDE))
            crops[tuple(source[window].shape)].append((index, source[window], out[window]))
        audit: list[torch.Tensor | None] = [None] * len(pairs)
        for members in crops.values():
            sources = torch.stack([m[1] for m in members])
            outputs = torch.stack([m[2] for m in members])
            noise = noise_sigma(torch.cat([sources[:, 0], outputs[:, 0]])) * 255.0
            structure = residual_structure(sources, outputs)
            for j, (index, _, _) in enumerate(members):
                audit[index] = torch.stack([noise[j], noise[len(members) + j], structure[j]])
        return torch.stack([torch.cat([d, a]) for d, a in zip(diffs, audit)]).float()

    def __call__(self, batch):
        if isinstance(batch, dict):  # a user's pipeline: numpy batches with an "image" column
            arrays = [np.asarray(a) for a in batch["image"]]
            arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
            restored, _ = self.restore_arrays(arrays)
            batch["image"] = np.array([r[..., 0] if r.shape[-1] == 1 and a.ndim == 2 else r
                                       for r, a in zip(restored, batch["image"])] + [None],
                                      dtype=object)[:-1]
            return batch
        rows = to_rows(batch)
        ready = [r for r in rows if r["status"] == "decoded"]
        started = time.perf_counter()
        try:
            self._restore_rows(ready)
        except Exception as e:  # noqa: BLE001 - find the image at fault, one by one
            self._survive(e)
            for row in ready:
                try:
                    self._restore_rows([row])
                except Exception as e:  # noqa: BLE001 - OOM: transient; others: quarantine
                    self._survive(e)
                    fail(row, "restore", e)
                    row["pixels"] = row["alpha"] = b""
        seconds = (time.perf_counter() - started) / max(1, len(ready))
        for row in ready:
            row["model_seconds"] = seconds
        return to_table(rows, RESTORED_SCHEMA)

    def _survive(self, error: Exception) -> None:
        """After a failed batch: free cached device memory (an out-of-memory error), or end
        this process on a CUDA error that leaves the device context unusable, so that Ray
        restarts the actor (Ray Data's actor pools restart actors and retry their batches)
        instead of it failing every later batch."""
        if self.device.type != "cuda":
            return
        if is_device_fatal(error):
            log.error("RestoreActor: device error %s: %s; restarting this actor",
                      type(error).__name__, error)
            os._exit(1)
        import torch

        torch.cuda.empty_cache()

    def _restore_rows(self, rows: list[dict[str, Any]]) -> None:
        from restorer.image.tiling import plan_tiles

        if not rows:
            return
        arrays = [pixels_of(r) for r in rows]
        restored, stats = self.restore_arrays(arrays)
        for row, array, stat in zip(rows, restored, stats):
            row.update(stat, pixels=array, out_height=array.shape[0],
                       out_width=array.shape[1], status="restored",
                       tiles=plan_tiles(row["height"], row["width"], self.tile, self.overlap,
                                        self.alignment).count)
