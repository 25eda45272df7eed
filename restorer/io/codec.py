"""Bytes <-> pixel arrays: decoding, mode handling and encoding of restored images.

At this boundary images are ``uint8`` or ``uint16`` HWC arrays with 1 (gray) or 3 (RGB) planes;
alpha travels beside them as an HW array of the same dtype and is never given to a net.

Decoding rules (each decision is applied to every image the same way):

- EXIF orientation is applied to the pixels (16-bit ones included) and the Orientation tag is
  reset to 1; EXIF and ICC are kept and written back where the output format can hold them
  (16-bit PNG included; 16-bit colour TIFF keeps ICC only).
- Gray (``1``, ``L``, ``I;16``) stays gray, RGB stays RGB; ``LA``/``RGBA``/palette transparency
  keep their alpha. YCbCr and LAB become RGB. CMYK becomes RGB through its embedded ICC profile
  (relative colorimetric with black-point compensation, output tagged sRGB) or, without one,
  naively (no profile written); the record's note says which.
- 16-bit PNG and TIFF give ``uint16`` pixels (Pillow truncates 16-bit colour, so those are read
  with pypng / tifffile + imagecodecs); 16-bit in gives 16-bit out for PNG and TIFF. A 16-bit
  TIFF tifffile cannot decode is an error, never read by Pillow at 8 bits; 16-bit CMYK with a
  profile is converted at 8 bits (Pillow's colour management), and the note says so.
- Animated images (GIF, APNG, WebP): the first frame is restored and the record says so;
  multi-page TIFFs: page 1, and the note names the pages dropped (reduced-resolution subfiles,
  i.e. pyramid levels and thumbnails, are not pages).
- Images above ``max_pixels`` are refused before their pixels are decoded (decompression bombs);
  a TIFF is measured from its header, whatever its layout (planar, tiled), and its samples
  count too (at most 4 per allowed pixel).

Size: every decoding and encoding rule for the formats we accept (modes, bit depths,
orientation, ICC/EXIF, limits) is one concern, kept in one place so the rules can be read
against each other.
"""

from __future__ import annotations

import functools
import io
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from restorer.errors import ImageError
from restorer.image.pixels import to_8bit as to_uint8  # uint16 -> uint8 (restorer.image.pixels)

ORIENTATION_TAG = 0x0112

# The only Pillow plugins an input is ever opened with (``Image.open(formats=...)``): the
# formats we restore. Without the list Pillow sniffs the content and hands it to whichever of
# its plugins claims it: an EPS named photo.jpg goes to Ghostscript (an external program), and
# PSD, FITS, ICNS, DDS... parsers are reachable the same way.
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "GIF", "BMP")  # JPEG opens MPO too

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
    jpeg: JpegSettings | None = None  # a JPEG source's quality and chroma subsampling


@dataclass(frozen=True)
class JpegSettings:
    """How a JPEG was encoded, as far as its header tells: the IJG quality whose quantisation
    tables are nearest to its own (:func:`estimate_quality`) and its chroma subsampling."""

    quality: int  # 1..100
    subsampling: str  # "4:4:4", "4:2:2", "4:2:0" or "" (gray, or a layout Pillow cannot name)


SUBSAMPLINGS = ("4:4:4", "4:2:2", "4:2:0")  # Pillow's subsampling codes 0, 1, 2
DEFAULT_QUALITY = 95  # JPEG/WebP quality when neither the job nor a JPEG source gives one
# Written at its JPEG source's own quality, a restored image lands 35-41 dB from the restored
# pixels; MATCH_STEP qualities more, up to MATCH_CEILING, keep 40 dB or more for q75+ sources
# at 1.1-1.45x their bytes (README, "JPEG outputs": measured on photos at q50-q85, 4:2:0).
MATCH_CEILING = 90
MATCH_STEP = 15


def matched_quality(source_quality: int) -> int:
    """The quality a restored image is written at when its JPEG source had ``source_quality``
    and the job asks for none (``output.jpeg_quality = 0``): never below the source's, and
    ``MATCH_STEP`` above it up to ``MATCH_CEILING``."""
    if source_quality >= MATCH_CEILING:
        return source_quality
    return min(MATCH_CEILING, source_quality + MATCH_STEP)


