import io

import numpy as np
import pytest
from PIL import Image

from restorer import codec
from restorer.errors import ImageError


def _png(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("alpha", [False, True])
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_lossless_round_trip_keeps_mode_depth_and_alpha(bits, channels, alpha, fmt, rng):
    dtype = np.uint16 if bits == 16 else np.uint8
    peak = 65535 if bits == 16 else 255
    pixels = rng.integers(0, peak, (7, 9, channels)).astype(dtype)
    plane = rng.integers(0, peak, (7, 9)).astype(dtype) if alpha else None
    decoded = codec.decode(codec.encode(pixels, plane, fmt))
    assert decoded.pixels.dtype == dtype
    np.testing.assert_array_equal(decoded.pixels, pixels)
    if alpha:
        np.testing.assert_array_equal(decoded.alpha, plane)
    else:
        assert decoded.alpha is None


def test_jpeg_is_444_quality_95_and_refuses_alpha(rng):
    pixels = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
    data = codec.encode(pixels, None, "jpeg")
    image = Image.open(io.BytesIO(data))
    assert image.layer[0][1:3] == image.layer[1][1:3] == (1, 1)  # no chroma subsampling
    with pytest.raises(ImageError, match="alpha"):
        codec.encode(pixels, pixels[..., 0], "jpeg")


def test_exif_orientation_applied_and_reset_icc_kept():
    image = Image.fromarray(np.arange(6 * 4, dtype=np.uint8).reshape(4, 6))  # 6 wide, 4 high
    exif = Image.Exif()
    exif[codec.ORIENTATION_TAG] = 6  # rotate 90 degrees clockwise to display
    exif[0x010F] = "TestMaker"
    out = io.BytesIO()
    icc = b"\x00" * 128
    image.convert("RGB").save(out, "JPEG", exif=exif.tobytes(), icc_profile=icc, quality=100)
    decoded = codec.decode(out.getvalue())
    assert decoded.pixels.shape[:2] == (6, 4)
    assert decoded.icc == icc
    written = Image.open(io.BytesIO(codec.encode(decoded.pixels, None, "jpeg", decoded.icc,
                                                 decoded.exif)))
    assert written.getexif()[codec.ORIENTATION_TAG] == 1
    assert written.getexif()[0x010F] == "TestMaker"
    assert written.info["icc_profile"] == icc


def test_odd_modes_are_converted():
    cmyk = io.BytesIO()
    Image.new("CMYK", (5, 4), (10, 20, 30, 0)).save(cmyk, "JPEG")
    decoded = codec.decode(cmyk.getvalue())
    assert decoded.pixels.shape == (4, 5, 3) and "CMYK converted" in decoded.note

    palette = Image.new("P", (5, 4))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    decoded = codec.decode(_png(palette, transparency=0))
    assert decoded.pixels.shape == (4, 5, 3) and decoded.alpha is not None

    gray_alpha = Image.new("LA", (5, 4), (100, 50))
    decoded = codec.decode(_png(gray_alpha))
    assert decoded.pixels.shape == (4, 5, 1) and decoded.alpha[0, 0] == 50


def test_animated_gif_restores_first_frame_and_says_so():
    frames = [Image.new("L", (8, 8), v) for v in (10, 200, 90)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    decoded = codec.decode(out.getvalue())
    assert "3 frames" in decoded.note and "frame 0" in decoded.note


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "corrupt|not an image"),
    (np.random.default_rng(0).bytes(500), "not an image"),
    (b"hello, I am a text file\n", "not an image"),
])
def test_bad_bytes_are_image_errors(data, match):
    with pytest.raises(ImageError, match=match):
        codec.decode(data, name="x")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_image_errors(fmt, rng):
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(out, fmt)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        codec.decode(out.getvalue()[: len(out.getvalue()) // 2], name="x")


def test_decompression_bomb_refused_before_decoding():
    data = _png(Image.new("L", (4000, 3000)))
    with pytest.raises(ImageError, match="max_pixels"):
        codec.decode(data, max_pixels=1_000_000)
    assert codec.decode(data, max_pixels=20_000_000).pixels.shape == (3000, 4000, 1)


def test_output_format_rules():
    assert codec.output_format("GIF", "same") == "png"
    assert codec.output_format("BMP", "same") == "png"
    assert codec.output_format("JPEG", "same") == "jpeg"
    assert codec.output_format("PNG", "webp") == "webp"
    with pytest.raises(ValueError, match="Unknown output format"):
        codec.output_format("PNG", "gif")
