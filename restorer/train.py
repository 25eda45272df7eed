"""The maths of training, shared by every training loop: one ``train_step`` and the schedule.

Tensors are float32 NCHW ``[0, 1]``. This module is plain PyTorch (no Ray): the Ray Train job
(:mod:`restorer.train_job`) and the single-GPU zoo recipes (:mod:`restorer.recipes`) both call
it, and it runs on any device.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOSSES = ("l1", "mse")


def cosine_lr(lr: float, min_lr: float, progress: float) -> float:
    """Learning rate at ``progress`` in ``[0, 1]`` of training: cosine from ``lr`` to
    ``min_lr`` (clamped outside the range)."""
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


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


__all__ = ["LOSSES", "cosine_lr", "train_step"]