@dataclass(frozen=True)
class EncodeOptions:
    format: str = "same"  # one of FORMATS
    # JPEG/WebP quality 1..100; 0 = from the source: a JPEG source's quality, raised by
    # matched_quality (DEFAULT_QUALITY for other sources, and for WebP)
    jpeg_quality: int = 0
    # JPEG chroma subsampling: "same" = the JPEG source's (4:4:4 for other sources), or one of
    # SUBSAMPLINGS
    jpeg_subsampling: str = "same"
    png_compress_level: int = 3  # 0-9; 3 is ~as small as 6 on photos and much faster

    def jpeg_settings(self, source: JpegSettings | None) -> JpegSettings:
        """The quality and subsampling a JPEG output is written with, for a source."""
        quality = self.jpeg_quality or (matched_quality(source.quality) if source
                                        else DEFAULT_QUALITY)
        subsampling = self.jpeg_subsampling
        if subsampling == "same":
            subsampling = source.subsampling if source and source.subsampling else "4:4:4"
        return JpegSettings(quality, subsampling)


@functools.cache
def _ijg_tables() -> np.ndarray:
    """The quantisation tables libjpeg writes at qualities 1..100, as one ``(100, 2, 64)``
    int32 array (made through Pillow once, so that the coefficient order is the one
    ``Image.quantization`` reports)."""
    gray = Image.new("RGB", (8, 8))
    tables = []
    for quality in range(1, 101):
        out = io.BytesIO()
        gray.save(out, "JPEG", quality=quality)
        written = Image.open(out).quantization
        tables.append([written[0], written[1]])
    return np.array(tables, dtype=np.int32)


def estimate_quality(quantization: dict[int, Any]) -> int:
    """The IJG quality (1..100) whose tables are nearest (least absolute difference) to a
    JPEG's ``quantization`` (Pillow's ``Image.quantization``); chroma counts when present.
    Ties go to the lower quality.

    Exact for files written by libjpeg and the many tools built on it (Pillow, ImageMagick,
    browsers' canvas, most web services); for cameras' own tables it is the IJG quality of
    equal precision, which is what matters for the bytes an output will take.
    """
    tables = [np.asarray(quantization[k], dtype=np.int32) for k in sorted(quantization)][:2]
    if not tables or any(t.size != 64 for t in tables):
        return DEFAULT_QUALITY
    # every quality at once: it ran once per decoded JPEG (a loop over 100 qualities was 40%
    # of the read stage's CPU on small photos)
    references = _ijg_tables()[:, :len(tables)]
    errors = np.abs(references - np.stack(tables)[None]).sum(axis=(1, 2))
    return int(np.argmin(errors)) + 1


