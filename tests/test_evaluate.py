"""Tests of restorer.evaluate, and of the bundled model ``denoise-gray`` on generated images."""

import numpy as np
import pytest
import torch
from PIL import Image

from restorer import evaluate as ev
from restorer.models import get_model
from restorer.nets import build_net

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


def test_evaluate_identity_net_reports_the_input(image_dir):
    identity = build_net({"arch": "dncnn", "channels": 1, "num_features": 4, "num_layers": 2,
                          "batch_norm": False})
    for p in identity.parameters():
        torch.nn.init.zeros_(p)
    result = ev.evaluate(identity, image_dir, task="denoise", sigma=15)
    assert result["psnr"] == pytest.approx(result["input_psnr"])


@pytest.mark.parametrize("kwargs", [{"task": "jpeg", "quality": 20}, {"task": "sr", "scale": 2}])
def test_evaluate_other_tasks(image_dir, tiny_net, kwargs):
    result = ev.evaluate(tiny_net, image_dir, **kwargs)
    assert result["count"] == 2 and all(set(row) == ROW_KEYS for row in result["rows"])


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
