"""Bytes <-> pixel arrays: decoding, mode handling and encoding of restored images.

At this boundary images are ``uint8`` or ``uint16`` HWC arrays with 1 (gray) or 3 (RGB) planes;
alpha travels beside them as an HW array of the same dtype and is never given to a net.

Decoding rules (each decision is applied to every image the same way):

- EXIF orientation is applied to the pixels and the Orientation tag is reset to 1; EXIF and ICC
  are kept and written back where the output format can hold them.
- Gray (``1``, ``L``, ``I;16``) stays gray, RGB stays RGB; ``LA``/``RGBA``/palette transparency
  keep their alpha. CMYK, YCbCr and LAB become RGB (an embedded CMYK ICC profile is dropped,
  since it no longer describes the pixels).
- 16-bit PNG and TIFF give ``uint16`` pixels (Pillow truncates 16-bit colour, so those are read
  with pypng / tifffile); 16-bit in gives 16-bit out for PNG and TIFF.
- Animated images (GIF, APNG, WebP): the first frame is restored and the record says so.
- Images above ``max_pixels`` are refused before their pixels are decoded (decompression bombs).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from restorer.errors import ImageError

ORIENTATION_TAG = 0x0112

# Output format per input format when the requested format is "same".
SAME_FORMAT = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "TIFF": "tiff",
               "GIF": "png", "BMP": "png"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "tiff": ".tif"}
FORMATS = ("same", *EXTENSIONS)


@dataclass
class Decoded:
    pixels: np.ndarray  # HWC, uint8 or uint16, C = 1 or 3
    alpha: np.ndarray | None  # HW, same dtype as pixels, or None
    format: str  # Pillow's name of the source format, e.g. "JPEG"
    mode: str  # the source mode as Pillow reported it, e.g. "RGBA", "I;16", "CMYK"
    icc: bytes | None = None
    exif: bytes | None = None
    note: str = ""  # what was done that a user should know (frames dropped, mode converted)


@dataclass(frozen=True)
class EncodeOptions:
    format: str = "same"  # one of FORMATS
    jpeg_quality: int = 95  # JPEG/WebP quality; JPEG is written 4:4:4 so no artifacts are re-added
    png_compress_level: int = 3  # 0-9; 3 is ~as small as 6 on photos and much faster


def output_format(source_format: str, requested: str) -> str:
    """The output format name ("png", "jpeg", "webp", "tiff") for a source and a request."""
    if requested != "same":
        if requested not in EXTENSIONS:
            raise ValueError(f"Unknown output format {requested!r}; use one of {FORMATS}")
        return requested
    return SAME_FORMAT.get(source_format, "png")


def format_from_name(name: str) -> str:
    """Pillow's format name guessed from a file name's extension (for output naming)."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF",
            "tiff": "TIFF", "gif": "GIF", "bmp": "BMP"}.get(ext, "PNG")


def _png_bit_depth(data: bytes) -> int:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return data[24]
    return 0


