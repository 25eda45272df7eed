"""Tests of restorer.train: the step maths shared by every training loop."""

import pytest
import torch

from restorer import train
from restorer.nets import build_net

TINY_NET = {"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 3,
            "batch_norm": False}


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
    with pytest.raises(ValueError, match="does not match"):
        train.train_step(net, optimizer, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


def test_train_step_on_a_super_resolution_net():
    torch.manual_seed(0)
    net = build_net({"arch": "srnet", "scale": 2, "num_features": 4, "num_blocks": 1})
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    low = torch.rand(2, 1, 8, 8)
    loss = train.train_step(net, optimizer, torch.rand(2, 1, 16, 16), low)
    assert loss > 0
    with pytest.raises(ValueError, match="scale 2"):
        train.train_step(net, optimizer, torch.rand(2, 1, 8, 8), low)


def test_train_step_under_bf16_autocast_keeps_float32_weights():
    torch.manual_seed(0)
    net = build_net(TINY_NET)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    clean = torch.rand(2, 1, 16, 16)
    loss = train.train_step(net, optimizer, clean, clean + 0.05, autocast_dtype=torch.bfloat16)
    assert loss > 0 and all(p.dtype == torch.float32 for p in net.parameters())


def test_cosine_lr_runs_from_lr_to_min_lr():
    assert train.cosine_lr(1e-3, 1e-5, 0.0) == pytest.approx(1e-3)
    assert train.cosine_lr(1e-3, 1e-5, 0.5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert train.cosine_lr(1e-3, 1e-5, 1.0) == pytest.approx(1e-5)
    assert train.cosine_lr(1e-3, 1e-5, 7.0) == pytest.approx(1e-5)


def test_train_step_reads_the_scale_of_a_ddp_wrapped_net():
    """Ray Train wraps the net in DistributedDataParallel with several workers; the step reads
    the scale of the net inside (a wrapper has none: super-resolution training failed)."""
    import torch.distributed as dist
    from helpers import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        net = torch.nn.parallel.DistributedDataParallel(
            build_net({"arch": "srnet", "channels": 1, "num_features": 4, "num_blocks": 1}))
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        loss = train.train_step(net, optimizer, torch.rand(2, 1, 32, 32), torch.rand(2, 1, 16, 16))
        assert loss > 0
    finally:
        dist.destroy_process_group()
