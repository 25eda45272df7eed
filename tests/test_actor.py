"""RestoreActor called directly, without Ray: channel rules, strength, precision, GPU path."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import restorer
from restorer.errors import SpecError
from restorer.nets import build_net
from restorer.pipeline import RestoreActor, driver
from restorer.weights.checkpoint import save_model


def _model(tmp_path, channels):
    torch.manual_seed(0)
    net = build_net({"arch": "dncnn", "channels": channels, "num_features": 8, "num_layers": 4})
    path = tmp_path / f"net{channels}.safetensors"
    save_model(str(path), net.eval())
    return str(path), net.eval()


def test_gray_net_restores_each_plane_of_rgb_on_its_own(tmp_path):
    path, net = _model(tmp_path, 1)
    actor = RestoreActor(model=path, tile=0)
    rgb = np.random.default_rng(0).integers(0, 255, (16, 20, 3), dtype=np.uint8)
    (out,), _ = actor.restore_arrays([rgb])
    for c in range(3):
        plane = torch.from_numpy(rgb[..., c].astype(np.float32) / 255)[None, None]
        with torch.no_grad():
            expected = (net(plane)[0, 0].clamp(0, 1) * 255).round().byte().numpy()
        assert np.abs(out[..., c].astype(int) - expected.astype(int)).max() <= 1


def test_color_net_restores_gray_as_three_equal_planes_and_averages(tmp_path):
    path, net = _model(tmp_path, 3)
    actor = RestoreActor(model=path, tile=0)
    gray = np.random.default_rng(1).integers(0, 255, (16, 20, 1), dtype=np.uint8)
    (out,), _ = actor.restore_arrays([gray])
    assert out.shape == (16, 20, 1)
    x = torch.from_numpy(gray[..., 0].astype(np.float32) / 255)[None, None].expand(1, 3, -1, -1)
    with torch.no_grad():
        expected = (net(x)[0].mean(0).clamp(0, 1) * 255).round().byte().numpy()
    assert np.abs(out[..., 0].astype(int) - expected.astype(int)).max() <= 1


def test_strength_blends_with_the_input_and_16_bit_stays_16_bit(tmp_path):
    path, _ = _model(tmp_path, 1)
    image = np.random.default_rng(2).integers(0, 65535, (12, 12, 1), dtype=np.uint16)
    (full,), _ = RestoreActor(model=path, tile=0).restore_arrays([image])
    (none,), _ = RestoreActor(model=path, tile=0, strength=0.0).restore_arrays([image])
    (half,), stats = RestoreActor(model=path, tile=0, strength=0.5).restore_arrays([image])
    assert full.dtype == none.dtype == half.dtype == np.uint16
    assert np.array_equal(none, image)
    expected = (image.astype(float) + full.astype(float)) / 2
    inside = (full > 0) & (full < 65535)  # where the full output was not clipped
    assert inside.mean() > 0.5
    assert np.abs(half.astype(float) - expected)[inside].max() <= 1.5
    assert {"change_mean", "change_p99", "noise_in", "noise_out",
            "residual_structure"} <= set(stats[0])


def test_public_api_is_restorer_restore(tmp_path, tiny_model):
    # Imported on first use: the Ray-free layers import without the pipeline (or Ray).
    code = ("import sys, restorer, restorer.nets, restorer.weights.checkpoint, restorer.train.core; "
            "print(sorted(m for m in ('ray', 'restorer.pipeline.driver') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True)
    assert imported.stdout.strip() == "[]", imported.stdout
    assert restorer.restore is driver.restore
    # Its options are the spec's fields by name, checked before any work or Ray start.
    source, out = str(tmp_path / "in"), str(tmp_path / "out")
    with pytest.raises(SpecError, match="Unknown option 'tilee'"):
        restorer.restore(source, out, model=tiny_model, tilee=64)
    with pytest.raises(SpecError, match="output.format"):
        restorer.restore(source, out, model=tiny_model, format="gif")
    assert not (tmp_path / "out").exists()


def test_cuda_bf16_channels_last_matches_fp32(tmp_path, cuda):
    path, _ = _model(tmp_path, 1)
    image = np.random.default_rng(3).integers(0, 255, (300, 260, 1), dtype=np.uint8)
    (fast,), _ = RestoreActor(model=path, tile=128).restore_arrays([image])
    (exact,), _ = RestoreActor(model=path, tile=128, precision="fp32").restore_arrays([image])
    assert np.abs(fast.astype(int) - exact.astype(int)).max() <= 3


def _save(tmp_path, spec, name):
    torch.manual_seed(0)
    net = build_net(spec).eval()
    path = tmp_path / f"{name}.safetensors"
    save_model(str(path), net)
    return str(path), net


@pytest.mark.parametrize("native", [True, False])
def test_cpu_precision_auto_is_bf16_where_the_cpu_has_it_and_the_net_allows(
        tmp_path, monkeypatch, native):
    from restorer.pipeline import actor as actor_module
    from restorer.pipeline.actor import resolve_precision

    monkeypatch.setattr(actor_module, "cpu_has_bf16", lambda: native)
    unet = build_net({"arch": "unet", "channels": 3, "features": (4, 8), "blocks": 1})
    opponent = build_net({"arch": "opponent", "trunk": {"arch": "unet", "channels": 1,
                                                        "features": (4, 8), "blocks": 1}})
    assert resolve_precision("auto", False, unet) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", False, opponent) == "fp32"  # its Set5 moved 0.0102 dB
    assert resolve_precision("bf16", False, opponent) == "bf16"  # asked for: kept
    assert resolve_precision("fp16", False, unet) == "fp32"  # no fp16 autocast on CPUs
    assert resolve_precision("auto", True, opponent) == "bf16"  # GPUs: always
    assert resolve_precision("fp32", True, unet) == "fp32"
    path = tmp_path / "unet.safetensors"
    save_model(str(path), unet.eval())
    auto = RestoreActor(model=str(path), tile=0, device="cpu")
    assert auto.precision == ("bf16" if native else "fp32")
    assert (auto.autocast_dtype is torch.bfloat16) == native and auto.channels_last == native
    exact = RestoreActor(model=str(path), tile=0, device="cpu", precision="fp32")
    assert exact.autocast_dtype is None and not exact.channels_last
    image = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    (low,), _ = auto.restore_arrays([image])
    (high,), _ = exact.restore_arrays([image])
    assert low.dtype == np.uint8 and low.shape == high.shape
    difference = np.abs(low.astype(int) - high.astype(int))
    if native:  # bf16 arithmetic: a few levels apart at most, not the same pixels
        assert 0 < difference.max() <= 8
    else:
        assert difference.max() == 0


def test_small_tiles_are_raised_to_four_overlaps_on_the_alignment(tmp_path, caplog):
    path, _ = _save(tmp_path, {"arch": "unet", "channels": 1}, "unet")  # 4 levels: rf 105
    with caplog.at_level("INFO", logger="restorer.pipeline.actor"):
        actor = RestoreActor(model=path, tile=256)
    assert (actor.overlap, actor.alignment, actor.tile) == (112, 8, 448)
    assert "tile 256 raised to 448" in caplog.text
    assert RestoreActor(model=path, tile=512).tile == 512  # wide enough already
    assert RestoreActor(model=path, tile=0).tile == 0  # whole images
    dncnn, _ = _model(tmp_path, 1)
    assert RestoreActor(model=dncnn, tile=256).tile == 256  # overlap 16: nothing to do


def test_unet_tiles_agree_with_whole_images(tmp_path):
    path, _ = _save(tmp_path, {"arch": "unet", "channels": 1, "features": [8, 16, 32],
                               "blocks": 1}, "small-unet")
    image = np.random.default_rng(4).integers(0, 255, (203, 150, 3), dtype=np.uint8)
    tiled_actor = RestoreActor(model=path, tile=32)
    assert tiled_actor.tile == 128 and tiled_actor.alignment == 4  # 4 x overlap 32
    (tiled,), _ = tiled_actor.restore_arrays([image])
    (whole,), _ = RestoreActor(model=path, tile=0).restore_arrays([image])
    assert tiled.shape == whole.shape == image.shape
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1


@pytest.mark.parametrize("scale", [2, 4])
def test_super_resolution_outputs_are_scale_times_larger(tmp_path, scale):
    path, net = _save(tmp_path, {"arch": "srnet", "channels": 1, "scale": scale,
                                 "num_features": 8, "num_blocks": 2}, f"sr{scale}")
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 255, (45, 37, 3), dtype=np.uint8)
    gray16 = rng.integers(0, 65535, (21, 30, 1), dtype=np.uint16)
    (out_rgb, out16), stats = RestoreActor(model=path, tile=32).restore_arrays([rgb, gray16])
    assert out_rgb.shape == (45 * scale, 37 * scale, 3) and out_rgb.dtype == np.uint8
    assert out16.shape == (21 * scale, 30 * scale, 1) and out16.dtype == np.uint16
    plane = torch.from_numpy(rgb[..., 1].astype(np.float32) / 255)[None, None]
    with torch.no_grad():
        expected = (net(plane)[0, 0].clamp(0, 1) * 255).round().numpy()
    assert np.abs(out_rgb[..., 1].astype(int) - expected.astype(int)).max() <= 1
    assert all(np.isfinite(s["change_mean"]) and s["change_mean"] > 0 for s in stats)
    # strength 0 is the bicubic upscale of the input
    (base,), _ = RestoreActor(model=path, tile=0, strength=0.0).restore_arrays([rgb])
    x = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]
    bicubic = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bicubic")[0]
    bicubic = (bicubic.clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
    assert np.abs(base.astype(int) - bicubic.astype(int)).max() <= 1


@pytest.mark.parametrize("spec", [{"arch": "unet", "features": [8, 16, 32], "blocks": 1},
                                  {"arch": "srnet", "scale": 2, "num_features": 8,
                                   "num_blocks": 2}], ids=["unet", "srnet"])
def test_cuda_unet_and_srnet_tile_like_cpu(tmp_path, spec, cuda):
    path, _ = _save(tmp_path, {"channels": 1, **spec}, spec["arch"])
    image = np.random.default_rng(6).integers(0, 255, (301, 257, 3), dtype=np.uint8)
    (cpu,), _ = RestoreActor(model=path, tile=0, device="cpu").restore_arrays([image])
    (exact,), _ = RestoreActor(model=path, tile=32, precision="fp32").restore_arrays([image])
    (fast,), _ = RestoreActor(model=path, tile=32).restore_arrays([image])
    assert cpu.shape == exact.shape == fast.shape
    assert np.abs(exact.astype(int) - cpu.astype(int)).max() <= 1
    assert np.abs(fast.astype(int) - cpu.astype(int)).max() <= 4  # bf16


@pytest.mark.parametrize("spec", [{"arch": "dncnn", "num_features": 8, "num_layers": 4},
                                  {"arch": "unet", "features": [8, 16, 32], "blocks": 1},
                                  {"arch": "srnet", "scale": 2, "num_features": 8,
                                   "num_blocks": 2}], ids=["dncnn", "unet", "srnet"])
def test_one_tile_images_match_the_tiled_path_batched_or_alone(tmp_path, spec):
    """Images that fit one tile skip the blend canvas and share forward passes by shape; they
    must come out as the tiled-and-blended path makes them, and as when restored alone."""
    path, _ = _save(tmp_path, {"channels": 3, **spec}, spec["arch"])
    rng = np.random.default_rng(7)
    small = [rng.integers(0, 255, (140, 133, 3), dtype=np.uint8) for _ in range(3)]
    large = rng.integers(0, 255, (301, 150, 3), dtype=np.uint8)  # two or more tiles
    gray = rng.integers(0, 255, (150, 141, 1), dtype=np.uint8)
    arrays = [small[0], large, small[1], gray, small[2]]
    one_tile = RestoreActor(model=path, tile=256)
    outputs, stats = one_tile.restore_arrays(arrays)
    tiled = RestoreActor(model=path, tile=32)  # raised to 4x the overlap: every image tiled
    assert tiled.tile < 133
    for array, out in zip(arrays, outputs):
        (alone,), _ = one_tile.restore_arrays([array])
        assert np.array_equal(out, alone)
        (reference,), _ = tiled.restore_arrays([array])
        assert out.shape == reference.shape and out.dtype == reference.dtype
        assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1
    assert len(stats) == len(arrays)


def test_audit_p99_is_the_nearest_rank_percentile():
    from restorer.pipeline.actor import p99 as _p99

    for size in (1, 7, 100, 65536):
        values = torch.from_numpy(np.random.default_rng(size).exponential(5.0, size)).float()
        expected = np.quantile(values.numpy(), 0.99, method="inverted_cdf")
        assert float(_p99(values)) == pytest.approx(float(expected))


def test_read_and_write_tasks_import_the_pipeline_without_torch():
    """Ray workers that run the read/decode and encode/write tasks import restorer.pipeline's
    stages and graph (the driver's neighbours); torch must load only where the actor (or the
    driver) needs it: ~1.7 s of CPU a process."""
    import subprocess
    import sys

    code = ("import sys, restorer.pipeline.driver, restorer.pipeline.graph, "
            "restorer.pipeline.stages as s; s.read_and_decode, s.encode_and_write; "
            "sys.exit(int('torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=120, check=False).returncode == 0


def test_residual_structure_is_measured_on_the_central_crop(tmp_path):
    """The ledger's residual_structure is restorer.image.audit's score on the central crop of
    AUDIT_SIDE (128) px, the size the score was calibrated on."""
    from restorer.image.audit import AUDIT_SIDE as side
    from restorer.image.audit import residual_structure

    path, _ = _model(tmp_path, 1)
    rng = np.random.default_rng(4)
    y0, x0 = (300 - side) // 2, (280 - side) // 2
    image = np.zeros((300, 280, 3), dtype=np.uint8)  # a flat frame (residual ~ constant) ...
    image[y0:y0 + side, x0:x0 + side] = rng.integers(0, 255, (side, side, 3))  # ... around noise
    (out,), (stats,) = RestoreActor(model=path, tile=0).restore_arrays([image])

    def crop(a):
        a = a[y0:y0 + side, x0:x0 + side].astype(np.float32) / 255
        return torch.from_numpy(a).permute(2, 0, 1)[None]

    expected = float(residual_structure(crop(image), crop(out))[0])
    assert 0 < stats["residual_structure"] <= 1
    assert stats["residual_structure"] == pytest.approx(expected, abs=0.02)
