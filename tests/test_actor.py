"""RestoreActor called directly, without Ray: channel rules, strength, precision, GPU path."""

import numpy as np
import pytest
import torch

import restorer
from restorer.checkpoint import save_model
from restorer.nets import build_net
from restorer.pipeline import RestoreActor


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
    assert {"change_mean", "change_p99", "noise_in", "noise_out"} <= set(stats[0])


def test_public_api_is_restorer_restore():
    assert callable(restorer.restore)
    assert restorer.restore.__module__ == "restorer.pipeline"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_matches_fp32(tmp_path):
    path, _ = _model(tmp_path, 1)
    image = np.random.default_rng(3).integers(0, 255, (300, 260, 1), dtype=np.uint8)
    (fast,), _ = RestoreActor(model=path, tile=128).restore_arrays([image])
    (exact,), _ = RestoreActor(model=path, tile=128, precision="fp32").restore_arrays([image])
    assert np.abs(fast.astype(int) - exact.astype(int)).max() <= 3
