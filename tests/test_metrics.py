"""Tests of restorer.image.metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from restorer.image import metrics


@pytest.fixture
def image():
    """A smooth 32x40 uint8 gray image in [28, 228]."""
    y, x = np.mgrid[0:32, 0:40]
    return np.round(128 + 100 * np.sin(x / 6) * np.cos(y / 9)).astype(np.uint8)


def test_psnr_identical_is_inf(image):
    assert metrics.psnr(image, image) == float("inf")


def test_psnr_of_a_known_offset(image):
    # A constant error of 5 levels: MSE 25, PSNR = 10 log10(255^2 / 25).
    assert metrics.psnr(image + np.uint8(5), image) == pytest.approx(
        10 * math.log10(255 ** 2 / 25), abs=1e-9)


def test_psnr_uses_float64_so_uint8_does_not_wrap():
    a = np.zeros((4, 4), np.uint8)
    b = np.full((4, 4), 255, np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(0.0)


def test_psnr_rejects_mismatched_shapes(image):
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(image, image[:-1])


def test_ssim_identical_is_one_and_noise_lowers_it(image):
    assert metrics.ssim(image, image) == pytest.approx(1.0)
    noisy = np.clip(image + np.random.default_rng(1).normal(0, 20, image.shape), 0, 255)
    assert metrics.ssim(noisy.astype(np.uint8), image) < 0.9


def test_ssim_of_colour_averages_channels(image):
    rgb = np.stack([image, image, image], axis=2)
    other = rgb.copy()
    other[..., 0] = 255 - other[..., 0]
    value = metrics.ssim(other, rgb)
    assert value == pytest.approx((2 + metrics.ssim(other[..., 0], image)) / 3)


def test_rgb_to_y_matches_matlab_rgb2ycbcr():
    # MATLAB: rgb2ycbcr(uint8([0 0 0])) -> 16, white -> 235, pure red -> 81.481 before rounding.
    pixels = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], np.uint8)
    np.testing.assert_allclose(metrics.rgb_to_y(pixels), [[16.0, 235.0, 81.481]], atol=1e-9)


def test_crop_border(image):
    assert metrics.crop_border(image, 4).shape == (24, 32)
    assert metrics.crop_border(image, 0) is image
    with pytest.raises(ValueError, match="16"):
        metrics.crop_border(image, 16)
