"""Tests of restorer.quality.evaluate, and of the bundled model ``denoise-gray`` on generated images."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import matlab_imresize
from PIL import Image

from restorer.nets import build_net
from restorer.quality import evaluate as ev
from restorer.weights.zoo import get_model

ROW_KEYS = {"name", "psnr", "ssim", "input_psnr"}


def smooth_image(size: int, phase: float) -> np.ndarray:
    """A smooth uint8 gray image: gentle waves plus a soft-edged disc."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    img = 0.45 + 0.2 * np.sin(x / 11 + phase) * np.cos(y / 17)
    disc = np.hypot(x - size / 2, y - size / 2) < size / 4
    img += 0.2 * disc
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def image_dir(tmp_path):
    for i, size in enumerate((48, 64)):
        Image.fromarray(smooth_image(size, i)).save(tmp_path / f"smooth{i}.png")
    return tmp_path


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return build_net({"arch": "dncnn", "channels": 1, "num_features": 4, "num_layers": 3,
                      "batch_norm": False})


def test_evaluate_denoise_returns_rows_and_means(image_dir, tiny_net):
    result = ev.evaluate(tiny_net, image_dir, task="denoise", sigma=25)
    assert result["count"] == 2 and result["sigma"] == 25
    assert [row["name"] for row in result["rows"]] == ["smooth0.png", "smooth1.png"]
    assert all(set(row) == ROW_KEYS for row in result["rows"])
    assert result["psnr"] == pytest.approx(np.mean([r["psnr"] for r in result["rows"]]))
    assert 19 < result["input_psnr"] < 22  # sigma 25 noise: 20.17 dB before clipping
    # The noise is seeded by file name: a second run gives the same numbers.
    assert ev.evaluate(tiny_net, image_dir, sigma=25)["rows"] == result["rows"]


def _identity_net() -> torch.nn.Module:
    """A residual DnCNN whose noise estimate is zero: it returns its input."""
    identity = build_net({"arch": "dncnn", "channels": 1, "num_features": 4, "num_layers": 2,
                          "batch_norm": False})
    for p in identity.parameters():
        torch.nn.init.zeros_(p)
    return identity


def test_evaluate_identity_net_reports_the_input(image_dir):
    result = ev.evaluate(_identity_net(), image_dir, task="denoise", sigma=15)
    assert result["psnr"] == pytest.approx(result["input_psnr"])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


def _jpeg(clean8: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(clean8).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer))


