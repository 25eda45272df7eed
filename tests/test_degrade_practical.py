"""Tests of the practical (camera and web) degradations of restorer.image.degrade: each operation's
statistics, and the pipeline that chains them with its noise map."""

import math

import numpy as np
import pytest

from restorer.image import degrade


def _flat(level: float, size: int = 256, channels: int = 3) -> np.ndarray:
    return np.full((size, size, channels), level, np.float32)


@pytest.fixture
def photo():
    """A 96x96 RGB float image with smooth gradients, edges and colour."""
    y, x = np.mgrid[0:96, 0:96].astype(np.float32)
    base = 0.45 + 0.25 * np.sin(x / 9) * np.cos(y / 13)
    img = np.stack([base, 0.8 * base + 0.1 * (x > 48), 1 - base], axis=2)
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.mark.parametrize("level", [0.1, 0.5, 0.9])
def test_poisson_gaussian_variance_grows_with_the_signal(level):
    shot, read = 0.01, 1e-4
    noisy = degrade.add_poisson_gaussian_noise(_flat(level), shot, read,
                                               np.random.default_rng(0))
    variance = float((noisy - level).var())
    assert variance == pytest.approx(shot * level + read, rel=0.03)
    assert abs(float((noisy - level).mean())) < 2e-3  # zero mean, not clipped


def test_poisson_gaussian_shared_draw_is_the_same_in_every_channel():
    noisy = degrade.add_poisson_gaussian_noise(_flat(0.5), 0.01, 0.0, np.random.default_rng(1),
                                               shared=True)
    assert np.array_equal(noisy[..., 0], noisy[..., 2])
    independent = degrade.add_poisson_gaussian_noise(_flat(0.5), 0.01, 0.0,
                                                     np.random.default_rng(1))
    assert abs(np.corrcoef(independent[..., 0].ravel(), independent[..., 1].ravel())[0, 1]) < 0.02


def test_correlated_gaussian_noise_has_the_asked_std_and_correlation():
    noise = degrade.add_correlated_gaussian_noise(_flat(0.5), 10.0, np.random.default_rng(2),
                                                  0.6) - 0.5
    assert noise.std(axis=(0, 1)) == pytest.approx([10 / 255] * 3, rel=0.03)
    assert np.corrcoef(noise[..., 0].ravel(), noise[..., 2].ravel())[0, 1] == pytest.approx(
        0.6, abs=0.02)


@pytest.mark.parametrize("pattern", degrade.BAYER_PATTERNS)
def test_mosaic_keeps_one_colour_per_site_and_demosaic_keeps_recorded_sites(pattern, photo):
    raw = degrade.mosaic(photo, pattern)
    assert raw.shape == photo.shape[:2]
    # every 2x2 tile records red once, green twice, blue once
    colours = [np.flatnonzero(np.isclose(raw[r, c], photo[r, c]))
               for r, c in ((10, 10), (10, 11), (11, 10), (11, 11))]
    assert all(len(c) >= 1 for c in colours)
    rgb = degrade.demosaic_bilinear(raw, pattern)
    assert np.allclose(degrade.mosaic(rgb, pattern), raw, atol=1e-6)  # recorded sites kept
    flat = degrade.demosaic_bilinear(degrade.mosaic(_flat(0.3, 32) * [1, 0.5, 0.2], pattern),
                                     pattern)
    assert np.allclose(flat, [0.3, 0.15, 0.06], atol=1e-6)  # flat colours come back exactly


def test_demosaiced_noise_is_spatially_correlated_raw_noise_is_not():
    rng = np.random.default_rng(3)
    raw_noise = rng.standard_normal((256, 256)).astype(np.float32)
    rgb_noise = degrade.demosaic_bilinear(raw_noise)

    def neighbour_correlation(plane):
        return np.corrcoef(plane[:, :-1].ravel(), plane[:, 1:].ravel())[0, 1]

    assert abs(neighbour_correlation(raw_noise)) < 0.02
    for channel in range(3):
        assert neighbour_correlation(rgb_noise[..., channel]) > 0.3


def test_tone_curve_is_monotone_and_inverted():
    grid = np.linspace(0, 1, 1001, dtype=np.float32)
    for gamma, contrast in ((1.8, 0.0), (2.2, 0.5), (2.6, 1.0)):
        toned = degrade.tone_curve(grid, gamma, contrast)
        assert np.all(np.diff(toned) >= 0) and toned[0] == 0 and toned[-1] == pytest.approx(1)
        back = degrade.inverse_tone_curve(toned, gamma, contrast)
        assert np.abs(degrade.tone_curve(back, gamma, contrast) - toned).max() < 0.5 / 255