def _read_png16(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    import png

    width, height, rows, info = png.Reader(bytes=data).asDirect()
    planes = info["planes"]
    array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
    array = array.reshape(height, width, planes)
    if info["alpha"]:
        return array[..., :-1], array[..., -1]
    return array, None


def _read_tiff16(data: bytes, max_pixels: int, name: str) -> Decoded | None:
    """16-bit TIFFs through tifffile (Pillow reads only 16-bit gray); None for other TIFFs."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages[0]
            if page.dtype != np.uint16:
                return None
            if int(np.prod(page.shape[:2])) > max_pixels:
                raise ImageError(f"{name} is {page.shape[1]}x{page.shape[0]} pixels, above the "
                                 f"limit max_pixels = {max_pixels}; raise limits.max_pixels")
            array = page.asarray()
            icc = page.tags["InterColorProfile"].value if "InterColorProfile" in page.tags else None
    except ImageError:
        raise
    except Exception:  # noqa: BLE001 - let Pillow try, and report, what tifffile cannot read
        return None
    if array.ndim == 3 and array.shape[0] in (2, 3, 4) and array.shape[-1] not in (2, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar configuration
    pixels, alpha = _split_alpha(array)
    return Decoded(pixels, alpha, "TIFF", f"{pixels.shape[-1]}x16-bit", icc, None, "")


def _split_alpha(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if array.ndim == 2:
        return array[..., None], None
    if array.shape[-1] in (2, 4):
        return array[..., :-1], array[..., -1]
    return array, None


def decode(data: bytes, max_pixels: int = 100_000_000, name: str = "image") -> Decoded:
    """Decode an encoded image into :class:`Decoded`; raises ``ImageError`` on any bad input."""
    if not data:
        raise ImageError(f"{name} is an empty file (0 bytes)")
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        sixteen = _read_tiff16(data, max_pixels, name)
        if sixteen is not None:
            return sixteen
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"{name} is {width}x{height} = {width * height} pixels, above the limit "
                f"max_pixels = {max_pixels} (decompression-bomb guard); raise "
                "limits.max_pixels in the job spec if the image is genuine")
        note = ""
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            note = f"animated {image.format} with {frames} frames: frame 0 restored, others dropped"
        image.load()
        source_format, source_mode = image.format or "PNG", image.mode
        icc = image.info.get("icc_profile")
        exif = image.getexif()
        oriented = ImageOps.exif_transpose(image)
        if ORIENTATION_TAG in exif:
            exif[ORIENTATION_TAG] = 1
        exif_bytes = exif.tobytes() if len(exif) else None
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name} is not an image Pillow can read (unknown format or random "
                         "bytes)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name} is corrupt or truncated: {e}") from e

    if source_format == "PNG" and _png_bit_depth(data) == 16 and source_mode not in ("I;16", "I"):
        pixels, alpha = _read_png16(data)
        if ORIENTATION_TAG in image.getexif() and image.getexif()[ORIENTATION_TAG] != 1:
            note = (note + "; " if note else "") + "EXIF orientation not applied to 16-bit colour"
        return Decoded(pixels, alpha, source_format, source_mode, icc, exif_bytes, note)
    image = oriented
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
        if mode == "CMYK":
            icc = None
        note = (note + "; " if note else "") + f"{mode} converted to RGB"
    elif mode == "La":
        image = image.convert("LA")
    elif mode == "RGBa":
        image = image.convert("RGBA")
    elif mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image)
        if mode == "I" and (array.min() < 0 or array.max() > 65535):
            raise ImageError(f"{name} is a 32-bit integer image outside 0..65535; convert it to "
                             "16-bit")
        return Decoded(array.astype(np.uint16)[..., None], None, source_format, source_mode, icc,
                       exif_bytes, note)
    elif mode == "F":
        raise ImageError(f"{name} is a 32-bit float image; convert it to 8- or 16-bit first")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ImageError(f"{name} has unsupported mode {mode}")
    pixels, alpha = _split_alpha(array)
    return Decoded(np.ascontiguousarray(pixels), None if alpha is None else
                   np.ascontiguousarray(alpha), source_format, source_mode, icc, exif_bytes, note)


def to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    return np.round(array.astype(np.float32) / 257.0).astype(np.uint8)


def _write_png16(pixels: np.ndarray, alpha: np.ndarray | None, level: int) -> bytes:
    import png

    array = pixels if alpha is None else np.concatenate([pixels, alpha[..., None]], axis=-1)
    height, width, planes = array.shape
    writer = png.Writer(width, height, greyscale=planes in (1, 2), alpha=alpha is not None,
                        bitdepth=16, compression=level)
    out = io.BytesIO()
    writer.write(out, array.reshape(height, width * planes))
    return out.getvalue()


def _pil_image(pixels: np.ndarray, alpha: np.ndarray | None) -> Image.Image:
    pixels = to_uint8(pixels)
    if pixels.shape[-1] == 1:
        image = Image.fromarray(pixels[..., 0])
        mode = "LA"
    else:
        image = Image.fromarray(pixels)
        mode = "RGBA"
    if alpha is not None:
        image = image.convert(mode)
        image.putalpha(Image.fromarray(to_uint8(alpha)))
    return image


def encode(pixels: np.ndarray, alpha: np.ndarray | None, fmt: str,
           icc: bytes | None = None, exif: bytes | None = None,
           options: EncodeOptions = EncodeOptions()) -> bytes:
    """Encode HWC ``pixels`` (+ HW ``alpha``) as ``fmt`` ("png", "jpeg", "webp", "tiff").

    16-bit pixels stay 16-bit in PNG and TIFF; JPEG and WebP store 8 bits. JPEG cannot store
    alpha, so an image with alpha asked for as JPEG is an ``ImageError`` (choose png or webp).
    """
    out = io.BytesIO()
    extra = {}
    if icc:
        extra["icc_profile"] = icc
    if exif:
        extra["exif"] = exif
    sixteen = pixels.dtype == np.uint16
    if fmt == "png":
        if sixteen and pixels.shape[-1] == 1 and alpha is None:
            Image.fromarray(pixels[..., 0]).save(
                out, "PNG", compress_level=options.png_compress_level, **extra)
        elif sixteen:
            return _write_png16(pixels, alpha, options.png_compress_level)
        else:
            _pil_image(pixels, alpha).save(out, "PNG", compress_level=options.png_compress_level,
                                           **extra)
    elif fmt == "jpeg":
        if alpha is not None:
            raise ImageError("JPEG cannot store the image's alpha channel; use --format png, "
                             "webp or tiff (or same)")
        _pil_image(pixels, None).save(out, "JPEG", quality=options.jpeg_quality, subsampling=0,
                                      **extra)
    elif fmt == "webp":
        _pil_image(pixels, alpha).save(out, "WEBP", quality=options.jpeg_quality, method=4,
                                       exact=True, **extra)
    elif fmt == "tiff":
        if sixteen and not (pixels.shape[-1] == 1 and alpha is None):
            import tifffile

            array = pixels if alpha is None else np.concatenate([pixels, alpha[..., None]], -1)
            tifffile.imwrite(out, array, photometric="minisblack" if array.shape[-1] <= 2
                             else "rgb", extrasamples=["unassalpha"] if alpha is not None else None,
                             compression="zlib", iccprofile=icc)
        elif sixteen:
            Image.fromarray(pixels[..., 0]).save(out, "TIFF",
                                                         compression="tiff_adobe_deflate", **extra)
        else:
            _pil_image(pixels, alpha).save(out, "TIFF", compression="tiff_adobe_deflate", **extra)
    else:
        raise ValueError(f"Unknown output format {fmt!r}; use one of {tuple(EXTENSIONS)}")
    return out.getvalue()