def _jpeg_settings(image: Image.Image) -> JpegSettings | None:
    if image.format not in ("JPEG", "MPO") or not getattr(image, "quantization", None):
        return None
    from PIL import JpegImagePlugin

    code = JpegImagePlugin.get_sampling(image)
    return JpegSettings(estimate_quality(image.quantization),
                        SUBSAMPLINGS[code] if 0 <= code < len(SUBSAMPLINGS) else "")


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


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF/TIFF Orientation value (1-8) to an HW or HWC array, as
    ``PIL.ImageOps.exif_transpose`` does to an image (6: turn 90 degrees clockwise)."""
    if orientation == 2:
        array = array[:, ::-1]
    elif orientation == 3:
        array = array[::-1, ::-1]
    elif orientation == 4:
        array = array[::-1]
    elif orientation == 5:
        array = array.swapaxes(0, 1)
    elif orientation == 6:
        array = np.rot90(array, -1)
    elif orientation == 7:
        array = array[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        array = np.rot90(array, 1)
    return np.ascontiguousarray(array)


def _too_large(name: str, width: int, height: int, max_pixels: int) -> ImageError:
    return ImageError(
        f"{name} is {width}x{height} = {width * height} pixels, above the limit "
        f"max_pixels = {max_pixels} (decompression-bomb guard); raise "
        "limits.max_pixels in the job spec if the image is genuine")


def _pages_note(pages: int) -> str:
    if pages <= 1:
        return ""
    dropped = "page 2" if pages == 2 else f"pages 2-{pages}"
    return f"multi-page TIFF: restored page 1 of {pages}; {dropped} dropped"


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _read_tiff(data: bytes, max_pixels: int, name: str,
               pillow_error: Exception | None = None) -> tuple[Decoded | None, str | None]:
    """Inspect a TIFF's header with tifffile and decode 16-bit ones (Pillow truncates 16-bit
    colour to 8 bits), and 8-bit ones when ``pillow_error`` says Pillow could not (JPEG 2000,
    WebP... compressions). Returns ``(decoded, None)`` when tifffile decoded it, ``(None, note)``
    for one Pillow should decode (note: the pages dropped), ``(None, None)`` when tifffile cannot
    parse the header (Pillow tries and reports). Raises ``ImageError`` for bombs and for 16-bit
    TIFFs tifffile cannot decode: those are never handed to Pillow's 8-bit reading.
    """
    import tifffile

    try:
        tiff = tifffile.TiffFile(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can parse; Pillow tries and reports
        return None, None
    with tiff:
        try:
            page = tiff.pages[0]
            # reduced-resolution subfiles (pyramid levels, thumbnails) are not pages
            pages = sum(1 for p in tiff.pages if not int(p.subfiletype) & 1)
        except Exception:  # noqa: BLE001 - a broken IFD chain; Pillow tries and reports
            return None, None
        height, width, depth = page.imagelength, page.imagewidth, page.imagedepth
        samples, bits = page.samplesperpixel, page.bitspersample
        # the true size, whatever the layout (planar, tiled, volume), before any pixel is read
        if width * height > max_pixels:
            raise _too_large(name, width, height, max_pixels)
        if width * height * samples * depth > 4 * max_pixels:
            raise ImageError(f"{name} holds {width}x{height}x{samples} samples x depth {depth} "
                             f"= {width * height * samples * depth} values, above 4 x max_pixels "
                             f"= {4 * max_pixels}; raise limits.max_pixels if it is genuine")
        if depth > 1:
            raise ImageError(f"{name} is a 3-D TIFF (depth {depth}); restorer restores 2-D "
                             "images: save its slices as separate files")
        note = _pages_note(pages)
        unsigned = page.sampleformat == 1
        if pillow_error is None and (bits <= 8 or not unsigned):
            return None, note  # Pillow decodes these (8-bit, 32-bit int, float) and says so
        if bits not in (8, 16) or not unsigned:
            if pillow_error is not None:
                raise ImageError(f"{name} is corrupt or truncated: {pillow_error}") from \
                    pillow_error
            raise ImageError(f"{name} is a {bits}-bit TIFF; restorer reads 8- and 16-bit "
                             "TIFFs: convert it to 16 bits")
        try:
            array = page.asarray()
        except Exception as e:  # never fall back to Pillow's 8-bit reading
            if pillow_error is not None:
                raise ImageError(f"{name} is corrupt or truncated, or compressed as neither "
                                 f"Pillow nor tifffile can decode (Pillow: {pillow_error}; "
                                 f"tifffile: {type(e).__name__}: {e})") from e
            raise ImageError(
                f"{name} is a 16-bit {page.compression.name} TIFF that tifffile cannot decode "
                f"({type(e).__name__}: {e}): corrupt, truncated, or compressed with a codec "
                "missing here (is imagecodecs installed?); it is refused rather than read at 8 "
                "bits") from e
        photometric, photometric_name = int(page.photometric), page.photometric.name
        extra = tuple(int(x) for x in page.extrasamples)
        icc = page.tags.valueof("InterColorProfile")
        orientation = page.tags.valueof("Orientation", 1)
        planar = page.planarconfig == 2
    return _tiff_decoded(array, planar, photometric, photometric_name, extra, bits, icc,
                         orientation, note, name), None


def _tiff_decoded(array: np.ndarray, planar: bool, photometric: int, photometric_name: str,
                  extra: tuple[int, ...], bits: int, icc: bytes | None, orientation: int,
                  note: str, name: str) -> Decoded:
    """A TIFF page's samples as tifffile read them (:func:`_read_tiff`), as restorer's pixels:
    planes last, alpha split off (un-premultiplied when associated, further extra samples
    dropped), min-is-white inverted, CMYK to RGB, the orientation applied."""
    if array.ndim == 3 and planar:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    colours = {0: 1, 1: 1, 2: 3, 5: 4}.get(photometric)  # miniswhite, minisblack, rgb, cmyk
    if colours is None or array.shape[-1] < colours:
        raise ImageError(f"{name} is a {bits}-bit TIFF with photometric interpretation "
                         f"{photometric_name} ({array.shape[-1]} samples) that Pillow cannot "
                         "read; restorer reads it for gray, RGB and CMYK: convert it to RGB")
    peak = np.iinfo(array.dtype).max
    pixels, extras = array[..., :colours], array[..., colours:]
    alpha = extras[..., 0] if extras.shape[-1] else None
    notes = [note]
    if extras.shape[-1] > 1:
        notes.append(f"{extras.shape[-1] - 1} extra sample(s) after alpha dropped")
    if alpha is not None and extra[:1] == (1,):  # associated (premultiplied) alpha
        scale = np.where(alpha > 0, peak / np.maximum(alpha, 1.0), 0.0)[..., None]
        pixels = np.clip(np.round(pixels * scale), 0, peak).astype(array.dtype)
    if photometric == 0:
        pixels = peak - pixels
    mode = f"{pixels.shape[-1]}x{bits}-bit"
    if photometric == 5 and bits == 8:
        rgb, icc, cmyk_note = _cmyk_to_rgb(Image.fromarray(np.ascontiguousarray(pixels),
                                                           "CMYK"), icc)
        pixels = np.asarray(rgb)
        notes.append(cmyk_note)
    elif photometric == 5:
        pixels, icc, cmyk_note = _cmyk16_to_rgb(pixels, icc)
        notes.append(cmyk_note)
    pixels = orient(pixels, orientation)
    alpha = None if alpha is None else orient(alpha, orientation)
    return Decoded(pixels, alpha, "TIFF", mode, icc, None, _join(*notes))


def _cmyk_to_rgb(image: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None, str]:
    """CMYK -> RGB through the embedded ICC profile when there is one (output tagged sRGB),
    else Pillow's naive conversion (no profile written); the note says which."""
    rgb, srgb, reason = _through_profile(image, icc)
    if rgb is not None:
        return rgb, srgb, "CMYK converted to RGB through its ICC profile; output tagged sRGB"
    return image.convert("RGB"), None, _naive_note(reason)