def test_colour_matrix_rows_sum_to_one_and_saturate():
    matrix = degrade.random_colour_matrix(np.random.default_rng(4))
    assert np.allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(np.diag(matrix) > 1) and np.all(matrix - np.diag(np.diag(matrix)) <= 0)


def test_camera_noise_is_signal_dependent_and_correlated_across_channels():
    rng = np.random.default_rng(5)
    matrix = degrade.random_colour_matrix(rng)
    args = dict(shot=0.004, read=1e-5, pattern="RGGB", gains=(2.0, 1.8), colour_matrix=matrix,
                gamma=2.2, contrast=0.0)
    stds, residuals = [], []
    for level in (0.15, 0.6):
        image = _flat(level, 128)
        residual = degrade.camera_noise(image, rng, **args) - image
        stds.append(float(residual.std()))
        residuals.append(residual)
    assert stds[0] != pytest.approx(stds[1], rel=0.15)  # noise level depends on the signal
    bright = residuals[1]
    cross = np.corrcoef(bright[..., 0].ravel(), bright[..., 1].ravel())[0, 1]
    assert abs(cross) > 0.1  # white balance and colour matrix mix the channels' noise
    right = np.corrcoef(bright[:, :-1, 1].ravel(), bright[:, 1:, 1].ravel())[0, 1]
    assert right > 0.1  # demosaicing spreads it over neighbours


def test_the_camera_adds_its_noise_and_leaves_the_photo_sharp():
    """Only the noise goes through the camera's development: bilinear demosaicing of the signal
    loses 7-8 levels RMS of a detailed photo (up to 30 at edges), which a net trained on the
    pairs would learn to undo and so sharpen every photo it restores. The same noise on a
    detailed image: its spread is the same at edges as elsewhere."""
    from restorer.io.samples import scene

    image = scene(128, 128, 3, 7).astype(np.float32)
    rng = np.random.default_rng(21)
    args = {"shot": 1e-12, "read": 0.0, "pattern": "GRBG", "gains": (2.1, 1.7),
            "colour_matrix": degrade.random_colour_matrix(rng), "gamma": 2.4, "contrast": 0.5}
    faint = degrade.camera_noise(image, rng, **args)
    assert np.abs(faint - image).max() < 0.5 / 255  # edges and colour kept to the level
    args.update(shot=4e-3, read=1e-5)
    residual = degrade.camera_noise(image, np.random.default_rng(22), luma_sigma=0.5,
                                    chroma_sigma=2.0, chroma_keep=0.3, **args) - image
    from scipy import ndimage

    edges = np.hypot(ndimage.sobel(image.mean(2), 0), ndimage.sobel(image.mean(2), 1))
    mask = edges > np.percentile(edges, 90)
    # the residual is as strong at edges as elsewhere (a demosaicked signal's is not)
    assert residual[mask].std() < 1.6 * residual[~mask].std()
    # a plan run without its noise (the noise map's reference) leaves the photo as it was
    step = degrade._draw_noise(np.random.default_rng(23), degrade.PracticalConfig(camera=1.0),
                               False, (0, 0))
    assert step["op"] == "camera"
    without = degrade.apply_practical_plan(image, [step], noise=False)
    assert np.array_equal(without, degrade.to_8bit(image))


def _noise_statistics(residual: np.ndarray) -> dict:
    """Cross-channel correlation (R-G, G-B, R-B mean), luma's share of the variance and the
    autocorrelation along rows at 1-3 px (mean over channels) of an HWx3 residual."""
    g = residual - residual.mean(axis=(0, 1))
    variance = (g * g).mean(axis=(0, 1))

    def lag(k):
        return float(((g[:, :-k] * g[:, k:]).mean(axis=(0, 1)) / variance).mean())

    cross = np.mean([(g[..., i] * g[..., j]).mean() / np.sqrt(variance[i] * variance[j])
                     for i, j in ((0, 1), (1, 2), (0, 2))])
    return {"cross": float(cross), "luma": float(g.mean(2).var() / variance.mean()),
            "lags": [lag(1), lag(2), lag(3)]}


