"""Training of restoration nets: the maths in a plain ``train_step``, a local loop around it.

Pairs are made on the fly: random patches of clean images (flips and rotations, see
:func:`restorer.degrade.sample_patches`) get blind Gaussian noise with sigma drawn uniformly per
patch from ``TrainConfig.sigma_range`` (0-255 scale), unclipped, as DnCNN-B. Tensors are float32
NCHW ``[0, 1]``. This module is plain PyTorch; a Ray Train wrapper calls the same functions.

Run locally, e.g. (the command that trained the zoo model ``denoise-gray``)::

    python -m restorer.train /work/shared/data/train400 restorer/zoo/denoise-gray.safetensors \
        --val-dir /work/shared/data/set12 --minutes 18 --steps 100000
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from restorer import degrade
from restorer.checkpoint import count_parameters, load_model, save_model
from restorer.evaluate import evaluate, image_files, read_image
from restorer.nets import build_net

log = logging.getLogger(__name__)

LOSSES = ("l1", "mse")


def _default_net() -> dict[str, Any]:
    return {"arch": "dncnn", "channels": 1, "num_features": 32, "num_layers": 12,
            "batch_norm": True}


@dataclass(frozen=True)
class TrainConfig:
    net: dict[str, Any] = field(default_factory=_default_net)  # spec for nets.build_net
    patch_size: int = 40  # side of the square training crops, pixels
    batch_size: int = 32  # patches per step
    lr: float = 1e-3  # Adam learning rate at step 0
    min_lr: float = 1e-5  # the cosine schedule decays to this at the end of training
    steps: int = 3000  # optimiser steps (a time budget may end training earlier)
    sigma_range: tuple[float, float] = (0.0, 55.0)  # blind noise std, 0-255 scale, per patch
    loss: str = "l1"  # "l1" or "mse" between restored and clean patches
    seed: int = 0  # seeds patch sampling, noise and the net's initialisation
    log_every: int = 100  # steps between progress lines
    val_every: int = 500  # steps between validations (0: only at the end)
    val_sigma: float = 25.0  # noise std of the validation set, 0-255 scale

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}; choose from {list(LOSSES)}")
        for name in ("patch_size", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        low, high = self.sigma_range
        if not 0 <= low <= high:
            raise ValueError(f"sigma_range must satisfy 0 <= low <= high, got {self.sigma_range}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")


def cosine_lr(config: TrainConfig, progress: float) -> float:
    """Learning rate at ``progress`` in ``[0, 1]`` of training: cosine from lr to min_lr.

    ``config`` is anything with ``lr`` and ``min_lr`` (``TrainConfig``, the Ray Train ``Optim``).
    """
    progress = min(max(progress, 0.0), 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, clean: torch.Tensor,
               degraded: torch.Tensor, loss: str = "l1") -> float:
    """One gradient step on a batch; returns the loss before the step.

    ``clean``, ``degraded``: float32 NCHW ``[0, 1]`` (degraded may leave the range), same shape
    (the net's scale is 1). The loss is the mean L1 or squared error of ``net(degraded)`` against
    ``clean``. The net is put in train mode.
    """
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; choose from {list(LOSSES)}")
    if clean.shape != degraded.shape:
        raise ValueError(f"clean and degraded batches differ: {tuple(clean.shape)} and "
                         f"{tuple(degraded.shape)}")
    net.train()
    restored = net(degraded)
    if loss == "l1":
        value = nn.functional.l1_loss(restored, clean)
    else:
        value = nn.functional.mse_loss(restored, clean)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return float(value.detach())


def load_images(folder: str | Path) -> list[np.ndarray]:
    """Every image in ``folder`` as gray float32 HW in ``[0, 1]`` (Pillow ``"L"``), sorted."""
    return [read_image(path, channels=1).astype(np.float32) / 255.0
            for path in image_files(folder)]


def noisy_batch(images: Sequence[np.ndarray], config: TrainConfig, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, noisy) float32 N1HW tensors: random patches, blind unclipped Gaussian noise."""
    clean = degrade.sample_patches(images, config.patch_size, config.batch_size, rng)
    noisy = np.stack([degrade.add_gaussian_noise(patch, rng.uniform(*config.sigma_range), rng)
                      for patch in clean])
    return torch.from_numpy(clean[:, None]), torch.from_numpy(noisy[:, None])


def hardware() -> str:
    """A one-line description of where this process trains."""
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
            f"{platform.system()}")


