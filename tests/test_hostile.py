"""Hostile and odd inputs through a real restore job: each outcome stated and checked."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from restorer.pipeline import restore


def _noise(rng, shape, dtype=np.uint8):
    peak = 65535 if dtype == np.uint16 else 255
    return rng.integers(0, peak, shape).astype(dtype)


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def write_hostile_folder(root, seed: int = 7) -> dict[str, tuple[str, str]]:
    """Writes the inputs; returns key -> (outcome, output key) with outcome "ok" or a stage."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    outcomes: dict[str, tuple[str, str]] = {}

    def add(key, data, outcome="ok", out_key=None):
        files[key] = data
        outcomes[key] = (outcome, out_key or key)

    rgb = Image.fromarray(_noise(rng, (40, 50, 3)))
    png = _encoded(rgb, "PNG")
    jpeg = _encoded(rgb, "JPEG", quality=90)
    add("zero-bytes.png", b"", "decode")
    add("truncated.png", png[: len(png) // 2], "decode")
    add("truncated.jpg", jpeg[: len(jpeg) // 2], "decode")
    add("random-bytes.png", rng.bytes(3000), "decode")
    add("text.jpg", b"Dear diary, today I pretended to be a JPEG.\n" * 20, "decode")
    add("bomb.png", _encoded(Image.new("L", (11000, 10000)), "PNG"), "decode")
    add("cmyk.jpg", _encoded(Image.fromarray(_noise(rng, (30, 40, 4)), "CMYK"), "JPEG"))
    palette = Image.fromarray(_noise(rng, (20, 30)) // 64).convert("P")
    add("palette-transparent.png", _encoded(palette, "PNG", transparency=0))
    add("gray-alpha.png", _encoded(Image.fromarray(_noise(rng, (20, 30, 2)), "LA"), "PNG"))
    add("rgba.png", _encoded(Image.fromarray(_noise(rng, (20, 30, 4)), "RGBA"), "PNG"))
    add("gray16.png", _encoded(Image.fromarray(_noise(rng, (20, 30), np.uint16)), "PNG"))
    from restorer.io.codec import encode

    add("rgb16.png", encode(_noise(rng, (20, 30, 3), np.uint16), None, "png"))
    add("rgb16.tif", encode(_noise(rng, (20, 30, 3), np.uint16), None, "tiff"))
    exif = Image.Exif()
    exif[0x0112] = 6
    add("exif-rotated.jpg", _encoded(Image.fromarray(_noise(rng, (20, 30, 3))), "JPEG",
                                     exif=exif.tobytes()))
    add("one-pixel.png", _encoded(Image.fromarray(_noise(rng, (1, 1))), "PNG"))
    add("thin-3x2000.png", _encoded(Image.fromarray(_noise(rng, (3, 2000))), "PNG"))
    add("photo.webp", _encoded(rgb, "WEBP", lossless=True))
    frames = [Image.fromarray(_noise(rng, (16, 16))) for _ in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    add("animated.gif", out.getvalue(), "ok", "animated.png")
    add("with spaces and ünïcödé 日本.png", png)
    # TIFFs as scanners write them, and a TIFF bomb whose header claims 1.2 GP in < 1 kB
    import tifffile

    def tiff(array, **kwargs):
        out = io.BytesIO()
        tifffile.imwrite(out, array, **kwargs)
        return out.getvalue()

    add("rgb16-lzw.tif", tiff(_noise(rng, (20, 30, 3), np.uint16), photometric="rgb",
                              compression="lzw"))
    add("multipage.tif", tiff(_noise(rng, (3, 16, 16, 3)), photometric="rgb", compression="zlib"))
    planar = bytearray(tiff(np.zeros((3, 16, 16), np.uint16), photometric="rgb",
                            planarconfig="separate", compression="zlib"))
    ifd = int.from_bytes(planar[4:8], "little")
    for entry in range(ifd + 2, ifd + 2 + 12 * int.from_bytes(planar[ifd:ifd + 2], "little"), 12):
        tag = int.from_bytes(planar[entry:entry + 2], "little")
        if tag in (256, 257):  # ImageWidth, ImageLength -> 30000 x 40000, as LONG
            planar[entry + 2:entry + 12] = (b"\x04\x00\x01\x00\x00\x00"
                                            + (30000 if tag == 256 else 40000).to_bytes(4, "little"))
    add("bomb-planar.tif", bytes(planar), "decode")
    add("rgb16-exif6.png", encode(_noise(rng, (20, 30, 3), np.uint16), None, "png",
                                  exif=exif.tobytes()))
    for key, data in files.items():
        (root / key).write_bytes(data)
    return outcomes


def test_every_hostile_input_gets_its_stated_outcome(ray_session, tmp_path, tiny_model):
    source, out = tmp_path / "in", tmp_path / "out"
    outcomes = write_hostile_folder(source)
    summary = restore(str(source), str(out), model=tiny_model, tile=64)
    failed = {k for k, (o, _) in outcomes.items() if o != "ok"}
    assert summary["failed"] == len(failed) and summary["succeeded"] == len(outcomes) - len(failed)
    ledger = {r["key"]: r for r in pq.read_table(out / "_restorer" / "ledger").to_pylist()}
    assert set(ledger) == set(outcomes)
    for key, (outcome, out_key) in outcomes.items():
        record = ledger[key]
        if outcome == "ok":
            assert record["status"] == "ok", (key, record["message"])
            assert (out / out_key).exists(), key
        else:
            assert (record["status"], record["stage"]) == ("failed", outcome), key
            assert record["message"], key
            assert not (out / out_key).exists(), key
    assert "max_pixels" in ledger["bomb.png"]["message"]
    assert "empty" in ledger["zero-bytes.png"]["message"]
    # conversions and metadata
    assert Image.open(out / "cmyk.jpg").mode == "RGB"
    assert Image.open(out / "palette-transparent.png").mode == "RGBA"
    assert Image.open(out / "gray-alpha.png").mode == "LA"
    assert np.asarray(Image.open(out / "gray16.png")).dtype == np.uint16
    from restorer.io.codec import decode

    assert decode((out / "rgb16.png").read_bytes()).pixels.dtype == np.uint16
    assert decode((out / "rgb16.tif").read_bytes()).pixels.dtype == np.uint16
    rotated = Image.open(out / "exif-rotated.jpg")
    assert rotated.size == (20, 30) and rotated.getexif().get(0x0112, 1) == 1
    assert Image.open(out / "one-pixel.png").size == (1, 1)
    assert Image.open(out / "thin-3x2000.png").size == (2000, 3)
    assert "3 frames" in ledger["animated.gif"]["note"]
    assert decode((out / "rgb16-lzw.tif").read_bytes()).pixels.dtype == np.uint16
    assert ledger["multipage.tif"]["note"] == ("multi-page TIFF: restored page 1 of 3; "
                                               "pages 2-3 dropped")
    assert "30000x40000" in ledger["bomb-planar.tif"]["message"]
    assert decode((out / "rgb16-exif6.png").read_bytes()).pixels.shape == (30, 20, 3)
    # nothing but outputs and records were written
    written = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    assert {w for w in written if not w.startswith("_restorer")} == {
        out_key for outcome, out_key in outcomes.values() if outcome == "ok"}


def test_hostile_keys_in_shards_write_nothing_outside(ray_session, tmp_path, tiny_model, rng):
    shards, out = tmp_path / "shards", tmp_path / "out"
    shards.mkdir()
    png = _encoded(Image.fromarray(_noise(rng, (8, 8))), "PNG")
    keys = ["../escape.png", "/abs/olute.png", "back\\slash.png", "nul\x00.png",
            "a/../../up.png", "fine/ok.png"]
    pq.write_table(pa.table({"key": keys, "bytes": [png] * len(keys)}),
                   shards / "shard-00000.parquet")
    summary = restore(str(shards), str(out), model=tiny_model)
    assert (summary["succeeded"], summary["failed"]) == (1, 5)
    assert summary["errors_by_class"] == {"StorageError": 5}
    assert (out / "fine" / "ok.png").exists()
    outside = {p.name for p in tmp_path.rglob("*.png")} - {"ok.png"}
    assert outside == set()