def test_camera_processing_leaves_luma_noise_spread_over_neighbours():
    """Real camera noise (cc15: shot minus the mean of ~500 shots) is mostly luma (46-79% of
    the variance), positively correlated across channels (+0.2..+0.7) and spread over 3-4 px
    (autocorrelation 0.6-0.76 / 0.23-0.47 / 0.15-0.3 at 1 / 2 / 3 px); demosaicing and a colour
    matrix alone make chroma noise, anti-correlated and fine (isp_shape_noise's docstring)."""
    rng = np.random.default_rng(11)
    matrix = degrade.random_colour_matrix(rng)
    args = {"shot": 0.004, "read": 1e-5, "pattern": "RGGB", "gains": (2.0, 1.8),
            "colour_matrix": matrix, "gamma": 2.2, "contrast": 0.3}
    image = _flat(0.45, 192)
    plain = degrade.camera_noise(image, np.random.default_rng(12), **args) - image
    shaped = degrade.camera_noise(image, np.random.default_rng(12), luma_sigma=0.6,
                                  chroma_sigma=2.0, chroma_keep=0.3, **args) - image
    before, after = _noise_statistics(plain), _noise_statistics(shaped)
    assert before["cross"] < 0 and before["luma"] < 0.3 and before["lags"][2] < 0.08
    assert after["cross"] > 0.3 and 0.45 < after["luma"] < 0.95
    assert 0.55 < after["lags"][0] < 0.9 and after["lags"][1] > 0.25 and after["lags"][2] > 0.1
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    # the luma keeps its level; the chroma is cut to chroma_keep of its std
    assert (shaped @ luma).std() == pytest.approx((plain @ luma).std(), rel=0.02)
    chroma = [n - (n @ luma)[..., None] for n in (plain, shaped)]
    assert chroma[1].std() == pytest.approx(0.3 * chroma[0].std(), rel=0.05)
    noise = np.random.default_rng(13).standard_normal((32, 32, 3)).astype(np.float32)
    assert np.allclose(degrade.isp_shape_noise(noise, 0.0, 0.0, 1.0), noise, atol=1e-6)


def test_a_share_of_camera_noises_is_shaped_within_its_ranges():
    config = degrade.PracticalConfig(camera=1.0, isp=0.7)
    rng = np.random.default_rng(14)
    steps = [degrade._draw_noise(rng, config, False, (0, 0)) for _ in range(400)]
    shaped = [s for s in steps if "luma_sigma" in s]
    assert all(s["op"] == "camera" for s in steps)
    assert 0.62 < len(shaped) / len(steps) < 0.78
    for step in shaped:
        assert config.isp_luma_sigma[0] <= step["luma_sigma"] <= config.isp_luma_sigma[1]
        assert config.isp_chroma_sigma[0] <= step["chroma_sigma"] <= config.isp_chroma_sigma[1]
        assert config.isp_chroma_keep[0] <= step["chroma_keep"] <= config.isp_chroma_keep[1]
    # an unshaped step (a plan drawn before the shaping existed) applies as it did
    image = _flat(0.5, 32)
    plain = next(s for s in steps if "luma_sigma" not in s)
    direct = degrade.camera_noise(image, np.random.default_rng(plain["seed"]), plain["shot"],
                                  plain["read"], plain["pattern"], plain["gains"],
                                  plain["colour_matrix"], plain["gamma"], plain["contrast"])
    assert np.array_equal(degrade.apply_practical_plan(image, [plain]), degrade.to_8bit(direct))


def test_the_noise_level_map_is_the_std_of_white_noise_and_higher_for_spread_noise():
    from scipy import ndimage

    rng = np.random.default_rng(15)
    white = 0.05 * rng.standard_normal((131, 129, 3)).astype(np.float32)
    level = degrade.noise_level_map(white)
    assert level.shape == white.shape and level.dtype == np.float32
    assert level.mean() == pytest.approx(0.05, rel=0.03)
    assert degrade.noise_level_map(white[..., 0]).shape == (131, 129)  # HW too
    spread = np.stack([ndimage.gaussian_filter(white[..., c], 0.8) for c in range(3)], axis=-1)
    spread *= 0.05 / spread.std()
    assert degrade.local_rms(spread).mean() == pytest.approx(0.05, rel=0.05)  # same std...
    assert degrade.noise_level_map(spread).mean() > 1.5 * 0.05  # ...more power per block
    # and it follows the level where the level changes (the left half twice as noisy)
    halves = white.copy()
    halves[:, :64] *= 2
    level = degrade.noise_level_map(halves)
    assert level[:, 8:56].mean() == pytest.approx(0.1, rel=0.05)
    assert level[:, 72:120].mean() == pytest.approx(0.05, rel=0.05)