def train_local(config: TrainConfig, data_dir: str | Path, out_uri: str,
                minutes: float | None = None, val_dir: str | Path | None = None,
                command: str | None = None, init_uri: str | None = None) -> dict[str, Any]:
    """Train a gray blind denoiser on ``data_dir`` in this process and save it to ``out_uri``.

    Runs ``config.steps`` steps or until ``minutes`` of wall time have passed, whichever comes
    first; the cosine schedule follows whichever of the two is further along. Every
    ``config.val_every`` steps and at the end, PSNR on ``val_dir`` (noise ``val_sigma``, see
    :func:`restorer.evaluate.evaluate`) is logged and the model saved with its provenance.
    ``command`` is recorded as how the run was started (default: this process's argv).
    ``init_uri``: a model file to continue training from (its spec must equal ``config.net``);
    its sha256 and provenance are kept under ``provenance["init"]``. Returns the provenance.
    """
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    images = load_images(data_dir)
    if config.net.get("channels", 1) != 1:
        raise ValueError(f"train_local trains gray nets; the net spec has channels="
                         f"{config.net.get('channels')}")
    net = build_net(config.net)
    init = None
    if init_uri is not None:
        start = load_model(init_uri)
        if start.spec != config.net:
            raise ValueError(f"{init_uri} holds net {start.spec}, not the configured {config.net}")
        net.load_state_dict(start.net.state_dict())
        init = {"uri": init_uri, "sha256": start.sha256, "provenance": start.provenance}
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    log.info("training %s (%d parameters) on %d images from %s for %d steps%s",
             config.net, count_parameters(net), len(images), data_dir, config.steps,
             f" or {minutes} minutes" if minutes else "")
    budget = minutes * 60 if minutes else None
    started = time.perf_counter()
    provenance: dict[str, Any] = {
        "command": command or shlex.join([sys.executable] + sys.argv),
        "data": {"train": str(data_dir), "train_images": len(images),
                 "val": str(val_dir) if val_dir else None},
        "config": asdict(config),
        "hardware": hardware(),
        "parameters": count_parameters(net),
        "init": init,
    }
    history: list[dict[str, float]] = []
    running, step = 0.0, 0

    def checkpoint() -> None:
        wall = time.perf_counter() - started
        record = {"step": step, "wall_seconds": round(wall, 1)}
        if val_dir is not None:
            result = evaluate(net, val_dir, task="denoise", sigma=config.val_sigma)
            record["val_psnr"] = round(result["psnr"], 3)
            record["val_input_psnr"] = round(result["input_psnr"], 3)
        history.append(record)
        provenance.update(steps=step, wall_seconds=round(wall, 1), validation=history,
                          val_psnr=record.get("val_psnr"), val_sigma=config.val_sigma)
        save_model(out_uri, net, provenance)
        log.info("step %d, %.0f s: %s; saved %s", step, wall, record, out_uri)

    while step < config.steps:
        elapsed = time.perf_counter() - started
        if budget is not None and elapsed >= budget:
            log.info("time budget of %s minutes reached at step %d", minutes, step)
            break
        progress = max(step / config.steps, elapsed / budget if budget else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config, progress)
        clean, noisy = noisy_batch(images, config, rng)
        running += train_step(net, optimizer, clean, noisy, config.loss)
        step += 1
        if step % config.log_every == 0:
            log.info("step %d loss %.5f lr %.2e %.0f s", step, running / config.log_every,
                     optimizer.param_groups[0]["lr"], time.perf_counter() - started)
            running = 0.0
        if config.val_every and step % config.val_every == 0 and step < config.steps:
            checkpoint()
    checkpoint()
    return provenance


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m restorer.train DATA_DIR OUT [--val-dir DIR] [--minutes M] [--steps N] ...``."""
    parser = argparse.ArgumentParser(prog="python -m restorer.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="folder of clean training images (converted to gray)")
    parser.add_argument("out", help="where to write the model (.safetensors path or URI)")
    parser.add_argument("--val-dir", help="folder of clean validation images")
    parser.add_argument("--minutes", type=float, help="wall-time budget")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimiser steps")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="initial learning rate")
    parser.add_argument("--init", help="model file to continue training from")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="random seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    train_local(TrainConfig(steps=args.steps, lr=args.lr, seed=args.seed), args.data_dir, args.out,
                minutes=args.minutes, val_dir=args.val_dir, init_uri=args.init,
                command=shlex.join(["python", "-m", "restorer.train"] + list(argv or sys.argv[1:])))


if __name__ == "__main__":
    main()


__all__ = ["LOSSES", "TrainConfig", "cosine_lr", "hardware", "load_images", "main",
           "noisy_batch", "train_local", "train_step"]
