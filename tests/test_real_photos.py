"""The default model on photos as cameras make them: its noise map, its strength control, and
its gains on camera noise, measured on generated scenes (quick) and on the real pairs and
held-out colour sets of ../shared/data (slow; skipped without it, failed in CI).

Margins sit below what was measured on the shipped file (2-core CPU; the figures are on the
card, restorer/zoo/restore-default.md)."""

import numpy as np
import pytest
import torch
from helpers import shared_path

from restorer import degrade, metrics
from restorer.evaluate import evaluate, evaluate_pairs, run_net, to_uint8
from restorer.models import get_model
from restorer.samples import scene

SCENES = [scene(96, 128, 3, seed) for seed in range(3)]


@pytest.fixture(scope="module")
def net():
    return get_model("restore-default").net


def _camera(clean: np.ndarray, seed: int, shot: float = 0.003) -> np.ndarray:
    """A generated scene through a simulated camera at high ISO, saved as 8-bit."""
    rng = np.random.default_rng(seed)
    noisy = degrade.camera_noise(clean, rng, shot, shot ** 2.18 * 3.3, "RGGB", (2.0, 1.7),
                                 degrade.random_colour_matrix(rng), 2.2, 0.3)
    return degrade.to_8bit(noisy)


def test_the_default_is_noise_aware(net):
    assert hasattr(net, "estimate") and hasattr(net, "strength")


def test_noise_map_follows_the_noise_level(net):
    flat = np.full((96, 96, 3), 0.5, np.float32)
    means = []
    for sigma in (0, 5, 15, 30):
        noisy = degrade.add_gaussian_noise(flat, sigma, np.random.default_rng(0))
        with torch.no_grad():
            estimate = net.estimate(torch.from_numpy(noisy).permute(2, 0, 1)[None])
        means.append(float(estimate.mean()) * 255)
    assert means == sorted(means), means  # more noise, a higher map
    assert means[0] < 2.0, means  # a clean flat image: about no noise
    for sigma, mean in zip((5, 15, 30), means[1:]):
        assert 0.6 * sigma < mean < 1.8 * sigma, means


def test_strength_turns_the_noise_removed_up_and_down(net):
    clean = SCENES[0]
    noisy = _camera(clean, 0)
    clean8 = to_uint8(clean)
    removed, scores = [], []
    for strength in (0.0, 0.5, 1.0, 2.0):
        net.strength = strength
        try:
            out = to_uint8(run_net(net, noisy))
        finally:
            net.strength = 1.0
        removed.append(float(np.abs(out.astype(float) - to_uint8(noisy)).mean()))
        scores.append(metrics.psnr(out, clean8))
    assert removed == sorted(removed), removed  # more strength, more change
    assert scores[2] > scores[0] + 1.0, scores  # strength 1 cleans what 0 keeps


def test_camera_noise_is_removed_on_generated_scenes(net):
    gains = []
    for seed, clean in enumerate(SCENES):
        clean8 = to_uint8(clean)
        noisy = _camera(clean, seed)
        restored = to_uint8(run_net(net, noisy))
        gains.append(metrics.psnr(restored, clean8) - metrics.psnr(to_uint8(noisy), clean8))
    assert min(gains) >= GENERATED_CAMERA_GAIN, gains


@pytest.mark.slow
def test_real_camera_pairs_gain_and_none_gets_worse():
    result = evaluate_pairs("restore-default", shared_path("data", "cc15"))
    assert result["worse"] == []
    assert result["psnr"] >= CC15_LEAST, result["psnr"]


@pytest.mark.slow
@pytest.mark.parametrize("kwargs,gain", [
    ({"task": "noise+jpeg", "sigma": 15, "quality": 75}, "noise+jpeg"),
    ({"task": "jpeg", "quality": 30, "measure": "rgb"}, "jpeg"),
    ({"task": "poisson"}, "poisson"),
    ({"task": "blur+noise", "sigma": 3, "blur": 1.2}, "blur+noise"),
], ids=["noise-jpeg", "jpeg30", "poisson", "blur-noise"])
def test_photo_degradations_gain_on_held_out_colour_images(kwargs, gain):
    result = evaluate("restore-default", shared_path("data", "mcmaster"), **kwargs)
    assert result["psnr"] - result["input_psnr"] >= PHOTO_GAINS[gain], result
