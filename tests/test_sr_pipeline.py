"""Super-resolution and U-Net models through whole restore jobs (shared local Ray).

Random nets saved as model files stand in for trained ones: these tests check sizes, modes,
depths, alpha, tiling and the job's records and report, not image quality.
"""

import json

import numpy as np
import png
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from restorer.nets import build_net
from restorer.pipeline import restore
from restorer.report.inspection import inspect_output
from restorer.weights.checkpoint import save_model


def _save_net(tmp_path, spec):
    torch.manual_seed(0)
    net = build_net(spec).eval()
    path = tmp_path / f"{spec['arch']}.safetensors"
    save_model(str(path), net, {"purpose": "tests"})
    return str(path), net


def _write_png16(path, array):
    """A 16-bit PNG of an HWC uint16 array (2 planes = gray + alpha, 4 = RGBA)."""
    height, width, planes = array.shape
    writer = png.Writer(width, height, greyscale=planes in (1, 2), alpha=planes in (2, 4),
                        bitdepth=16)
    with open(path, "wb") as f:
        writer.write(f, array.reshape(height, width * planes).tolist())


@pytest.fixture
def sr_inputs(tmp_path):
    """Gray, RGB, RGBA (with a real alpha), 16-bit gray and 16-bit RGBA inputs, odd sizes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(rng.integers(0, 255, (37, 29), dtype=np.uint8)).save(root / "gray.png")
    Image.fromarray(rng.integers(0, 255, (110, 150, 3), dtype=np.uint8)).save(root / "rgb.png")
    rgba = rng.integers(0, 255, (41, 33, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 33)[None, :].round().astype(np.uint8)  # a ramp
    Image.fromarray(rgba).save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (30, 21), dtype=np.uint16)).save(root / "g16.png")
    rgba16 = rng.integers(0, 65535, (19, 26, 4), dtype=np.uint16)
    _write_png16(root / "rgba16.png", rgba16)
    return root


def test_super_resolution_job_writes_scaled_outputs_records_and_report(ray_session, tmp_path,
                                                                      sr_inputs):
    model, _ = _save_net(tmp_path, {"arch": "srnet", "channels": 1, "scale": 2,
                                    "num_features": 8, "num_blocks": 2})
    out = tmp_path / "out"
    summary = restore(str(sr_inputs), str(out), model=model, tile=32)
    assert (summary["succeeded"], summary["failed"]) == (5, 0), summary["errors_by_class"]

    def opened(key):
        return Image.open(sr_inputs / key), Image.open(out / key)

    for key, mode in [("gray.png", "L"), ("rgb.png", "RGB"), ("rgba.png", "RGBA")]:
        source, result = opened(key)
        assert result.mode == mode, key
        assert result.size == (2 * source.width, 2 * source.height), key
    # alpha is resized to the output (bicubic), never given to the net
    source, result = opened("rgba.png")
    expected_alpha = np.asarray(source.getchannel("A").resize(result.size, Image.BICUBIC))
    np.testing.assert_array_equal(np.asarray(result.getchannel("A")), expected_alpha)
    # 16-bit stays 16-bit, alpha included
    g16 = np.asarray(Image.open(out / "g16.png"))
    assert g16.dtype == np.uint16 and g16.shape == (60, 42)
    width, height, rows, info = png.Reader(filename=str(out / "rgba16.png")).read()
    assert (width, height, info["bitdepth"], info["alpha"]) == (52, 38, 16, True)
    alpha16 = np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(38, 52, 4)[..., 3]
    assert alpha16.max() > 255  # really 16-bit, not 8-bit scaled up

    # the ledger records input and output sizes; the audit ran on the upscaled outputs
    ledger = {r["key"]: r for r in pq.read_table(out / "_restorer" / "ledger").to_pylist()}
    for record in ledger.values():
        assert record["status"] == "ok"
        assert (record["out_height"], record["out_width"]) == (2 * record["height"],
                                                               2 * record["width"])
        assert np.isfinite(record["change_mean"]) and record["change_p99"] >= 0
    assert ledger["rgb.png"]["tiles"] == 4  # 2 x 2 tiles: 32 px raised to 4 x overlap 24
    written = json.loads((out / "_restorer" / "summary.json").read_text())
    assert written["report"] and written["megapixels"] > 0
    page = (out / "_restorer" / "report.html").read_text()
    assert "(output x2)" in page and "no crop" not in page
    assert inspect_output(str(out))["records"] == 5


def test_unet_job_tiles_on_its_alignment(ray_session, tmp_path):
    model, net = _save_net(tmp_path, {"arch": "unet", "channels": 1, "features": [8, 16, 32],
                                      "blocks": 1})
    source = tmp_path / "in"
    source.mkdir()
    rgb = np.random.default_rng(1).integers(0, 255, (150, 203, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(source / "rgb.png")
    out = tmp_path / "out"
    summary = restore(str(source), str(out), model=model, tile=40)  # raised to 4 x 32 = 128
    assert summary["succeeded"] == 1
    assert summary["spec"]["model"]["tile"] == 128  # the tile the actors used, as fingerprinted
    record = pq.read_table(out / "_restorer" / "ledger").to_pylist()[0]
    assert record["tiles"] == 4  # 2 x 2 tiles of 128 px
    restored = np.asarray(Image.open(out / "rgb.png")).astype(int)
    planes = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[:, None]
    with torch.no_grad():
        whole = (net(planes)[:, 0].clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
    assert np.abs(restored - whole.astype(int)).max() <= 1