def _bicubic_round_trip(clean8: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB imresize down by ``scale`` and back up, saved as uint8, border cropped."""
    clean = clean8.astype(np.float64) / 255
    back = matlab_imresize(matlab_imresize(clean, 1 / scale), scale)
    return np.round(np.clip(back, 0, 1) * 255)[scale:-scale, scale:-scale]


@pytest.mark.parametrize("kwargs", [{"task": "jpeg", "quality": 20}, {"task": "sr", "scale": 2}])
def test_evaluate_other_tasks(image_dir, kwargs):
    """Each task degrades as its convention says (Pillow JPEG at the quality; MATLAB bicubic
    down and up, measured without a border of ``scale`` pixels), checked on an identity net
    against the degradation made here."""
    result = ev.evaluate(_identity_net(), image_dir, **kwargs)
    assert result["count"] == 2 and all(set(row) == ROW_KEYS for row in result["rows"])
    for row in result["rows"]:
        clean8 = np.asarray(Image.open(image_dir / row["name"]))
        if kwargs["task"] == "jpeg":
            expected = _psnr(_jpeg(clean8, 20), clean8)
        else:
            expected = _psnr(_bicubic_round_trip(clean8, 2), clean8[2:-2, 2:-2])
        assert row["input_psnr"] == pytest.approx(expected, abs=1e-6), row
        assert row["psnr"] == pytest.approx(row["input_psnr"])  # the net changed nothing


def test_evaluate_with_nlm_baseline(image_dir, tiny_net):
    result = ev.evaluate(tiny_net, image_dir, sigma=25, baseline="nlm")
    assert result["baseline_psnr"] > result["input_psnr"]


def test_evaluate_rejects_bad_arguments(image_dir, tiny_net, tmp_path):
    with pytest.raises(ValueError, match="deblur"):
        ev.evaluate(tiny_net, image_dir, task="deblur")
    with pytest.raises(ValueError, match="None"):
        ev.evaluate(tiny_net, image_dir, task="jpeg")
    with pytest.raises(ValueError, match="nowhere"):
        ev.evaluate(tiny_net, tmp_path / "nowhere")


def test_to_uint8_clamps_and_rounds():
    out = ev.to_uint8(np.array([-0.2, 0.0, 0.5, 1.0, 1.7], np.float32))
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255])


def test_bundled_denoise_gray_gains_5_db_at_sigma_25(image_dir):
    model = get_model("denoise-gray")
    assert model.spec["channels"] == 1
    result = ev.evaluate(model, image_dir, task="denoise", sigma=25)
    for row in result["rows"]:
        assert row["psnr"] - row["input_psnr"] >= 5.0, row


class PlaneRecorder(torch.nn.Module):
    """A 1-channel identity net that records the shapes it is given."""

    channels, scale = 1, 1

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return x + self.weight


@pytest.fixture
def rgb_dir(tmp_path):
    from restorer.io.samples import scene

    for i in range(2):
        pixels = (scene(48, 40, 3, seed=i) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"rgb{i}.png")
    return tmp_path


def test_gray_net_on_colour_jpeg_restores_each_plane_and_measures_y(rgb_dir):
    from restorer.image import degrade, metrics

    net = PlaneRecorder()
    result = ev.evaluate(net, rgb_dir, task="jpeg", quality=20)
    assert net.shapes == [(1, 1, 48, 40)] * 6  # three planes of each of two images
    clean = ev.read_image(rgb_dir / "rgb0.png", 3)
    expected = metrics.psnr(metrics.rgb_to_y(degrade.jpeg_compress(clean, 20)),
                            metrics.rgb_to_y(clean))
    row = result["rows"][0]
    assert row["input_psnr"] == pytest.approx(expected)
    assert row["psnr"] == pytest.approx(row["input_psnr"])  # the identity changes nothing


def test_gray_net_denoises_colour_images_as_gray(rgb_dir):
    net = PlaneRecorder()
    ev.evaluate(net, rgb_dir, task="denoise", sigma=25)
    assert net.shapes == [(1, 1, 48, 40)] * 2  # Pillow "L": one plane per image


def test_sr_net_on_colour_images_and_its_contact_sheet(rgb_dir, tmp_path):
    torch.manual_seed(0)
    net = build_net({"arch": "srnet", "channels": 1, "scale": 2, "num_features": 8,
                     "num_blocks": 2})
    sheet = tmp_path / "sheet.png"
    result = ev.evaluate(net, rgb_dir, task="sr", scale=2, sheet=sheet, sheet_rows=1)
    assert result["count"] == 2 and result["sheet"] == str(sheet)
    image = Image.open(sheet)
    assert image.format == "PNG" and image.mode == "RGB"
    # one band: 3 whole panels (48 x 40) and 3 crops of 40 px zoomed x3, with labels
    assert 3 * 40 + 3 * 120 <= image.width <= 1200 and 120 < image.height < 300


def test_contact_sheet_draws_distinct_panels_per_row():
    size = (30, 50)
    rows = [ev.SheetRow(f"img{i}", np.full(size, 0, np.uint8), np.full(size, 128, np.uint8),
                        np.full(size + (3,), (0, 0, 255), np.uint8), 20.0 + i, 30.0 + i)
            for i in range(3)]
    sheet = ev.contact_sheet(rows)
    assert sheet.dtype == np.uint8 and sheet.shape[2] == 3
    band = sheet.shape[0] // 3
    assert band >= 30 * ev.SHEET_ZOOM + 28  # two lines of labels over the zoomed crops
    colours = {tuple(c) for c in sheet[:band].reshape(-1, 3)}
    assert {(0, 0, 0), (128, 128, 128), (0, 0, 255), (220, 30, 30)} <= colours
    # each panel appears twice: whole (30 x 50) and zoomed (30 x 30, x3)
    for colour in ((0, 0, 0), (128, 128, 128), (0, 0, 255)):
        count = np.all(sheet[:band] == colour, axis=2).sum()
        assert count >= 0.9 * (30 * 50 + (30 * ev.SHEET_ZOOM) ** 2), colour
    with pytest.raises(ValueError, match="differ in size"):
        ev.contact_sheet([ev.SheetRow("bad", np.zeros((4, 4), np.uint8),
                                      np.zeros((8, 8), np.uint8), np.zeros((4, 4), np.uint8),
                                      1.0, 2.0)])


# --- odd sizes, edge and frame bands, the actor, BM3D --------------------------------------


@pytest.fixture
def odd_dir(tmp_path):
    """Two smooth gray images whose sides are not multiples of 8."""
    folder = tmp_path / "odd"
    folder.mkdir()
    for i, (height, width) in enumerate(((101, 99), (90, 133))):
        Image.fromarray(smooth_image(max(height, width), i)[:height, :width]).save(
            folder / f"odd{i}.png")
    return folder


def _noisy(folder, name, sigma):
    from restorer.image import degrade

    clean8 = ev.read_image(folder / name, 1)
    noisy = degrade.add_gaussian_noise(clean8.astype(np.float32) / 255, sigma,
                                       np.random.default_rng(ev.image_seed(name)))
    return clean8, noisy


class BandKeeper(torch.nn.Module):
    """A 'denoiser' that smooths the image (a wide box blur) except within ``band`` px of its
    sides, which it returns as given: a known noisy band."""

    channels, scale = 1, 1

    def __init__(self, band):
        super().__init__()
        self.band = band
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        smooth = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2,
                                                count_include_pad=False)
        keep = torch.zeros_like(x, dtype=torch.bool)
        keep[..., :self.band, :] = keep[..., -self.band:, :] = True
        keep[..., :, :self.band] = keep[..., :, -self.band:] = True
        return torch.where(keep, x, smooth) + self.weight


def test_band_psnrs_measure_the_band_and_the_interior_apart():
    clean = np.full((80, 70), 100, np.uint8)
    restored = clean.copy()
    restored[:10] += 10  # an error of 10 levels in the top 10 rows only
    band, interior = ev.band_psnrs(restored, clean, (0, 0, 80, 70), 16, 32)
    in_band = 10 * 70 / (80 * 70 - 48 * 38)  # share of the band's pixels that are off
    assert band == pytest.approx(10 * np.log10(255 ** 2 / (100 * in_band)))
    assert interior == float("inf")
    # a box inside the image: only its own sides count
    band, interior = ev.band_psnrs(restored, clean, (10, 0, 70, 70), 16, 32)
    assert band == interior == float("inf")
    with pytest.raises(ValueError, match="no interior"):
        ev.band_psnrs(restored, clean, (0, 0, 64, 70), 16, 32)


def test_edges_find_a_band_that_the_model_leaves_noisy(odd_dir):
    result = ev.evaluate(BandKeeper(ev.EDGE_BAND), odd_dir, sigma=25, edges=True)
    for row in result["rows"]:
        clean8, noisy = _noisy(odd_dir, row["name"], 25)
        expected = ev.band_psnrs(ev.to_uint8(noisy), clean8, (0, 0) + clean8.shape, 16, 32)[0]
        assert row["band_psnr"] == pytest.approx(expected)  # the band is the input's
        assert row["interior_psnr"] - row["band_psnr"] > 5  # and the interior was smoothed
    gaps = [row["interior_psnr"] - row["band_psnr"] for row in result["rows"]]
    assert result["band_gap_mean"] == pytest.approx(np.mean(gaps))
    assert result["band_gap_max"] == pytest.approx(max(gaps))
    # a model that treats every pixel alike (the identity) shows no gap on noise
    identity = ev.evaluate(BandKeeper(200), odd_dir, sigma=25, edges=True)
    assert abs(identity["band_gap_mean"]) < 0.3


def test_trim_cuts_the_bottom_and_right_at_run_time(odd_dir):
    net = PlaneRecorder()
    result = ev.evaluate(net, odd_dir, sigma=25, trim=(1, 3))
    assert net.shapes == [(1, 1, 100, 96), (1, 1, 89, 130)]
    assert result["trim"] == [1, 3]
    with pytest.raises(ValueError, match="leaves nothing"):
        ev.evaluate(net, odd_dir, trim=(0, 99))


@pytest.mark.parametrize("level", [0, 128])
def test_frame_is_clean_and_flat_and_the_band_next_to_it_is_measured(odd_dir, level):
    seen = []

    class Recorder(PlaneRecorder):
        def forward(self, x):
            seen.append(x.clone())
            return super().forward(x)

    result = ev.evaluate(Recorder(), odd_dir, sigma=25, frame=level)
    first = seen[0][0, 0].numpy()
    assert first.shape == (101 + 96, 99 + 96)
    inside = np.zeros(first.shape, bool)
    inside[48:-48, 48:-48] = True
    assert np.all(first[~inside] == np.float32(level / 255))  # clean, flat frame
    clean8, noisy = _noisy(odd_dir, "odd0.png", 25)
    np.testing.assert_array_equal(first[inside].reshape(clean8.shape), noisy)  # noisy inside
    row = result["rows"][0]
    assert row["psnr"] == pytest.approx(row["input_psnr"])  # measured inside the frame
    expected = ev.band_psnrs(ev.to_uint8(noisy), clean8, (0, 0) + clean8.shape, 24, 24)
    assert (row["band_psnr"], row["interior_psnr"]) == pytest.approx(expected)
    assert result["frame"] == level
    with pytest.raises(ValueError, match="frame"):
        ev.evaluate(PlaneRecorder(), odd_dir, task="sr", scale=2, frame=0)


def test_through_actor_scores_what_restore_writes(odd_dir, tmp_path, monkeypatch):
    from restorer.image import metrics
    from restorer.pipeline import RestoreActor
    from restorer.weights.checkpoint import save_model

    torch.manual_seed(0)
    unet = build_net({"arch": "unet", "channels": 1, "features": (4, 8, 8), "blocks": 1}).eval()
    path = tmp_path / "unet.safetensors"
    save_model(str(path), unet)
    calls = []
    restore_arrays = RestoreActor.restore_arrays

    def spy(self, arrays):
        calls.append((self.tile, [a.shape for a in arrays], [a.dtype for a in arrays]))
        return restore_arrays(self, arrays)

    monkeypatch.setattr(RestoreActor, "restore_arrays", spy)
    # fp32: the same arithmetic as the bare net (restore's CPU default may be bf16)
    result = ev.evaluate(str(path), odd_dir, sigma=25, through="actor", tile=48,
                         precision="fp32")
    assert result["through"] == "actor"
    assert calls[0][1:] == ([(101, 99, 1)], [np.uint8])  # the noisy image as saved, in 8 bits
    assert calls[0][0] >= 48  # tiled (raised to 4x the overlap, as restore does)
    for row in result["rows"]:
        clean8, noisy = _noisy(odd_dir, row["name"], 25)
        saved = ev.to_uint8(noisy).astype(np.float32) / 255
        expected = ev.to_uint8(ev.run_net(unet, saved))  # the whole image, untiled
        assert row["psnr"] == pytest.approx(metrics.psnr(expected, clean8), abs=0.02)
    with pytest.raises(TypeError, match="name or path"):
        ev.evaluate(unet, odd_dir, through="actor")


def test_bm3d_baseline_denoises_the_same_noisy_images(odd_dir):
    pytest.importorskip("bm3d", reason="the bm3d package (restorer[baseline]) is not installed")
    identity = BandKeeper(200)
    result = ev.evaluate(identity, odd_dir, sigma=25, baseline="bm3d", edges=True)
    for row in result["rows"]:
        assert row["baseline_psnr"] > row["input_psnr"] + 6  # smooth images: BM3D does well
        assert {"baseline_band_psnr", "baseline_interior_psnr"} <= set(row)
    assert "baseline_band_gap_mean" in result


def test_eval_command_with_trim_edges_and_frame(odd_dir):
    import json

    from click.testing import CliRunner

    from restorer.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["eval", "--data", str(odd_dir), "--trim", "1x3", "--edges",
                                  "--json"])
    assert result.exit_code == 0, result.output
    out = json.JSONDecoder().raw_decode(result.output, result.output.index("{"))[0]
    assert out["trim"] == [1, 3] and "band_gap_mean" in out and out["through"] == "net"
    result = runner.invoke(main, ["eval", "--data", str(odd_dir), "--frame", "gray"])
    assert result.exit_code == 0, result.output
    assert "band next to the frame" in result.output and "interior" in result.output
    result = runner.invoke(main, ["eval", "--data", str(odd_dir), "--trim", "3"])
    assert result.exit_code == 2 and "ROWSxCOLUMNS" in result.output


DATA = Path(os.environ.get("RESTORER_DATA", Path(__file__).parents[1].parent / "shared" / "data"))


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "set12").is_dir(), reason=f"benchmark sets not at {DATA}")
def test_bundled_denoise_gray_restores_up_to_the_sides_of_odd_sizes():
    """Set12 cut to 249x249 / 505x505 (one past a multiple of 8, the U-Net's alignment): the
    outermost 16 px are no worse than the interior on average, and no image's band is more
    than 3 dB below its interior (edge replication to the alignment: 3.2 dB, worst 5.2)."""
    result = ev.evaluate("denoise-gray", DATA / "set12", sigma=25, trim=(7, 7), edges=True)
    assert result["band_gap_mean"] <= 0.5 and result["band_gap_max"] <= 3.0, result