def _cmyk16_to_rgb(cmyk: np.ndarray, icc: bytes | None) -> tuple[np.ndarray, bytes | None, str]:
    rgb, srgb, reason = _through_profile(Image.fromarray(to_uint8(cmyk), "CMYK"), icc)
    if rgb is not None:  # Pillow's colour management works on 8-bit CMYK only
        note = "16-bit CMYK converted to RGB through its ICC profile, at 8 bits; output tagged sRGB"
        return np.asarray(rgb), srgb, note
    white = 65535.0 - cmyk.astype(np.float64)
    rgb16 = np.round(white[..., :3] * white[..., 3:] / 65535.0).astype(np.uint16)
    return rgb16, None, "16-bit " + _naive_note(reason)


def _through_profile(image: Image.Image, icc: bytes | None
                     ) -> tuple[Image.Image | None, bytes | None, str]:
    """(sRGB image, sRGB profile bytes, "") or (None, None, why the profile was not used)."""
    if not icc:
        return None, None, "no ICC profile"
    from PIL import ImageCms

    try:
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        rgb = ImageCms.profileToProfile(
            image, ImageCms.ImageCmsProfile(io.BytesIO(icc)), srgb, outputMode="RGB",
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION)  # what Photoshop does by default
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        return None, None, f"its ICC profile is unusable: {e}"
    return rgb, srgb.tobytes(), ""


def _naive_note(reason: str) -> str:
    return f"CMYK converted to RGB naively ({reason}; colours approximate, no profile written)"


def _unreadable(name: str, error: Exception) -> ImageError:
    if isinstance(error, UnidentifiedImageError):
        return ImageError(f"{name} is not an image in a format we restore (JPEG, PNG, WebP, "
                          "TIFF, GIF, BMP): unknown format, another format (EPS, PSD, ...; "
                          "never handed to its decoder) or random bytes")
    return ImageError(f"{name} is corrupt or truncated: {error}")


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
    tiff_note = None
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        sixteen, tiff_note = _read_tiff(data, max_pixels, name)
        if sixteen is not None:
            return sixteen
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise _too_large(name, width, height, max_pixels)
        frames = getattr(image, "n_frames", 1)
        if image.format == "TIFF":
            bits = image.tag_v2.get(258, 8)
            bits = max(bits) if isinstance(bits, tuple) else int(bits)
            if bits > 8 and image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                raise ImageError(f"{name} is a {bits}-bit TIFF that only Pillow can open, "
                                 f"as 8-bit {image.mode}; it is refused rather than truncated: "
                                 "re-save it uncompressed")
            note = tiff_note if tiff_note is not None else _pages_note(frames)
        elif frames > 1:
            note = f"animated {image.format} with {frames} frames: frame 0 restored, others dropped"
        else:
            note = ""
        image.load()
        source_format, source_mode = image.format or "PNG", image.mode
        jpeg = _jpeg_settings(image)
        icc = image.info.get("icc_profile")
        exif = image.getexif()
        orientation = exif.get(ORIENTATION_TAG, 1)
        oriented = ImageOps.exif_transpose(image)
        if ORIENTATION_TAG in exif:
            exif[ORIENTATION_TAG] = 1
        exif_bytes = exif.tobytes() if len(exif) else None
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if tiff_note is None:  # not a TIFF, or one tifffile cannot parse either
            raise _unreadable(name, e) from e
        # a TIFF tifffile parsed but Pillow cannot decode (JPEG 2000, WebP... compressions)
        return _read_tiff(data, max_pixels, name, pillow_error=e)[0]


    if source_format == "PNG" and _png_bit_depth(data) == 16 and source_mode not in ("I;16", "I"):
        pixels, alpha = _read_png16(data)
        pixels = orient(pixels, orientation)
        alpha = None if alpha is None else orient(alpha, orientation)
        return Decoded(pixels, alpha, source_format, source_mode, icc, exif_bytes, note)
    return _from_pillow(oriented, name, source_format, source_mode, icc, exif_bytes, note, jpeg)


