import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from restorer.errors import ImageError
from restorer.io import codec


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


def _jpeg(pixels: np.ndarray, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("quality", [20, 50, 75, 92, 100])
@pytest.mark.parametrize("subsampling", ["4:4:4", "4:2:2", "4:2:0"])
def test_a_jpeg_sources_quality_and_subsampling_are_read_from_its_header(quality, subsampling,
                                                                          rng):
    pixels = rng.integers(0, 255, (24, 32, 3)).astype(np.uint8)
    decoded = codec.decode(_jpeg(pixels, quality=quality, subsampling=subsampling))
    assert decoded.jpeg == codec.JpegSettings(quality, subsampling)
    gray = codec.decode(_jpeg(pixels[..., 0], quality=quality))
    assert gray.jpeg == codec.JpegSettings(quality, "")
    assert codec.decode(_png(Image.fromarray(pixels))).jpeg is None


def test_a_cameras_own_tables_read_as_the_nearest_ijg_quality(rng):
    """Tables libjpeg never wrote (a camera's) take the quality of least absolute difference,
    luma and chroma together (luma alone for gray), ties to the lower quality."""
    from PIL import Image

    def ijg(quality):
        out = io.BytesIO()
        Image.new("RGB", (8, 8)).save(out, "JPEG", quality=quality)
        tables = Image.open(out).quantization
        return [np.array(tables[0]), np.array(tables[1])]

    references = {q: ijg(q) for q in range(1, 101)}
    for trial in range(20):
        base = references[int(rng.integers(5, 98))]
        tables = [np.clip(t + rng.integers(-3, 4, 64), 1, 255) for t in base]
        for used in (tables, tables[:1]):
            errors = {q: sum(int(np.abs(t - r).sum()) for t, r in zip(used, references[q]))
                      for q in references}
            nearest = min(errors, key=lambda q: (errors[q], q))
            assert codec.estimate_quality(dict(enumerate(used))) == nearest
    assert codec.estimate_quality({0: [1] * 10}) == codec.DEFAULT_QUALITY  # not a table


def test_jpeg_output_matches_its_source_unless_told(rng):
    pixels = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
    source = codec.JpegSettings(75, "4:2:0")

    def written(options: codec.EncodeOptions, src: codec.JpegSettings | None) -> tuple:
        back = codec.decode(codec.encode(pixels, None, "jpeg", options=options,
                                         source_jpeg=src))
        return back.jpeg.quality, back.jpeg.subsampling

    assert written(codec.EncodeOptions(), source) == (codec.matched_quality(75), "4:2:0")
    assert codec.matched_quality(75) == 90 and codec.matched_quality(40) == 55
    assert codec.matched_quality(95) == 95  # never below the source's quality
    assert written(codec.EncodeOptions(jpeg_quality=60), source) == (60, "4:2:0")
    assert written(codec.EncodeOptions(jpeg_subsampling="4:4:4"), source) == (90, "4:4:4")
    assert written(codec.EncodeOptions(), None) == (95, "4:4:4")  # a PNG source, say


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


# --- TIFF layouts, compressions and depths (fixtures written by tifffile + imagecodecs) ---------

tifffile = pytest.importorskip("tifffile")


def _tiff(array: np.ndarray, **kwargs) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array, **kwargs)
    return out.getvalue()


def _set_tiff_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite ImageWidth/ImageLength in the first IFD of a little-endian classic TIFF."""
    data = bytearray(data)
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fails the test if tifffile or Pillow start decoding pixel data."""
    def refuse(*args, **kwargs):
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


