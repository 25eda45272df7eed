"""``restorer eval --pairs`` (real noisy/clean pairs), the photo tasks (noise+jpeg, poisson,
blur+noise) and the noise-map net's strength, on generated images."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from restorer.cli import main
from restorer.nets import build_net
from restorer.nets.noisemap import from_unet
from restorer.quality import evaluate as ev


class Identity(torch.nn.Module):
    channels, scale, alignment, receptive_field = 3, 1, 1, 1

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # evaluate reads the net's device

    def forward(self, x):
        return x


def _scene(seed: int, size: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.stack([0.5 + 0.3 * np.sin(x / 5 + seed), 0.4 + 0.2 * np.cos(y / 7),
                    0.3 + 0.1 * (x > size / 2)], axis=2)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _noisy(clean: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 6, clean.shape)
    return np.clip(np.round(clean + noise), 0, 255).astype(np.uint8)


def write_pairs(folder, layout: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(2):
        clean = _scene(index)
        noisy = _noisy(clean, index)
        if layout == "folders":
            (folder / "noisy").mkdir(exist_ok=True)
            (folder / "clean").mkdir(exist_ok=True)
            Image.fromarray(noisy).save(folder / "noisy" / f"p{index}.png")
            Image.fromarray(clean).save(folder / "clean" / f"p{index}.png")
        else:
            noisy_suffix, clean_suffix = layout.split("/")
            Image.fromarray(noisy).save(folder / f"p{index}{noisy_suffix}.png")
            Image.fromarray(clean).save(folder / f"p{index}{clean_suffix}.png")


@pytest.mark.parametrize("layout", ["_real/_mean", "_noisy/_gt", "folders"])
def test_pair_files_finds_each_naming(tmp_path, layout):
    write_pairs(tmp_path, layout)
    pairs = ev.pair_files(tmp_path)
    assert [name for name, _, _ in pairs] == ["p0", "p1"]
    assert all(noisy.exists() and clean.exists() and noisy != clean for _, noisy, clean in pairs)


def test_pair_files_names_a_noisy_image_without_its_clean_one(tmp_path):
    write_pairs(tmp_path, "_real/_mean")
    (tmp_path / "p1_mean.png").unlink()
    with pytest.raises(ValueError, match="p1_real.png has no clean image p1_mean"):
        ev.pair_files(tmp_path)
    with pytest.raises(ValueError, match="no noisy/clean pairs"):
        ev.pair_files(_empty(tmp_path))


def _empty(tmp_path):
    folder = tmp_path / "only"
    folder.mkdir()
    Image.fromarray(_scene(0)).save(folder / "a.png")
    return folder


def test_evaluate_pairs_measures_rgb_against_the_clean_file(tmp_path):
    write_pairs(tmp_path, "_noisy/_gt")
    result = ev.evaluate_pairs(Identity(), tmp_path, through="net")
    clean = np.asarray(Image.open(tmp_path / "p0_gt.png"))
    noisy = np.asarray(Image.open(tmp_path / "p0_noisy.png"))
    expected = 10 * np.log10(255 ** 2 / np.mean((clean.astype(float) - noisy) ** 2))
    assert result["rows"][0]["input_psnr"] == pytest.approx(expected)
    assert result["rows"][0]["psnr"] == pytest.approx(expected)  # identity: output = input
    assert result["count"] == 2 and result["channels"] == "RGB" and result["worse"] == []


def test_evaluate_pairs_names_images_made_worse_and_adds_a_baseline(tmp_path):
    write_pairs(tmp_path, "_real/_mean")

    class Darken(Identity):
        def forward(self, x):
            return x * 0.8

    result = ev.evaluate_pairs(Darken(), tmp_path, through="net", baseline="nlm")
    assert result["worse"] == ["p0", "p1"]
    assert result["baseline_psnr"] > result["input_psnr"]  # NLM told the estimated sigma
    assert 3 < result["rows"][0]["baseline_sigma"] < 9  # the noise drawn has std 6


def test_estimated_sigma_reads_white_noise():
    clean = np.full((128, 128, 3), 120, np.uint8)
    assert ev.estimated_sigma(_noisy(clean, 3)) == pytest.approx(6.0, rel=0.1)


def test_eval_pairs_command_json_and_usage(tmp_path, tiny_model):
    write_pairs(tmp_path / "pairs", "folders")
    runner = CliRunner()
    result = runner.invoke(main, ["eval", "--model", tiny_model, "--pairs",
                                  str(tmp_path / "pairs"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["task"] == "pairs" and report["through"] == "actor" and report["count"] == 2
    both = runner.invoke(main, ["eval", "--pairs", str(tmp_path), "--data", str(tmp_path)])
    assert both.exit_code == 2 and "one of them" in both.output
    text = runner.invoke(main, ["eval", "--model", tiny_model, "--pairs",
                                str(tmp_path / "pairs"), "--through", "net"])
    assert text.exit_code == 0 and "PSNR/SSIM in dB on RGB" in text.output


@pytest.mark.parametrize("task,kwargs", [("noise+jpeg", {"sigma": 15, "quality": 75}),
                                         ("poisson", {}), ("blur+noise", {"sigma": 3})])
def test_photo_tasks_feed_8_bit_images_and_measure_rgb(tmp_path, task, kwargs):
    for index in range(2):
        Image.fromarray(_scene(index, 40)).save(tmp_path / f"c{index}.png")
    result = ev.evaluate(Identity(), tmp_path, task=task, **kwargs)
    assert result["measured_on"] == "RGB"
    assert result["psnr"] == pytest.approx(result["input_psnr"])  # the 8-bit input itself
    assert 20 < result["input_psnr"] < 45
    degraded = ev.photo_degradation(_scene(0, 40) / 255.0, task, np.random.default_rng(0),
                                    **kwargs)
    assert np.allclose(degraded * 255, np.round(degraded * 255))


def test_photo_degradation_poisson_has_the_asked_variance():
    clean = np.full((200, 200, 3), 0.5, np.float32)
    noisy = ev.photo_degradation(clean, "poisson", np.random.default_rng(1), shot=0.004,
                                 read=(2 / 255) ** 2)
    assert noisy.var() == pytest.approx(0.004 * 0.5 + (2 / 255) ** 2 + 1 / 12 / 255 ** 2,
                                        rel=0.05)


def test_measure_rgb_and_y_on_jpeg(tmp_path):
    for index in range(2):
        Image.fromarray(_scene(index, 40)).save(tmp_path / f"c{index}.png")
    y = ev.evaluate(Identity(), tmp_path, task="jpeg", quality=30)
    rgb = ev.evaluate(Identity(), tmp_path, task="jpeg", quality=30, measure="rgb")
    assert (y["measured_on"], rgb["measured_on"]) == ("Y", "RGB")
    assert y["input_psnr"] != pytest.approx(rgb["input_psnr"])


def _noise_map_net():
    torch.manual_seed(0)
    unet = build_net({"arch": "unet", "channels": 3, "num_features": (8, 16, 32),
                      "num_blocks": 1})
    config = {"arch": "noisemap", "channels": 3, "estimator_features": 4,
              "estimator_layers": 3, "trunk": {"arch": "unet", "channels": 3,
                                               "num_features": (8, 16, 32), "num_blocks": 1,
                                               "guide_channels": 3}}
    return unet, from_unet(unet, build_net(config).config)


def test_a_noise_map_net_starts_as_the_unet_it_continues():
    unet, net = _noise_map_net()
    x = torch.rand(2, 3, 29, 35)
    with torch.no_grad():
        assert torch.equal(net(x), unet(x))
        net.strength = 2.5  # the map's weights are zero: no effect yet
        assert torch.equal(net(x), unet(x))
        assert (net.estimate(x) >= 0).all() and net.estimate(x).shape == x.shape


def test_strength_scales_the_map_the_trunk_sees():
    _, net = _noise_map_net()
    with torch.no_grad():
        net.trunk.down[0][0].weight[:, 3:] = 0.5  # let the map matter
    x = torch.rand(1, 3, 24, 24)
    given = torch.full_like(x, 0.02)
    with torch.no_grad():
        net.strength = 2.0
        doubled = net(x, given)
        net.strength = 1.0
        assert torch.allclose(doubled, net(x, 2 * given))
        assert not torch.allclose(doubled, net(x, given))


def test_a_pooled_estimate_is_the_weighted_mean_of_its_window():
    """``estimator_window`` w: at half resolution each plane's level (softplus of the first
    outputs) is averaged over a w x w window (replicated at the border), weighted by the
    sigmoid of the second outputs, then brought back up as the per-pixel map is."""
    from torch.nn import functional

    from restorer.nets.noisemap import MAP_SCALE

    torch.manual_seed(3)
    net = build_net({"arch": "noisemap", "channels": 3, "estimator_features": 4,
                     "estimator_layers": 3, "estimator_window": 3,
                     "trunk": {"arch": "unet", "channels": 3, "num_features": (8, 16),
                               "num_blocks": 1, "guide_channels": 3}}).eval()
    assert net.estimator[-1].out_channels == 6
    x = torch.rand(1, 3, 12, 16)
    with torch.no_grad():
        raw = net.estimator(x)[0]
        level, weight = functional.softplus(raw[:3]), torch.sigmoid(raw[3:]) + 1e-4
        height, width = level.shape[-2:]
        expected = torch.empty_like(level)
        for i in range(height):
            for j in range(width):
                rows = [min(max(r, 0), height - 1) for r in range(i - 1, i + 2)]
                cols = [min(max(c, 0), width - 1) for c in range(j - 1, j + 2)]
                w = weight[:, rows][:, :, cols]
                expected[:, i, j] = (w * level[:, rows][:, :, cols]).sum((1, 2)) / w.sum((1, 2))
        up = functional.interpolate(expected[None], scale_factor=2, mode="bilinear",
                                    align_corners=False) * MAP_SCALE
        assert torch.allclose(net.estimate(x), up, atol=1e-6)
        # the window widens what the estimate sees: a pixel 6 px off moves it only pooled
        moved = x.clone()
        moved[..., 0, 0] += 0.5
        plain = build_net({**net.config.__dict__, "arch": "noisemap", "estimator_window": 0})
        plain.eval()
        assert torch.equal(plain.estimate(moved)[..., 8:, 8:], plain.estimate(x)[..., 8:, 8:])
        assert not torch.equal(net.estimate(moved)[..., 8:, 8:], net.estimate(x)[..., 8:, 8:])
    with pytest.raises(ValueError, match="odd number"):
        build_net({**net.config.__dict__, "arch": "noisemap", "estimator_window": 4})