def _from_pillow(image: Image.Image, name: str, source_format: str, source_mode: str,
                 icc: bytes | None, exif_bytes: bytes | None, note: str,
                 jpeg: JpegSettings | None) -> Decoded:
    """:func:`decode`'s result from the loaded, oriented Pillow image: palettes, bilevel, CMYK
    (through its profile), YCbCr/LAB/HSV and premultiplied modes converted; 16- and 32-bit
    integer planes as uint16; float images refused."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "CMYK":
        image, icc, cmyk_note = _cmyk_to_rgb(image, icc)
        note = _join(note, cmyk_note)
    elif mode in ("YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
        note = _join(note, f"{mode} converted to RGB")
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
                   np.ascontiguousarray(alpha), source_format, source_mode, icc, exif_bytes, note,
                   jpeg)


def _write_png16(pixels: np.ndarray, alpha: np.ndarray | None, level: int,
                 icc: bytes | None, exif: bytes | None) -> bytes:
    import png

    array = pixels if alpha is None else np.concatenate([pixels, alpha[..., None]], axis=-1)
    height, width, planes = array.shape
    writer = png.Writer(width, height, greyscale=planes in (1, 2), alpha=alpha is not None,
                        bitdepth=16, compression=level)
    out = io.BytesIO()
    writer.write(out, array.reshape(height, width * planes))
    chunks = list(png.Reader(bytes=out.getvalue()).chunks())
    extra = []  # pypng writes neither ICC nor EXIF: add them as Pillow does, after IHDR
    if icc:
        extra.append((b"iCCP", b"ICC profile\0\0" + zlib.compress(icc)))
    if exif:
        extra.append((b"eXIf", exif[6:] if exif.startswith(b"Exif\0\0") else exif))
    out = io.BytesIO()
    png.write_chunks(out, chunks[:1] + extra + chunks[1:])
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
           options: EncodeOptions = EncodeOptions(),
           source_jpeg: JpegSettings | None = None) -> bytes:
    """Encode HWC ``pixels`` (+ HW ``alpha``) as ``fmt`` ("png", "jpeg", "webp", "tiff").

    16-bit pixels stay 16-bit in PNG and TIFF; JPEG and WebP store 8 bits. JPEG cannot store
    alpha, so an image with alpha asked for as JPEG is an ``ImageError`` (choose png or webp).
    A JPEG is written with :meth:`EncodeOptions.jpeg_settings` for ``source_jpeg`` (the
    source's settings when it was a JPEG: by default its subsampling and a matched quality).
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
            return _write_png16(pixels, alpha, options.png_compress_level, icc, exif)
        else:
            _pil_image(pixels, alpha).save(out, "PNG", compress_level=options.png_compress_level,
                                           **extra)
    elif fmt == "jpeg":
        if alpha is not None:
            raise ImageError("JPEG cannot store the image's alpha channel; use --format png, "
                             "webp or tiff (or same)")
        settings = options.jpeg_settings(source_jpeg)
        _pil_image(pixels, None).save(out, "JPEG", quality=settings.quality,
                                      subsampling=settings.subsampling, **extra)
    elif fmt == "webp":
        _pil_image(pixels, alpha).save(out, "WEBP", quality=options.jpeg_quality or
                                       DEFAULT_QUALITY, method=4,
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
