"""The training core shared by every trainer: step, EMA, schedule, precision and state.

Tensors are float32 NCHW ``[0, 1]``. This module is plain PyTorch (no Ray): the Ray Train job
(:mod:`restorer.train.distributed`, one process per DDP worker) and the single-GPU zoo recipes
(:mod:`restorer.train.recipes`) both drive a :class:`Trainer`, and it runs on any device.

- :func:`train_step` - one gradient step on a batch (L1 or MSE, optional autocast);
- :class:`Schedule` - cosine decay from ``lr`` to ``min_lr``, with an optional linear warm-up;
- :func:`precision_for` - bf16 autocast and channels_last on CUDA, float32 elsewhere;
- :class:`EMA` - an exponential moving average of the weights;
- :class:`Trainer` - the four together around one net and optimizer, with the training state
  (``{"optimizer", "ema", "net"}``) that a checkpoint's ``state.pt`` holds, written by
  :func:`save_state` and read back (``weights_only=True``) by :func:`load_state`.

The two callers differ where their users expect it, and say so by parameters: the Ray job's
schedule runs on steps with no warm-up and its EMA averages every floating-point entry of the
state dict (BatchNorm statistics too); the recipes' schedule runs on wall time after a warm-up
of ``warmup`` steps and their EMA averages the parameters only (buffers keep their values
from the start).
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LOSSES = ("l1", "mse")
PRECISIONS = ("auto", "fp32", "bf16")


def cosine_lr(lr: float, min_lr: float, progress: float) -> float:
    """Learning rate at ``progress`` in ``[0, 1]`` of training: cosine from ``lr`` to
    ``min_lr`` (clamped outside the range)."""
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The learning rate by progress: cosine from ``lr`` to ``min_lr``, times a linear warm-up
    ``min(1, (step + 1) / warmup)`` over the first ``warmup`` steps (0 = none)."""

    lr: float
    min_lr: float
    warmup: int = 0

    def __call__(self, progress: float, step: int) -> float:
        """The rate for step ``step`` (0-based) at ``progress`` in ``[0, 1]`` of training
        (steps done / steps, or seconds spent / budget)."""
        rate = cosine_lr(self.lr, self.min_lr, progress)
        return rate * min(1.0, (step + 1) / self.warmup) if self.warmup else rate


@dataclass(frozen=True)
class Precision:
    """How a step runs: ``autocast`` dtype (``None`` = float32) and channels_last tensors."""

    autocast: torch.dtype | None = None
    channels_last: bool = False


