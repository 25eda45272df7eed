"""Tests of restorer.train: the step maths, the config checks and a tiny local run."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from restorer import train
from restorer.checkpoint import load_model
from restorer.nets import build_net

TINY_NET = {"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 3,
            "batch_norm": False}


@pytest.fixture
def image_dir(tmp_path):
    """Three deterministic 32x32 gray PNGs."""
    y, x = np.mgrid[0:32, 0:32]
    for i in range(3):
        img = 128 + 80 * np.sin((x + 5 * i) / 4) * np.cos(y / (3 + i))
        Image.fromarray(img.astype(np.uint8)).save(tmp_path / f"img{i}.png")
    return tmp_path


def test_train_step_reduces_the_loss():
    torch.manual_seed(0)
    net = build_net(TINY_NET)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    # Flat patches: the noise is learnable away, so the loss must fall well below the noise's.
    clean = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(1)).expand(4, 1, 16, 16)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    losses = [train.train_step(net, optimizer, clean, noisy) for _ in range(50)]
    assert losses[-1] < 0.6 * losses[0]
    mse = train.train_step(net, optimizer, clean, noisy, loss="mse")
    assert isinstance(mse, float) and mse > 0


def test_train_step_rejects_bad_inputs():
    net = build_net(TINY_NET)
    optimizer = torch.optim.Adam(net.parameters())
    with pytest.raises(ValueError, match="huber"):
        train.train_step(net, optimizer, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), "huber")
    with pytest.raises(ValueError, match="differ"):
        train.train_step(net, optimizer, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


def test_config_validation():
    with pytest.raises(ValueError, match="sigma_range"):
        train.TrainConfig(sigma_range=(30, 10))
    with pytest.raises(ValueError, match="huber"):
        train.TrainConfig(loss="huber")
    with pytest.raises(ValueError, match="batch_size"):
        train.TrainConfig(batch_size=0)


def test_cosine_lr_runs_from_lr_to_min_lr():
    config = train.TrainConfig(lr=1e-3, min_lr=1e-5)
    assert train.cosine_lr(config, 0.0) == pytest.approx(1e-3)
    assert train.cosine_lr(config, 0.5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert train.cosine_lr(config, 1.0) == pytest.approx(1e-5)


def test_load_images_are_gray_float(image_dir):
    images = train.load_images(image_dir)
    assert len(images) == 3
    assert all(im.shape == (32, 32) and im.dtype == np.float32 for im in images)
    assert 0 <= min(im.min() for im in images) and max(im.max() for im in images) <= 1


def test_noisy_batch_is_reproducible(image_dir):
    config = train.TrainConfig(patch_size=16, batch_size=5)
    images = train.load_images(image_dir)
    clean, noisy = train.noisy_batch(images, config, np.random.default_rng(0))
    clean2, noisy2 = train.noisy_batch(images, config, np.random.default_rng(0))
    assert clean.shape == noisy.shape == (5, 1, 16, 16)
    assert torch.equal(noisy, noisy2) and torch.equal(clean, clean2)


def test_train_local_saves_a_model_with_provenance(image_dir, tmp_path, caplog):
    config = train.TrainConfig(net=TINY_NET, patch_size=16, batch_size=4, steps=6, log_every=2,
                               val_every=3)
    out = str(tmp_path / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="restorer.train"):
        provenance = train.train_local(config, image_dir, out, val_dir=image_dir,
                                       command="pytest")
    model = load_model(out)
    assert model.spec == TINY_NET
    assert model.provenance["steps"] == 6 and model.provenance["command"] == "pytest"
    assert [r["step"] for r in model.provenance["validation"]] == [3, 6]
    assert model.provenance["val_psnr"] == provenance["val_psnr"] > 0
    assert "hardware" in model.provenance and "wall_seconds" in model.provenance
    assert any("step 6" in r.message for r in caplog.records)