@pytest.mark.parametrize("compression", ["lzw", "packbits", "zlib"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_compressed_16bit_tiffs_round_trip_at_16_bits(compression, channels, rng):
    pixels = rng.integers(0, 65535, (7, 9, channels)).astype(np.uint16)
    photometric = "minisblack" if channels == 1 else "rgb"
    extra = {"extrasamples": ["unassalpha"]} if channels == 4 else {}
    decoded = codec.decode(_tiff(pixels, photometric=photometric, compression=compression,
                                 **extra))
    assert decoded.pixels.dtype == np.uint16 and decoded.note == ""
    np.testing.assert_array_equal(decoded.pixels, pixels[..., :3 if channels > 1 else 1])
    if channels == 4:
        np.testing.assert_array_equal(decoded.alpha, pixels[..., 3])


def test_jpeg_compressed_8bit_tiff_decodes():
    y, x = np.mgrid[0:32, 0:48]
    pixels = np.stack([x * 5, y * 7, (x + y) * 3], -1).astype(np.uint8)
    decoded = codec.decode(_tiff(pixels, photometric="rgb", compression="jpeg"))
    assert decoded.pixels.shape == (32, 48, 3) and decoded.pixels.dtype == np.uint8
    assert np.abs(decoded.pixels.astype(int) - pixels).mean() < 2


@pytest.mark.parametrize("layout", [{"planarconfig": "separate"}, {"tile": (16, 16)},
                                    {"planarconfig": "separate", "tile": (16, 16)}])
def test_planar_and_tiled_16bit_rgb_tiffs(layout, rng):
    pixels = rng.integers(0, 65535, (20, 35, 3)).astype(np.uint16)
    stored = np.moveaxis(pixels, -1, 0) if "planarconfig" in layout else pixels
    decoded = codec.decode(_tiff(stored, photometric="rgb", compression="lzw", **layout))
    np.testing.assert_array_equal(decoded.pixels, pixels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_multi_page_tiff_says_which_pages_were_dropped(dtype, rng):
    pages = rng.integers(0, 255, (3, 6, 5, 3)).astype(dtype)
    decoded = codec.decode(_tiff(pages, photometric="rgb", compression="zlib"))
    np.testing.assert_array_equal(decoded.pixels, pages[0])
    assert decoded.note == "multi-page TIFF: restored page 1 of 3; pages 2-3 dropped"


def test_pyramid_levels_are_not_pages():
    out = io.BytesIO()
    with tifffile.TiffWriter(out) as tiff:
        tiff.write(np.zeros((64, 64), np.uint16), subifds=1, compression="zlib")
        tiff.write(np.zeros((32, 32), np.uint16), subfiletype=1, compression="zlib")  # sub-IFD
        tiff.write(np.zeros((16, 16), np.uint16), subfiletype=1, compression="zlib")  # top level
    decoded = codec.decode(out.getvalue())
    assert decoded.pixels.shape == (64, 64, 1) and decoded.note == ""


@pytest.mark.parametrize("layout", [{}, {"tile": (16, 16)}])
def test_bomb_sized_planar_tiff_refused_before_decoding(layout, no_pixel_decoding):
    small = _tiff(np.zeros((3, 16, 16), np.uint16), photometric="rgb",
                  planarconfig="separate", compression="zlib", **layout)
    bomb = _set_tiff_size(small, 30000, 40000)  # 1.2 GP x 3 samples in a file of < 1 kB
    assert len(bomb) < 2000
    with pytest.raises(ImageError, match="30000x40000 = 1200000000 pixels.*max_pixels"):
        codec.decode(bomb)


def test_16bit_tiff_tifffile_cannot_decode_is_refused_not_truncated(monkeypatch, rng):
    data = _tiff(rng.integers(0, 65535, (8, 8, 3)).astype(np.uint16), photometric="rgb",
                 compression="lzw")

    def fail(*args, **kwargs):
        raise ValueError("no codec")  # as tifffile does when imagecodecs is missing

    monkeypatch.setattr(tifffile.TiffPage, "asarray", fail)
    with pytest.raises(ImageError, match="16-bit LZW TIFF .* refused rather than read at 8 bits"):
        codec.decode(data, name="scan.tif")
    monkeypatch.setattr(tifffile, "TiffFile", fail)  # header unreadable: only Pillow opens it
    with pytest.raises(ImageError, match="16-bit TIFF that only Pillow can open"):
        codec.decode(data, name="scan.tif")


def test_associated_alpha_is_unpremultiplied():
    colour = np.full((4, 4, 3), 40000, np.uint16)
    alpha = np.full((4, 4), 32768, np.uint16)
    premultiplied = np.round(colour * (alpha[..., None] / 65535)).astype(np.uint16)
    data = _tiff(np.concatenate([premultiplied, alpha[..., None]], -1), photometric="rgb",
                 extrasamples=["assocalpha"])
    decoded = codec.decode(data)
    assert np.abs(decoded.pixels.astype(int) - colour).max() <= 2
    np.testing.assert_array_equal(decoded.alpha, alpha)


def test_16bit_tiff_output_is_what_was_decoded(rng):
    pixels = rng.integers(0, 65535, (6, 7, 3)).astype(np.uint16)
    alpha = rng.integers(0, 65535, (6, 7)).astype(np.uint16)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    with tifffile.TiffFile(io.BytesIO(codec.encode(pixels, alpha, "tiff", icc))) as tiff:
        page = tiff.pages[0]
        assert (page.dtype, page.samplesperpixel, page.photometric) == (np.uint16, 4, 2)
        assert tuple(page.extrasamples) == (2,)  # unassociated alpha
        assert page.tags.valueof("InterColorProfile") == icc
        np.testing.assert_array_equal(page.asarray(), np.dstack([pixels, alpha]))


# --- EXIF orientation -----------------------------------------------------------------------

def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[codec.ORIENTATION_TAG] = orientation
    exif[0x010F] = "TestMaker"
    return exif.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillow_exif_transpose(orientation, rng):
    pixels = rng.integers(0, 255, (3, 5, 3)).astype(np.uint8)
    image = Image.open(io.BytesIO(_png(Image.fromarray(pixels), exif=_exif(orientation))))
    expected = np.asarray(ImageOps.exif_transpose(image))
    np.testing.assert_array_equal(codec.orient(pixels, orientation), expected)


@pytest.mark.parametrize("alpha", [False, True])
def test_16bit_png_with_orientation_6_comes_out_rotated_and_keeps_metadata(alpha, rng):
    pixels = rng.integers(0, 65535, (4, 6, 3)).astype(np.uint16)
    plane = rng.integers(0, 65535, (4, 6)).astype(np.uint16) if alpha else None
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    decoded = codec.decode(codec.encode(pixels, plane, "png", icc, _exif(6)))
    np.testing.assert_array_equal(decoded.pixels, np.rot90(pixels, -1))
    if alpha:
        np.testing.assert_array_equal(decoded.alpha, np.rot90(plane, -1))
    assert decoded.icc == icc
    exif = Image.Exif()
    exif.load(decoded.exif)
    assert exif[codec.ORIENTATION_TAG] == 1 and exif[0x010F] == "TestMaker"


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_tiff_with_orientation_6_comes_out_rotated(channels, rng):
    pixels = rng.integers(0, 65535, (4, 6, channels)).astype(np.uint16)
    data = _tiff(pixels, photometric="rgb" if channels == 3 else "minisblack",
                 compression="lzw", extratags=[(274, 3, 1, 6, True)])
    decoded = codec.decode(data)
    np.testing.assert_array_equal(decoded.pixels, np.rot90(pixels, -1))


# --- CMYK -----------------------------------------------------------------------------------

def _cmyk_profile(lab=(50.0, 0.0, 0.0)) -> bytes:
    """A minimal ICC v2 CMYK output profile whose A2B0 table maps every CMYK to one Lab colour
    (so a conversion through it is recognisable: a uniform gray for L* = 50, sRGB 119)."""
    def s15(v):
        return struct.pack(">i", round(v * 65536))

    ramp = bytes(range(256))
    corner = bytes([round(lab[0] * 255 / 100), round(lab[1] + 128), round(lab[2] + 128)])
    lut = (b"mft1" + bytes(4) + bytes([4, 3, 2, 0])  # lut8: 4 in, 3 out, 2 grid points
           + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
           + ramp * 4 + corner * 16 + ramp * 3)
    d50 = s15(0.9642) + s15(1.0) + s15(0.8249)
    text = b"test CMYK\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8 + 3 + 67)
    tags = [(b"desc", desc), (b"wtpt", b"XYZ " + bytes(4) + d50), (b"A2B0", lut)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for signature, payload in tags:
        payload += bytes(-len(payload) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(payload))
        body += payload
    header = (struct.pack(">I", offset + len(body)) + bytes(4) + bytes([2, 0x10, 0, 0])
              + b"prtrCMYKLab " + bytes(12) + b"acsp" + bytes(28) + d50 + bytes(48))
    return header + table + body


def _cmyk_file(fmt: str, icc: bytes | None, rng: np.random.Generator) -> bytes:
    image = Image.fromarray(rng.integers(0, 255, (6, 8, 4)).astype(np.uint8), "CMYK")
    out = io.BytesIO()
    image.save(out, fmt, **({"icc_profile": icc} if icc else {}))
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_with_icc_profile_converted_through_it(fmt, rng):
    decoded = codec.decode(_cmyk_file(fmt, _cmyk_profile(), rng))
    assert decoded.pixels.shape == (6, 8, 3)
    assert np.abs(decoded.pixels.astype(int) - 119).max() <= 1  # the profile's L* = 50 gray
    assert "through its ICC profile" in decoded.note and "sRGB" in decoded.note
    profile = ImageCms.ImageCmsProfile(io.BytesIO(decoded.icc))
    assert "sRGB" in ImageCms.getProfileDescription(profile)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
@pytest.mark.parametrize("icc,reason", [(None, "no ICC profile"),
                                        (b"\0" * 200, "ICC profile is unusable")])
def test_cmyk_without_usable_profile_converted_naively_and_says_so(fmt, icc, reason, rng):
    decoded = codec.decode(_cmyk_file(fmt, icc, rng))
    assert decoded.pixels.shape == (6, 8, 3) and decoded.pixels.std() > 10
    assert "CMYK converted to RGB naively" in decoded.note and reason in decoded.note
    assert decoded.icc is None


def test_16bit_cmyk_tiff(rng):
    cmyk = rng.integers(0, 65535, (5, 4, 4)).astype(np.uint16)
    decoded = codec.decode(_tiff(cmyk, photometric="separated", compression="lzw"))
    white = 65535.0 - cmyk
    expected = np.round(white[..., :3] * white[..., 3:] / 65535).astype(np.uint16)
    np.testing.assert_array_equal(decoded.pixels, expected)
    assert "16-bit CMYK converted to RGB naively" in decoded.note
    decoded = codec.decode(_tiff(cmyk, photometric="separated", iccprofile=_cmyk_profile()))
    assert decoded.pixels.dtype == np.uint8 and "through its ICC profile, at 8 bits" in decoded.note
    assert np.abs(decoded.pixels.astype(int) - 119).max() <= 1


def test_16bit_miniswhite_tiff_is_inverted(rng):
    gray = rng.integers(0, 65535, (5, 4)).astype(np.uint16)
    decoded = codec.decode(_tiff(gray, photometric="miniswhite", compression="zlib"))
    np.testing.assert_array_equal(decoded.pixels[..., 0], 65535 - gray)


def test_tiff_samples_count_toward_the_size_limit(no_pixel_decoding):
    many_samples = _tiff(np.zeros((100, 100, 6), np.uint8), photometric="minisblack",
                         planarconfig="contig", extrasamples=["unspecified"] * 5)
    with pytest.raises(ImageError, match="100x100x6 samples"):
        codec.decode(many_samples, max_pixels=12_000)  # 10,000 pixels, 60,000 samples


def test_8bit_tiff_pillow_cannot_decode_is_read_by_tifffile(rng):
    pixels = rng.integers(0, 255, (12, 10, 3)).astype(np.uint8)
    data = _tiff(pixels, photometric="rgb", compression="png")  # a codec libtiff lacks
    with pytest.raises(OSError):
        Image.open(io.BytesIO(data)).load()
    decoded = codec.decode(data)
    np.testing.assert_array_equal(decoded.pixels, pixels)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        codec.decode(data[: len(data) - 40])