def precision_for(device: torch.device, precision: str = "auto") -> Precision:
    """``auto``: bf16 autocast and channels_last on CUDA, float32 elsewhere; ``bf16``: bf16
    autocast and channels_last on any device (on a CPU with native bf16 a step of the
    noise-aware U-Net runs ~2x faster, :func:`restorer.pipeline.actor.cpu_has_bf16`); ``fp32``:
    float32 everywhere. Weights and the loss stay float32 in every case."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if precision == "bf16" or (device.type == "cuda" and precision == "auto"):
        return Precision(torch.bfloat16, channels_last=True)
    return Precision()


def unwrap(net: nn.Module) -> nn.Module:
    """The net inside a DDP wrapper (or the net itself)."""
    return net.module if hasattr(net, "module") else net


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, clean: torch.Tensor,
               degraded: torch.Tensor, loss: str = "l1",
               autocast_dtype: torch.dtype | None = None) -> float:
    """One gradient step on a batch; returns the loss before the step.

    ``clean``, ``degraded``: float32 NCHW ``[0, 1]`` (degraded may leave the range); ``clean``
    is ``net.scale`` times larger than ``degraded`` on each side (the same size for scale 1).
    The loss is the mean L1 or squared error of ``net(degraded)`` against ``clean``, in float32.
    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on CUDA) runs the net under autocast. The net is
    put in train mode.
    """
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; choose from {list(LOSSES)}")
    # DDP (Ray Train with several workers) wraps the net; the interface is the wrapped net's
    scale = (net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net).scale
    expected = (*degraded.shape[:2], degraded.shape[2] * scale, degraded.shape[3] * scale)
    if tuple(clean.shape) != expected:
        raise ValueError(f"clean batch {tuple(clean.shape)} does not match the degraded batch "
                         f"{tuple(degraded.shape)} at the net's scale {scale}")
    net.train()
    if autocast_dtype is None:
        restored = net(degraded)
    else:
        with torch.autocast(degraded.device.type, dtype=autocast_dtype):
            restored = net(degraded)
    restored = restored.float()
    if loss == "l1":
        value = nn.functional.l1_loss(restored, clean)
    else:
        value = nn.functional.mse_loss(restored, clean)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return float(value.detach())


def asymmetric_map_loss(estimate: torch.Tensor, target: torch.Tensor, alpha: float = 0.3
                        ) -> torch.Tensor:
    """CBDNet's asymmetric loss on a noise level map, in its L1 form: the absolute error weighted
    ``1 - alpha`` where ``estimate`` is below ``target`` and ``alpha`` above (``alpha`` < 0.5
    punishes under-estimation: a denoiser told too little noise leaves it in place). The
    minimiser is the ``1 - alpha`` quantile of the target given the input."""
    error = estimate - target
    weight = torch.where(error < 0, 1.0 - alpha, alpha)
    return (weight * error.abs()).mean()


def noise_map_step(net: nn.Module, optimizer: torch.optim.Optimizer, clean: torch.Tensor,
                   degraded: torch.Tensor, noise_map: torch.Tensor, map_weight: float = 1.0,
                   true_share: float = 0.5, autocast_dtype: torch.dtype | None = None,
                   map_grad: bool = True) -> float:
    """One gradient step of a noise-map net (:class:`restorer.nets.noisemap.NoiseMapNet`):
    L1 of the restored image against ``clean`` plus ``map_weight`` times
    :func:`asymmetric_map_loss` of its estimate against ``noise_map`` (the true noise level,
    N x C x H x W like the images). The first ``true_share`` of the batch is restored with the
    true map, the rest with the estimate, so that the net learns what a map means (the
    ``strength`` control relies on it) and to work with its own estimates. ``map_grad=False``
    stops the image loss at the map: the estimator then learns from the map loss alone and its
    map stays a noise level (end to end, as CBDNet trains, the image loss may teach it any map
    the restoration likes); with the trunk frozen too, the step is the map loss's alone and the
    trunk does not run. ``map_weight=0`` with the trunk frozen and the gradient through the map:
    the estimator learns the map the trunk restores best with. Returns the loss."""
    net.train()
    inner = unwrap(net)
    # a frozen trunk and no gradient through the map: the image loss could teach nothing, so
    # the step is the estimator's on its map loss alone, without running the trunk (~100x less;
    # not under DDP, whose wrapped forward must run for the gradients to be averaged)
    estimator_only = (net is inner and not map_grad
                      and not any(p.requires_grad for p in inner.trunk.parameters()))
    with torch.autocast(degraded.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        estimate = inner.estimate(degraded)
        if not estimator_only:
            given = estimate.clone() if map_grad else estimate.detach().clone()
            split = int(round(true_share * degraded.shape[0]))
            given[:split] = noise_map[:split]
            restored = net(degraded, given)
    value = map_weight * asymmetric_map_loss(estimate.float(), noise_map)
    if not estimator_only:
        value = nn.functional.l1_loss(restored.float(), clean) + value
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return float(value.detach())


class EMA:
    """An exponential moving average of a net's weights, kept in a copy of the net.

    After each step :meth:`update` moves every averaged tensor towards the net's:
    ``average += (1 - decay) * (weight - average)``. ``buffers=True`` averages every
    floating-point entry of the state dict (BatchNorm's running statistics too) and copies the
    integer ones (``num_batches_tracked``); ``buffers=False`` averages the parameters only and
    leaves the buffers as they were when the average started.
    """

    def __init__(self, net: nn.Module, decay: float, buffers: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay}; use 0 <= decay < 1")
        self.decay = decay
        self.buffers = buffers
        # a contiguous copy: the average is validated and saved, not trained channels_last
        self.net = copy.deepcopy(unwrap(net)).to(memory_format=torch.contiguous_format)
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Move the average one step towards ``net``'s current weights."""
        net = unwrap(net)
        weight = 1.0 - self.decay
        if not self.buffers:
            for mine, theirs in zip(self.net.parameters(), net.parameters()):
                mine.lerp_(theirs, weight)
            return
        theirs = net.state_dict()
        for name, mine in self.net.state_dict().items():
            if mine.is_floating_point():
                mine.lerp_(theirs[name], weight)
            else:
                mine.copy_(theirs[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed as the net's state dict."""
        return dict(self.net.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state)


class Trainer:
    """One net and its optimizer: :meth:`step` sets the learning rate, runs
    :func:`train_step` at the chosen precision and updates the EMA (if any).

    ``net`` may be wrapped in DDP (the step then synchronises gradients); the EMA and the state
    always hold the unwrapped net's weights. The caller owns the data, the schedule (it passes
    each step's rate) and the step count.
    """

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, loss: str = "l1",
                 precision: Precision = Precision(), ema: EMA | None = None):
        if loss not in LOSSES:
            raise ValueError(f"Unknown loss {loss!r}; choose from {list(LOSSES)}")
        self.net = net
        self.optimizer = optimizer
        self.loss = loss
        self.precision = precision
        self.ema = ema

    def step(self, clean: torch.Tensor, degraded: torch.Tensor, lr: float,
             noise_map: torch.Tensor | None = None, true_share: float = 0.5,
             map_grad: bool = True, map_weight: float = 1.0) -> float:
        """One step at learning rate ``lr`` on a batch already on the net's device; returns
        the loss before the step (not finite when training diverged). With ``noise_map`` (a
        noise-map net's true noise levels) it is a :func:`noise_map_step` (``true_share``,
        ``map_grad`` and ``map_weight`` are its own). A parameter group with an ``lr_scale``
        runs at that multiple of ``lr``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.precision.channels_last:
            degraded = degraded.contiguous(memory_format=torch.channels_last)
        if noise_map is not None:
            loss = noise_map_step(self.net, self.optimizer, clean, degraded, noise_map,
                                  map_weight=map_weight, true_share=true_share,
                                  autocast_dtype=self.precision.autocast, map_grad=map_grad)
        else:
            loss = train_step(self.net, self.optimizer, clean, degraded, self.loss,
                              self.precision.autocast)
        if self.ema is not None:
            self.ema.update(self.net)
        return loss

    def averaged(self) -> nn.Module:
        """The net to validate and ship: the EMA's copy when there is one, else the net."""
        return self.ema.net if self.ema is not None else unwrap(self.net)

    def state_dict(self) -> dict[str, Any]:
        """The training state a checkpoint's ``state.pt`` holds: the optimizer's state, the
        EMA's weights (``None`` without EMA) and the trained weights."""
        return {"optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "net": unwrap(self.net).state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s ``state`` (tensors move to the net's device). A
        state without EMA weights starts the EMA (if any) from the restored weights."""
        unwrap(self.net).load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema.load_state_dict(unwrap(self.net).state_dict())


def save_state(state: dict[str, Any], path: str) -> None:
    """Write :meth:`Trainer.state_dict`'s state to the local file ``path`` (``state.pt``)."""
    torch.save(state, path)


def load_state(data: bytes) -> dict[str, Any]:
    """The state in ``state.pt`` bytes, read with ``weights_only=True`` (tensors and plain
    containers only: no code runs). Bytes that do not load (empty, truncated, not a state)
    raise ``ValueError``."""
    try:
        state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises EOFError, IndexError, RuntimeError...
        raise ValueError(f"not a training state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not {"optimizer", "net"} <= set(state):
        raise ValueError("not a training state (no optimizer and net entries)")
    return state


__all__ = ["EMA", "LOSSES", "PRECISIONS", "Precision", "Schedule", "Trainer",
           "asymmetric_map_loss", "cosine_lr", "load_state", "noise_map_step", "precision_for",
           "save_state", "train_step", "unwrap"]