def test_gaussian_kernel_has_the_asked_stds_along_its_axes():
    theta = math.pi / 6
    kernel = degrade.gaussian_kernel(2.0, 0.8, theta)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    radius = kernel.shape[0] // 2
    rows, cols = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    u = math.cos(theta) * cols + math.sin(theta) * rows
    v = -math.sin(theta) * cols + math.cos(theta) * rows
    assert math.sqrt((kernel * u ** 2).sum()) == pytest.approx(2.0, rel=0.03)
    assert math.sqrt((kernel * v ** 2).sum()) == pytest.approx(0.8, rel=0.03)


def test_anisotropic_blur_smooths_along_its_long_axis(photo):
    noise = np.random.default_rng(6).standard_normal((96, 96)).astype(np.float32)
    blurred = degrade.anisotropic_blur(noise, 2.0, 0.3, 0.0)  # long axis: columns (x)
    along = np.abs(np.diff(blurred, axis=1)).mean()
    across = np.abs(np.diff(blurred, axis=0)).mean()
    assert along < 0.5 * across
    assert degrade.anisotropic_blur(photo, 1.0, 1.0, 0.0).shape == photo.shape


def test_resize_down_up_keeps_size_and_flat_images_and_softens_detail():
    flat = degrade.resize_down_up(_flat(0.4, 50), 0.6, "area", "bicubic")
    assert flat.shape == (50, 50, 3) and np.allclose(flat, 0.4, atol=1e-5)
    noise = np.random.default_rng(7).random((64, 64)).astype(np.float32)
    soft = degrade.resize_down_up(noise, 0.5, "bilinear", "bilinear")
    assert soft.shape == noise.shape and soft.std() < 0.7 * noise.std()


def test_to_8bit_clips_and_rounds():
    out = degrade.to_8bit(np.array([-0.2, 0.1234, 1.7], np.float32))
    assert np.allclose(out * 255, np.round(out * 255)) and out.min() == 0 and out.max() == 1


def test_practical_degradation_is_8bit_reproducible_and_keeps_gray_gray(photo):
    first = degrade.practical_degradation(photo, np.random.default_rng(8))
    again = degrade.practical_degradation(photo, np.random.default_rng(8))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    degraded, noise_map = first
    assert degraded.shape == noise_map.shape == photo.shape
    assert np.allclose(degraded * 255, np.round(degraded * 255)) and degraded.min() >= 0
    gray = np.repeat(photo[..., :1], 3, axis=2)
    for seed in range(6):
        out, _ = degrade.practical_degradation(gray, np.random.default_rng(seed))
        assert degrade.is_gray(np.round(out * 255).astype(np.uint8))


def test_practical_noise_map_measures_the_noise_and_is_zero_without_it(photo):
    no_noise = degrade.PracticalConfig(noise=0.0, second_round=0.0)
    _, quiet = degrade.practical_degradation(photo, np.random.default_rng(9), no_noise)
    assert quiet.max() == 0.0
    sigma_only = degrade.PracticalConfig(blur=0, resize=0, noise=1, camera=0, jpeg=0,
                                         second_round=0, gaussian=(12.0, 12.0),
                                         srgb_shot=(1e-9, 1e-9), srgb_read=(0.0, 0.0))
    maps = []
    for seed in range(12):
        degraded, noise_map = degrade.practical_degradation(photo, np.random.default_rng(seed),
                                                            sigma_only)
        maps.append(noise_map.mean())
    gaussian = [m for m in maps if m > 1e-3]  # the Gaussian draws (the others are near 0)
    assert gaussian and np.mean(gaussian) == pytest.approx(12 / 255, rel=0.1)


def test_practical_plans_vary_order_and_compress_twice():
    config = degrade.PracticalConfig(blur=1, resize=1, noise=1, shuffle=1, second_round=1,
                                     jpeg=1)
    orders = {tuple(step["op"] for step in degrade.draw_practical_plan(
        np.random.default_rng(seed), False, config)[:3]) for seed in range(30)}
    assert len(orders) >= 4  # blur, resize and noise in several orders
    plan = degrade.draw_practical_plan(np.random.default_rng(0), False, config)
    assert [step["op"] for step in plan].count("jpeg") == 2
    qualities = [step["quality"] for seed in range(30) for step in degrade.draw_practical_plan(
        np.random.default_rng(seed), False, config) if step["op"] == "jpeg"]
    assert min(qualities) >= 30 and max(qualities) <= 95
