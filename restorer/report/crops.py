"""Pixels for a restore job's report page: before / after / amplified-residual crops.

:func:`crops` reads one image back (its input and its output), places a ``CROP`` px window
where the output changed most (:func:`crop_origin`), and returns the three crops as PNG
``data:`` URIs (shown at 1:1) with the input's and the output's noise levels, and a ``ZOOM``
px window inside it, where the crop changed most, for a before/after slider shown ``ZOOM_FACTOR``
times enlarged (pixels as squares: at 1:1 a denoised photo and its input look alike). The noise
level is the restore actor's own estimate (:func:`restorer.image.audit.input_noise`, the ledger's
``noise_in``): one estimator for the ledger and the page.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from restorer.errors import RestorerError
from restorer.image.audit import input_noise, noise_sigma
from restorer.image.pixels import peak, to_8bit
from restorer.io import codec, storage

CROP = 192  # side of the before/after crops, in input pixels
MAX_CROP_DISPLAY = 384  # crops are shown at most this wide (super-resolution outputs are larger)
MAX_RESIDUAL_GAIN = 16.0  # the residual crop is amplified at most this much
MAX_SEARCH_PIXELS = 25_000_000  # above this the crop is centred instead of placed on the change
ZOOM = 64  # side of the zoomed before/after window, in input pixels (inside the crop)
ZOOM_FACTOR = 4  # ... shown this many times enlarged


def estimate_noise(gray: np.ndarray) -> float:
    """The noise standard deviation of a 2-D image, in the array's units:
    :func:`restorer.image.audit.noise_sigma` (Donoho's robust estimate, the one the restore actor
    records) on ``gray`` (HW, any real dtype). Texture and edges raise it a little; an image
    under 8 pixels on a side gives 0."""
    import torch

    if gray.ndim != 2:
        raise ValueError(f"need a 2-D image, got shape {gray.shape}")
    return float(noise_sigma(torch.from_numpy(np.asarray(gray, dtype=np.float64))))


def crop_origin(source: np.ndarray, restored: np.ndarray | None, scale: int,
                 size: int) -> tuple[int, int]:
    """Top-left (y, x) of the ``size`` window where the restored image changed most.

    ``restored`` at ``scale`` times the input's size is box-averaged back to it first. Large
    images, or shapes that do not match, get the centre instead.
    """
    height, width = source.shape[:2]
    centre = ((height - size) // 2, (width - size) // 2)
    if (restored is None or height * width > MAX_SEARCH_PIXELS
            or restored.shape[:2] != (height * scale, width * scale)
            or restored.shape[2] != source.shape[2]):
        return centre
    out = restored.astype(np.float32)
    if scale > 1:
        out = out.reshape(height, scale, width, scale, -1).mean(axis=(1, 3))
    diff = np.abs(out - source.astype(np.float32)).mean(axis=2)
    integral = np.pad(diff.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    step = max(1, size // 8)
    ys = np.arange(0, height - size + 1, step)
    xs = np.arange(0, width - size + 1, step)
    sums = (integral[ys[:, None] + size, xs[None, :] + size] - integral[ys[:, None], xs[None, :] + size]
            - integral[ys[:, None] + size, xs[None, :]] + integral[ys[:, None], xs[None, :]])
    iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(ys[iy]), int(xs[ix])


def png_data_uri(pixels: np.ndarray) -> str:
    """An HWC image (uint8, or uint16 shown as 8-bit) as a PNG ``data:`` URI."""
    from PIL import Image

    array = to_8bit(pixels)
    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_SHARD_ROW = re.compile(r"[^/]+#\d+")  # a row of an input Parquet shard: "name.parquet#12"


def _output_bytes(output: str, record: dict[str, Any], layout: str,
                  options: storage.StorageOptions) -> bytes:
    if layout != "parquet":
        return storage.read_bytes(storage.join(output, record["out_key"]), options)
    fs, path = storage.filesystem(storage.join(output, f"part-{record['unit']}.parquet"), options)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["key", "bytes"],
                              filters=[("key", "==", record["out_key"])])
    if not table.num_rows:
        raise RestorerError(f"{record['out_key']!r} is not in shard part-{record['unit']}.parquet")
    return table.column("bytes")[0].as_py()


def crops(output: str, record: dict[str, Any], layout: str,
          options: storage.StorageOptions) -> dict[str, Any]:
    """Before/after/amplified-residual crops of one image as data URIs, with the input's
    estimated noise level and the residual's gain (:func:`_residual_crop`).

    Returns ``{"note": why}`` instead when the input or output cannot be read back.
    """
    uri = record.get("uri") or ""
    if _SHARD_ROW.fullmatch(uri):
        return {"note": "input is a row of a Parquet shard; no crop"}
    try:
        source = codec.decode(storage.read_bytes(uri, options), name=uri).pixels
        restored = codec.decode(_output_bytes(output, record, layout, options),
                                name=record["out_key"]).pixels
    except (RestorerError, OSError, KeyError, pa.ArrowException) as e:
        return {"note": f"no crop: {e}"}
    height, width = source.shape[:2]
    ratio = restored.shape[0] / height
    scale = round(ratio) if ratio >= 1 and ratio == round(ratio) else 1
    size = min(CROP, height, width)
    y, x = crop_origin(source, restored, scale, size)
    before = source[y:y + size, x:x + size]
    after = restored[y * scale:(y + size) * scale, x * scale:(x + size) * scale]
    if after.shape[2] != before.shape[2]:
        after = np.repeat(after, 3, axis=2) if after.shape[2] == 1 else after.mean(
            axis=2, keepdims=True).astype(after.dtype)
    display = min(max(size * scale, CROP), MAX_CROP_DISPLAY)  # small crops shown enlarged
    residual, gain = _residual_crop(before, after, scale)
    zoom = min(ZOOM, size)
    zy, zx = crop_origin(before, after, scale, zoom)
    measured = min(height, width) >= 8
    factor = display / size  # how much the input crop is enlarged on the page
    return {"before": png_data_uri(before), "after": png_data_uri(after), "display": display,
            "shown": "1:1" if factor == 1 else f"enlarged x{factor:.3g}",
            "residual": png_data_uri(residual), "gain": gain,
            "where": f"x {x}-{x + size}, y {y}-{y + size} of {width}x{height}"
                     + (f" (output x{scale})" if scale > 1 else ""),
            "zoom_before": png_data_uri(before[zy:zy + zoom, zx:zx + zoom]),
            "zoom_after": png_data_uri(after[zy * scale:(zy + zoom) * scale,
                                             zx * scale:(zx + zoom) * scale]),
            "zoom_display": zoom * ZOOM_FACTOR, "zoom_factor": ZOOM_FACTOR,
            "zoom_where": f"x {x + zx}-{x + zx + zoom}, y {y + zy}-{y + zy + zoom}",
            "noise": input_noise(source) if measured else None,
            # the same estimator on the output (at the input's scale: an SR output is not)
            "noise_out": input_noise(restored) if measured and scale == 1 else None}


def _residual_crop(before: np.ndarray, after: np.ndarray, scale: int) -> tuple[np.ndarray, float]:
    """``before - after`` (the method noise; ``after`` box-averaged back to ``before``'s size
    when it is ``scale`` times larger) as a uint8 image, mid-gray at 0, amplified so that its
    99th-percentile magnitude reaches 100 levels (a gain of 1 to ``MAX_RESIDUAL_GAIN``);
    returns it and the gain. Noise removed shows as even grain; detail removed shows as the
    image's edges, text and texture."""
    out = after.astype(np.float32)
    if scale > 1:
        height, width = before.shape[:2]
        out = out.reshape(height, scale, width, scale, -1).mean(axis=(1, 3))
    residual = (before.astype(np.float32) - out) * (255.0 / peak(before.dtype))
    level = float(np.quantile(np.abs(residual), 0.99)) if residual.size else 0.0
    gain = float(np.clip(100.0 / max(level, 1e-6), 1.0, MAX_RESIDUAL_GAIN))
    return np.clip(128.0 + gain * residual, 0, 255).round().astype(np.uint8), gain
