"""Tests of restorer.image.degrade: shapes, reproducibility and the statistics of each degradation."""

import numpy as np
import pytest

from restorer.image import degrade, metrics


@pytest.fixture
def gray():
    """A smooth 48x64 gray float32 image in [0, 1] with some edges."""
    y, x = np.mgrid[0:48, 0:64].astype(np.float32)
    img = 0.5 + 0.3 * np.sin(x / 7) * np.cos(y / 5)
    img[10:30, 20:40] += 0.15
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.fixture
def rgb(gray):
    return np.stack([gray, gray[::-1], 1 - gray], axis=2)


def test_noise_is_reproducible_unclipped_and_has_the_right_std(gray):
    a = degrade.add_gaussian_noise(gray, 25, np.random.default_rng(3))
    b = degrade.add_gaussian_noise(gray, 25, np.random.default_rng(3))
    c = degrade.add_gaussian_noise(gray, 25, np.random.default_rng(4))
    assert a.dtype == np.float32 and a.shape == gray.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(np.std(a - gray) * 255 - 25) < 1.0
    assert a.min() < 0 or a.max() > 1  # not clipped


def test_noise_rejects_negative_sigma(gray):
    with pytest.raises(ValueError, match="-1"):
        degrade.add_gaussian_noise(gray, -1, np.random.default_rng(0))


@pytest.mark.parametrize("layout", ["gray", "rgb"])
def test_jpeg_keeps_shape_and_loses_quality(layout, gray, rgb):
    img8 = np.round((gray if layout == "gray" else rgb) * 255).astype(np.uint8)
    low = degrade.jpeg_compress(img8, 10)
    high = degrade.jpeg_compress(img8, 90)
    assert low.shape == img8.shape and low.dtype == np.uint8
    assert metrics.psnr(low, img8) < metrics.psnr(high, img8) < float("inf")


def test_jpeg_rejects_float_and_bad_quality(gray):
    with pytest.raises(ValueError, match="uint8"):
        degrade.jpeg_compress(gray, 50)
    with pytest.raises(ValueError, match="0"):
        degrade.jpeg_compress(np.zeros((8, 8), np.uint8), 0)


def test_blur_smooths_spatially_only(rgb):
    blurred = degrade.gaussian_blur(rgb, 2.0)
    assert blurred.shape == rgb.shape
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(rgb, axis=1)).mean()
    constant = np.full((20, 20, 3), [0.1, 0.5, 0.9], np.float32)
    np.testing.assert_allclose(degrade.gaussian_blur(constant, 3.0), constant, atol=1e-6)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_downscale_shape_and_constant(scale):
    constant = np.full((37, 50, 3), 0.3, np.float32)
    small = degrade.bicubic_downscale(constant, scale)
    assert small.shape == (-(-37 // scale), -(-50 // scale), 3)
    np.testing.assert_allclose(small, 0.3, atol=1e-6)


def test_bicubic_matches_matlab_on_a_linear_ramp():
    # MATLAB's kernels sum to one and reproduce linear functions away from the border:
    # imresize of x by 1/2 samples the ramp at the output pixel centres 2i + 0.5 (0-based).
    ramp = np.tile(np.arange(32, dtype=np.float32), (8, 1))
    small = degrade.bicubic_downscale(ramp, 2)
    expected = np.broadcast_to((2 * np.arange(16) + 0.5)[3:-3], (4, 10))
    np.testing.assert_allclose(small[:, 3:-3], expected, atol=1e-4)


def test_bicubic_downscale_matches_a_matlab_port():
    # Expected values from BasicSR's line-by-line port of MATLAB imresize (bicubic,
    # antialiasing), basicsr/utils/matlab_functions.py, on the same input.
    img = (np.arange(48).reshape(6, 8) ** 1.5 / 48 ** 1.5).astype(np.float32)
    expected = [[0.0311983, 0.0499055, 0.0733071, 0.1005217],
                [0.2796483, 0.3223861, 0.3666542, 0.4131249],
                [0.6735358, 0.7301493, 0.7878144, 0.8473861]]
    np.testing.assert_allclose(degrade.bicubic_downscale(img, 2), expected, atol=1e-6)


def test_bicubic_upscale_by_one_is_identity(gray):
    np.testing.assert_allclose(degrade.bicubic_resize(gray, 1.0), gray, atol=1e-6)


def test_downscale_rejects_fractional_factor(gray):
    with pytest.raises(ValueError, match="2.5"):
        degrade.bicubic_downscale(gray, 2.5)


@pytest.mark.parametrize("kind", degrade.DEGRADATIONS)
def test_random_degradation_keeps_shape_and_is_reproducible(kind, gray):
    a = degrade.random_degradation(gray, np.random.default_rng(1), kinds=[kind])
    b = degrade.random_degradation(gray, np.random.default_rng(1), kinds=[kind])
    assert a.shape == gray.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_random_degradation_rejects_unknown_kind(gray):
    with pytest.raises(ValueError, match="rain"):
        degrade.random_degradation(gray, np.random.default_rng(0), kinds=["rain"])


def test_sample_patches_shapes_reproducibility_and_augmentation(gray, rgb):
    patches = degrade.sample_patches([gray, gray[:40, :40]], 16, 50, np.random.default_rng(0))
    again = degrade.sample_patches([gray, gray[:40, :40]], 16, 50, np.random.default_rng(0))
    assert patches.shape == (50, 16, 16) and patches.dtype == np.float32
    np.testing.assert_array_equal(patches, again)
    assert degrade.sample_patches([rgb], 8, 3, np.random.default_rng(0)).shape == (3, 8, 8, 3)
    # Flips/rotations: a 2x2 image with distinct pixels yields several of its 8 symmetries.
    tiny = np.arange(4, dtype=np.float32).reshape(2, 2)
    seen = {p.tobytes() for p in degrade.sample_patches([tiny], 2, 200, np.random.default_rng(0))}
    assert len(seen) == 8


def test_sample_patches_rejects_small_images(gray):
    with pytest.raises(ValueError, match="patch_size 64"):
        degrade.sample_patches([gray], 64, 1, np.random.default_rng(0))
