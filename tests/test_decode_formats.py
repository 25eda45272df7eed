"""Only the formats we restore are ever decoded: content in any other format Pillow knows (EPS,
which Pillow hands to Ghostscript; PSD, FITS, ICO, ...), whatever its name, is an error record,
and no external program runs."""

from __future__ import annotations

import io
import os
import stat
import struct

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from restorer.errors import ImageError
from restorer.io import codec

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill\nshowpage\n%%EOF\n")


def _fits() -> bytes:
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8",
             "NAXIS   =                    2", "NAXIS1  =                    4",
             "NAXIS2  =                    4", "END"]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode()
    return header + bytes(range(16)).ljust(2880, b"\0")


def _psd() -> bytes:
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, 4, 4, 8, 1)  # 4x4, 1 channel, gray
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(range(16))


def _saved(fmt: str, mode: str = "L") -> bytes:
    sink = io.BytesIO()
    Image.new(mode, (16, 16), 128).save(sink, format=fmt)
    return sink.getvalue()


# One of each family Pillow would otherwise sniff and open (parsers we never need).
OTHER_FORMATS = {
    "FITS": _fits, "PSD": _psd,
    "PPM": lambda: _saved("PPM"), "TGA": lambda: _saved("TGA"), "PCX": lambda: _saved("PCX"),
    "SGI": lambda: _saved("SGI"), "ICO": lambda: _saved("ICO", "RGBA"),
    "DDS": lambda: _saved("DDS", "RGBA"), "IM": lambda: _saved("IM"),
    "QOI": lambda: _saved("QOI", "RGB"), "XBM": lambda: _saved("XBM", "1"),
}


@pytest.mark.parametrize("fmt", sorted(OTHER_FORMATS))
def test_other_formats_are_never_decoded_whatever_their_name(fmt):
    data = OTHER_FORMATS[fmt]()
    assert Image.open(io.BytesIO(data)).format == fmt  # reachable by sniffing, so a real case
    with pytest.raises(ImageError, match="format we restore"):
        codec.decode(data, name="photo.jpg")


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A ``gs`` first on the PATH that only leaves a marker file when run; yields the
    marker's path."""
    folder = tmp_path / "bin"
    folder.mkdir()
    marker = tmp_path / "ghostscript-ran"
    gs = folder / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    gs.chmod(gs.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # look the binary up again
    yield marker


def test_an_eps_named_like_a_jpeg_never_reaches_ghostscript(fake_ghostscript):
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # Pillow would take it
    with pytest.raises(Exception) as error:
        codec.decode(EPS, name="photo.jpg")
    assert not fake_ghostscript.exists(), "Ghostscript ran"
    assert isinstance(error.value, ImageError)


def test_the_formats_we_restore_still_decode():
    for fmt, mode in (("PNG", "L"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("TIFF", "L"),
                      ("GIF", "P"), ("BMP", "RGB")):
        decoded = codec.decode(_saved(fmt, mode), name=f"x.{fmt.lower()}")
        assert decoded.pixels.shape[:2] == (16, 16), fmt


@pytest.mark.slow
def test_a_job_with_a_disguised_eps_restores_the_rest_and_runs_no_ghostscript(
        exclusive_ray, fake_ghostscript, tmp_path, tiny_model):
    """End to end: the Ray workers (started after the PATH holds the fake gs) decode the
    folder; the EPS is an error record, the images are restored, gs never ran."""
    source = tmp_path / "in"
    source.mkdir()
    rng = np.random.default_rng(5)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 40), dtype=np.uint8)).save(
            source / f"good{index}.png")
    (source / "photo.jpg").write_bytes(EPS)
    import pyarrow.parquet as pq

    from restorer.pipeline import restore

    out = tmp_path / "out"
    summary = restore(str(source), str(out), model=tiny_model, num_cpus=2)
    assert summary["succeeded"] == 4 and summary["failed"] == 1
    errors = pq.read_table(out / "_restorer" / "errors.parquet").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("photo.jpg", "decode")]
    assert sorted(p.name for p in out.glob("*.png")) == [f"good{i}.png" for i in range(4)]
    assert not fake_ghostscript.exists()
