"""Tests of restorer.train.core: the step maths shared by every training loop."""

import pytest
import torch

from restorer.nets import build_net
from restorer.train import core

TINY_NET = {"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 3,
            "batch_norm": False}


def test_train_step_reduces_the_loss():
    torch.manual_seed(0)
    net = build_net(TINY_NET)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    # Flat patches: the noise is learnable away, so the loss must fall well below the noise's.
    clean = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(1)).expand(4, 1, 16, 16)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    losses = [core.train_step(net, optimizer, clean, noisy) for _ in range(50)]
    assert losses[-1] < 0.6 * losses[0]
    mse = core.train_step(net, optimizer, clean, noisy, loss="mse")
    assert isinstance(mse, float) and mse > 0


def test_train_step_rejects_bad_inputs():
    net = build_net(TINY_NET)
    optimizer = torch.optim.Adam(net.parameters())
    with pytest.raises(ValueError, match="huber"):
        core.train_step(net, optimizer, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), "huber")
    with pytest.raises(ValueError, match="does not match"):
        core.train_step(net, optimizer, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


def test_train_step_on_a_super_resolution_net():
    torch.manual_seed(0)
    net = build_net({"arch": "srnet", "scale": 2, "num_features": 4, "num_blocks": 1})
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    low = torch.rand(2, 1, 8, 8)
    loss = core.train_step(net, optimizer, torch.rand(2, 1, 16, 16), low)
    assert loss > 0
    with pytest.raises(ValueError, match="scale 2"):
        core.train_step(net, optimizer, torch.rand(2, 1, 8, 8), low)


def test_train_step_under_bf16_autocast_keeps_float32_weights():
    torch.manual_seed(0)
    net = build_net(TINY_NET)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    clean = torch.rand(2, 1, 16, 16)
    loss = core.train_step(net, optimizer, clean, clean + 0.05, autocast_dtype=torch.bfloat16)
    assert loss > 0 and all(p.dtype == torch.float32 for p in net.parameters())


def test_cosine_lr_runs_from_lr_to_min_lr():
    assert core.cosine_lr(1e-3, 1e-5, 0.0) == pytest.approx(1e-3)
    assert core.cosine_lr(1e-3, 1e-5, 0.5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert core.cosine_lr(1e-3, 1e-5, 1.0) == pytest.approx(1e-5)
    assert core.cosine_lr(1e-3, 1e-5, 7.0) == pytest.approx(1e-5)


# --- the training core: schedule, precision, EMA, Trainer and its state ----------------------

BN_NET = {"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 3}  # BatchNorm


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed noisy batch of flat patches: learnable, so a step must lower the loss."""
    clean = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(seed))
    clean = clean.expand(4, 1, 16, 16).contiguous()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed + 1))
    return clean, clean + 0.1 * noise


def _trainer(net_spec=TINY_NET, ema: float = 0.0, buffers: bool = True, seed: int = 0
             ) -> core.Trainer:
    torch.manual_seed(seed)
    net = build_net(net_spec)
    return core.Trainer(net, torch.optim.Adam(net.parameters(), lr=1e-2), "l1",
                         core.Precision(), core.EMA(net, ema, buffers) if ema else None)


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    warm = core.Schedule(lr=1e-3, min_lr=1e-5, warmup=4)
    assert warm(0.0, 0) == pytest.approx(1e-3 / 4)
    assert warm(0.0, 2) == pytest.approx(1e-3 * 3 / 4)
    assert warm(0.5, 3) == pytest.approx((1e-3 + 1e-5) / 2)  # warm-up over: the cosine's
    assert warm(0.5, 100) == pytest.approx((1e-3 + 1e-5) / 2)
    plain = core.Schedule(lr=1e-3, min_lr=1e-5)  # the Ray job's: no warm-up
    assert [plain(p, 0) for p in (0.0, 0.5, 1.0)] == [
        core.cosine_lr(1e-3, 1e-5, p) for p in (0.0, 0.5, 1.0)]
    assert plain(0.25, 0) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + 2 ** -0.5))


def test_precision_is_bf16_channels_last_on_cuda_only_in_auto():
    assert core.precision_for(torch.device("cpu")) == core.Precision(None, False)
    assert core.precision_for(torch.device("cuda")) == core.Precision(torch.bfloat16, True)
    assert core.precision_for(torch.device("cuda"), "fp32") == core.Precision(None, False)
    # asked for: bf16 autocast on a CPU too (the recipes' default on CPUs with native bf16)
    assert core.precision_for(torch.device("cpu"), "bf16") == core.Precision(torch.bfloat16,
                                                                              True)
    with pytest.raises(ValueError, match="fp16"):
        core.precision_for(torch.device("cpu"), "fp16")


def test_ema_moves_each_weight_by_one_minus_decay_towards_the_net():
    torch.manual_seed(0)
    net = build_net(BN_NET)
    everything, parameters = core.EMA(net, 0.9), core.EMA(net, 0.9, buffers=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for value in net.state_dict().values():
            value.add_(1.0) if value.is_floating_point() else value.add_(5)
    for ema in (everything, parameters):
        ema.update(net)
    after = net.state_dict()
    mean = next(k for k in before if k.endswith("running_mean"))
    count = next(k for k in before if k.endswith("num_batches_tracked"))
    assert set(everything.state_dict()) == set(before)
    for name, value in everything.state_dict().items():
        if value.is_floating_point():  # parameters and BatchNorm statistics alike
            assert torch.allclose(value, before[name] + 0.1 * (after[name] - before[name]))
        else:
            assert torch.equal(value, after[name])  # integer buffers are copied
    averaged = parameters.state_dict()
    for name, value in net.named_parameters():
        assert torch.allclose(averaged[name], before[name] + 0.1 * (value - before[name]))
    assert torch.equal(averaged[mean], before[mean])  # parameters only: buffers stay
    assert torch.equal(averaged[count], before[count])
    with pytest.raises(ValueError, match="decay 1.0"):
        core.EMA(net, 1.0)


def test_trainer_steps_lower_the_loss_and_set_the_rate():
    trainer = _trainer(ema=0.5)
    clean, noisy = _batch()
    first = next(name for name, _ in trainer.net.named_parameters())
    start = trainer.averaged().state_dict()[first].clone()
    losses = [trainer.step(clean, noisy, lr=1e-2) for _ in range(30)]
    assert losses[-1] < 0.6 * losses[0]
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-2
    trainer.step(clean, noisy, lr=3e-4)
    assert trainer.optimizer.param_groups[0]["lr"] == 3e-4
    ema = trainer.averaged().state_dict()[first]
    net = trainer.net.state_dict()[first]
    assert not torch.equal(ema, start) and not torch.equal(ema, net)  # in between
    assert trainer.averaged() is trainer.ema.net
    plain = _trainer()
    assert plain.averaged() is plain.net  # without EMA: the net itself


@pytest.mark.parametrize("buffers", [True, False])
def test_state_round_trips_through_state_pt_exactly(tmp_path, buffers):
    clean, noisy = _batch()
    first = _trainer(BN_NET, ema=0.9, buffers=buffers)
    for _ in range(3):
        first.step(clean, noisy, lr=1e-2)
    core.save_state(first.state_dict(), str(tmp_path / "state.pt"))
    state = core.load_state((tmp_path / "state.pt").read_bytes())
    assert list(state) == ["optimizer", "ema", "net"]  # the layout of state.pt on disk
    second = _trainer(BN_NET, ema=0.9, buffers=buffers, seed=1)  # other initial weights
    second.load_state_dict(state)
    # the next steps agree bit for bit: weights, Adam's moments and the EMA all came back
    for trainer in (first, second):
        for _ in range(2):
            trainer.step(clean, noisy, lr=5e-3)
    for part in ("net", "ema"):
        mine, theirs = first.state_dict()[part], second.state_dict()[part]
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), part
    assert first.state_dict()["optimizer"]["state"][0]["step"] == 5


def test_a_state_without_ema_starts_the_ema_from_the_restored_weights():
    clean, noisy = _batch()
    plain = _trainer()
    plain.step(clean, noisy, lr=1e-2)
    state = plain.state_dict()
    assert state["ema"] is None
    with_ema = _trainer(ema=0.9, seed=1)
    with_ema.load_state_dict(state)
    ema = with_ema.ema.state_dict()
    assert all(torch.equal(ema[k], v) for k, v in state["net"].items())


def _ddp_check(name: str, tmp_path) -> None:
    """Run one check of tests/ddp_checks.py in a child process with a gloo group of one.

    In the pytest process this set-up hung full runs with the process idle (over TCP, then on
    a file store over loopback; never alone): the child dumps its stacks and exits after 90 s;
    a child that hung so is run once more, and its stacks are shown as a warning. Any other
    failure fails."""
    import datetime
    import subprocess
    import sys
    import warnings
    from pathlib import Path

    script = Path(__file__).with_name("ddp_checks.py")
    hang_seconds = 90
    hung = f"Timeout ({datetime.timedelta(seconds=hang_seconds)})!"  # faulthandler's words
    for attempt in (1, 2):
        done = subprocess.run(
            [sys.executable, str(script), name, str(tmp_path / f"store-{attempt}"),
             str(hang_seconds)], check=False, capture_output=True, text=True,
            timeout=hang_seconds + 60)
        if hung not in done.stderr or attempt == 2:
            break
        warnings.warn(f"{name}: gloo set-up hung, run again; its stacks:\n{done.stderr}",
                      stacklevel=1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{name}: ok" in done.stdout


def test_trainer_on_a_ddp_net_keeps_unwrapped_state(tmp_path):
    _ddp_check("trainer_on_a_ddp_net_keeps_unwrapped_state", tmp_path)


def test_train_step_reads_the_scale_of_a_ddp_wrapped_net(tmp_path):
    """Ray Train wraps the net in DistributedDataParallel with several workers; the step reads
    the scale of the net inside (a wrapper has none: super-resolution training failed)."""
    _ddp_check("train_step_reads_the_scale_of_a_ddp_wrapped_net", tmp_path)
