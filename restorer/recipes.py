"""The recipes that train the bundled zoo, runnable on one GPU without Ray.

Each recipe fixes a net, its data split (folders of ``shared/data``, see its README), the
degradation it learns and its validation. Training is plain PyTorch around
:func:`restorer.train.train_step` with batches made on the device by :mod:`restorer.synth`;
bf16 autocast and channels_last on CUDA; an exponential moving average (EMA) of the weights is
what gets validated and saved. It runs for a wall-time budget (so that it fits a leased GPU's
10-minute calls) and continues from a saved model with ``--init`` (weights only: Adam restarts,
with its warm-up, at ``--lr``). Every ``--val-seconds`` and at the end it validates with
:func:`restorer.evaluate.evaluate` and writes ``OUT/NAME.safetensors`` with its provenance.

    python -m restorer.recipes denoise-gray --data ../shared/data --out zoo-out --minutes 8
    python -m restorer.recipes denoise-gray --data ../shared/data --out zoo-out --minutes 8 \\
        --init zoo-out/denoise-gray.safetensors --lr 2e-4

On a CPU the same command works (slowly); ``restorer train`` is the Ray Train path for
clusters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from restorer import degrade, synth
from restorer.checkpoint import count_parameters, load_model, save_model
from restorer.evaluate import evaluate, image_files, read_image
from restorer.nets import build_net
from restorer.train import cosine_lr, train_step

log = logging.getLogger(__name__)

TASKS = ("denoise", "jpeg", "sr", "mixture")


@dataclass(frozen=True)
class Validation:
    folder: str  # a folder of shared/data
    task: str  # restorer.evaluate task: denoise, jpeg, sr
    sigma: float = 25.0
    quality: int | None = None
    scale: int | None = None

    def run(self, net: torch.nn.Module, data: Path) -> dict[str, Any]:
        result = evaluate(net, data / self.folder, task=self.task, sigma=self.sigma,
                          quality=self.quality, scale=self.scale)
        return {"set": self.folder, "task": self.task, **{k: result[k] for k in (
            "sigma", "quality", "scale") if k in result},
            "psnr": round(result["psnr"], 3), "ssim": round(result["ssim"], 4),
            "input_psnr": round(result["input_psnr"], 3)}


@dataclass(frozen=True)
class Recipe:
    net: dict[str, Any]
    train: tuple[str, ...]  # folders of shared/data with the clean training images
    task: str  # denoise | jpeg | sr | mixture
    validation: tuple[Validation, ...]
    sigma_range: tuple[float, float] = (0.0, 55.0)  # blind noise std, 0-255 scale
    qualities: tuple[int, ...] = ()  # JPEG qualities banked (drawn uniformly)
    patch: int = 128  # crop side (low-resolution side for SR)
    batch: int = 32
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup: int = 300  # steps of linear learning-rate warm-up
    ema: float = 0.999
    loss: str = "l1"
    permute_channels: bool = False  # shuffle colour planes per crop
    rescales: tuple[float, ...] = ()  # extra bicubic-shrunk copies of each training image
    mixture: synth.Mixture = field(default_factory=synth.Mixture)

    @property
    def channels(self) -> int:
        return self.net.get("channels", 1)


RECIPES: dict[str, Recipe] = {
    # Blind gray denoiser, DnCNN-S's data: train400, validated on Set12.
    "denoise-gray": Recipe(
        net={"arch": "unet", "channels": 1, "features": [32, 64, 128, 256], "blocks": 2},
        train=("train400",), task="denoise", sigma_range=(0.0, 55.0),
        validation=(Validation("set12", "denoise", sigma=15),
                    Validation("set12", "denoise", sigma=25),
                    Validation("set12", "denoise", sigma=50))),
    # Blind colour denoiser: only 32 colour images, so flips/rotations, plane shuffles and
    # shrunk copies; validated on Set5.
    "denoise-color": Recipe(
        net={"arch": "unet", "channels": 3, "features": [32, 64, 128, 256], "blocks": 2},
        train=("mcmaster", "set14"), task="denoise", sigma_range=(0.0, 55.0),
        permute_channels=True, rescales=(0.8, 0.6, 0.4),
        validation=(Validation("set5", "denoise", sigma=25),)),
    # Gray JPEG deblocking at quality 10-40, on train400 and the luma of the colour sets.
    "jpeg": Recipe(
        net={"arch": "unet", "channels": 1, "features": [32, 64, 128, 256], "blocks": 2},
        train=("train400", "mcmaster", "set14"), task="jpeg", qualities=tuple(range(10, 41)),
        validation=(Validation("classic5", "jpeg", quality=10),
                    Validation("classic5", "jpeg", quality=30))),
    # Super-resolution of one plane (luma, or each RGB plane in turn), MATLAB bicubic LR.
    "sr-x2": Recipe(
        net={"arch": "srnet", "channels": 1, "scale": 2, "num_features": 48, "num_blocks": 8},
        train=("train400", "mcmaster", "set14"), task="sr", patch=48,
        validation=(Validation("set5", "sr", scale=2),)),
    "sr-x4": Recipe(
        net={"arch": "srnet", "channels": 1, "scale": 4, "num_features": 48, "num_blocks": 8},
        train=("train400", "mcmaster", "set14"), task="sr", patch=32,
        validation=(Validation("set5", "sr", scale=4),)),
    # The default of `restorer restore`: one RGB net for gray (three equal planes, equal noise)
    # and colour images, blind over clean / Gaussian noise 0-50 / JPEG quality 10-90.
    "restore-default": Recipe(
        net={"arch": "unet", "channels": 3, "features": [32, 64, 128, 256], "blocks": 2},
        train=("train400", "mcmaster", "set14"), task="mixture", sigma_range=(0.0, 50.0),
        qualities=tuple(range(10, 91, 5)), permute_channels=True,
        validation=(Validation("set5", "denoise", sigma=25),
                    Validation("classic5", "jpeg", quality=20))),
}


def load_training_images(data: Path, recipe: Recipe) -> list[np.ndarray]:
    """The recipe's clean uint8 images: HW for gray nets, HWx3 for colour nets (gray files as
    three equal planes), plus bicubic-shrunk copies for ``recipe.rescales``."""
    images = []
    for folder in recipe.train:
        for path in image_files(data / folder):
            image = read_image(path, recipe.channels)
            images.append(image)
            for factor in recipe.rescales:
                small = degrade.bicubic_resize(image.astype(np.float32) / 255.0, factor)
                images.append(np.round(np.clip(small, 0, 1) * 255).astype(np.uint8))
    return images


class Batches:
    """Makes ``(clean, degraded)`` float32 NCHW batches for a recipe on a device."""

    def __init__(self, recipe: Recipe, images: Sequence[np.ndarray], device: torch.device,
                 seed: int, workers: int = 4):
        self.recipe = recipe
        variants: list[list[np.ndarray]] = []
        if recipe.task in ("jpeg", "mixture"):
            variants = synth.jpeg_variants(images, recipe.qualities, workers)
        if recipe.task == "sr":
            scale = recipe.net["scale"]
            cleans, lows = synth.bicubic_lows(images, scale)
            self.bank = synth.ImageBank(cleans, device, low=lows, scale=scale)
        else:
            self.bank = synth.ImageBank(images, device, variants=variants)
        self.generator = torch.Generator(device=device).manual_seed(seed)  # after the fork
        # Gray images of a colour net's bank (three equal planes) get equal noise per plane.
        gray = [image.ndim == 3 and degrade.is_gray(image) for image in images]
        self.gray_images = torch.tensor(gray, device=device)
        mixture = recipe.mixture
        self.mixture_weights = torch.tensor([mixture.clean, mixture.noise, mixture.jpeg],
                                            device=device)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        recipe, generator = self.recipe, self.generator
        crops = self.bank.sample(recipe.patch, recipe.batch, generator, recipe.permute_channels)
        clean = synth.to_float(crops["clean"])
        shared = self.gray_images[crops["image"]]
        if recipe.task == "denoise":
            return clean, synth.add_noise(clean, recipe.sigma_range, generator, shared)
        if recipe.task == "sr":
            return clean, crops["low"].float()
        count = clean.shape[0]
        pick = torch.randint(len(recipe.qualities), (count,), device=clean.device,
                             generator=generator)
        jpeg = synth.to_float(crops["variant"][pick, torch.arange(count, device=clean.device)])
        if recipe.task == "jpeg":
            return clean, jpeg
        kind = torch.multinomial(self.mixture_weights, count, replacement=True, generator=generator)
        noisy = synth.add_noise(clean, recipe.sigma_range, generator, shared)
        kind = kind[:, None, None, None]
        return clean, torch.where(kind == 0, clean, torch.where(kind == 1, noisy, jpeg))


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
                f"{platform.system()}")
    return f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def train_recipe(name: str, data: str | Path, out_dir: str | Path, minutes: float,
                 device: str = "auto", init: str | None = None, lr: float | None = None,
                 seed: int = 0, val_seconds: float = 150.0, workers: int = 4,
                 command: str | None = None, batch: int | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train recipe ``name`` for ``minutes`` of wall time; returns the provenance it saved."""
    recipe = RECIPES[name]
    if batch:
        recipe = dataclasses.replace(recipe, batch=batch)
    data = Path(data)
    out = Path(out_dir) / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    torch.manual_seed(seed)
    setup_started = time.perf_counter()
    images = load_training_images(data, recipe)
    batches = Batches(recipe, images, device, seed, workers)
    net = build_net(recipe.net)
    init_info = None
    if init:
        start = load_model(init)
        if build_net(start.spec).state_dict().keys() != net.state_dict().keys():
            raise ValueError(f"{init} holds net {start.spec}, not the recipe's {recipe.net}")
        net.load_state_dict(start.net.state_dict())
        init_info = {"uri": str(init), "sha256": start.sha256,
                     "steps": start.provenance.get("steps_total", start.provenance.get("steps")),
                     "wall_seconds": start.provenance.get("wall_seconds_total")}
    cuda = device.type == "cuda"
    net = net.to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    ema = build_net(recipe.net).to(device)
    ema.load_state_dict(net.state_dict())
    ema.eval().requires_grad_(False)
    base_lr = lr or recipe.lr
    optimizer = torch.optim.Adam(net.parameters(), lr=base_lr)
    autocast = torch.bfloat16 if cuda else None
    provenance: dict[str, Any] = {
        "recipe": name, "command": command or shlex.join([sys.executable] + sys.argv),
        "config": {**asdict(recipe), "lr": base_lr, "seed": seed},
        "data": {"train": list(recipe.train), "train_images": len(images)},
        "hardware": hardware(device), "parameters": count_parameters(net), "init": init_info,
    }
    history: list[dict[str, Any]] = []
    setup_seconds = time.perf_counter() - setup_started
    log.info("%s: %s, %d parameters, %d training images, setup %.0f s on %s", name, recipe.net,
             count_parameters(net), len(images), setup_seconds, device)
    budget = minutes * 60.0
    started = time.perf_counter()
    last_val = started
    step, running = 0, 0.0
    good = {"step": 0, "net": {k: v.clone() for k, v in net.state_dict().items()},
            "ema": {k: v.clone() for k, v in ema.state_dict().items()}}
    prior_steps = (init_info or {}).get("steps") or 0
    prior_wall = (init_info or {}).get("wall_seconds") or 0.0

    def checkpoint() -> None:
        wall = time.perf_counter() - started
        record = {"step": step, "wall_seconds": round(wall, 1),
                  "validation": [v.run(ema, data) for v in recipe.validation]}
        history.append(record)
        provenance.update(steps=step, wall_seconds=round(wall, 1),
                          steps_total=prior_steps + step,
                          wall_seconds_total=round(prior_wall + wall, 1), history=history)
        save_model(str(out), ema, provenance)
        log.info("%s step %d (%.0f s): %s", name, step, wall, json.dumps(record["validation"]))
        if progress:
            progress(record)

    while True:
        elapsed = time.perf_counter() - started
        if elapsed >= budget:
            break
        scale = min(1.0, (step + 1) / recipe.warmup)
        cosine = cosine_lr(base_lr, recipe.min_lr, elapsed / budget)
        for group in optimizer.param_groups:
            group["lr"] = cosine * scale
        clean, degraded = batches()
        if cuda:
            degraded = degraded.contiguous(memory_format=torch.channels_last)
        loss = train_step(net, optimizer, clean, degraded, recipe.loss, autocast)
        if not math.isfinite(loss):  # diverged: back to the last good weights, half the rate
            base_lr /= 2
            log.warning("%s: loss %s at step %d; back to step %d's weights, peak lr %.1e",
                        name, loss, step, good["step"], base_lr)
            net.load_state_dict(good["net"])
            ema.load_state_dict(good["ema"])
            optimizer = torch.optim.Adam(net.parameters(), lr=base_lr)
            continue
        running += loss
        with torch.no_grad():
            for mine, theirs in zip(ema.parameters(), net.parameters()):
                mine.lerp_(theirs, 1 - recipe.ema)
        step += 1
        if step % 200 == 0:
            good = {"step": step, "net": {k: v.clone() for k, v in net.state_dict().items()},
                    "ema": {k: v.clone() for k, v in ema.state_dict().items()}}
            log.info("%s step %d loss %.5f lr %.2e %.1f steps/s", name, step, running / 200,
                     optimizer.param_groups[0]["lr"], step / (time.perf_counter() - started))
            running = 0.0
        if time.perf_counter() - last_val >= val_seconds:
            checkpoint()
            last_val = time.perf_counter()
    checkpoint()
    return provenance


ZOO_DIR = Path(__file__).parent / "zoo"

# What each card measures: (set, evaluate keyword arguments), and the published figures beside.
CARD_EVALS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "denoise-gray": tuple(("set12", {"task": "denoise", "sigma": s, "baseline": "nlm"})
                          for s in (15, 25, 50)),
    "denoise-color": tuple(("set5", {"task": "denoise", "sigma": s, "baseline": "nlm"})
                           for s in (15, 25, 50)),
    "jpeg": tuple(("classic5", {"task": "jpeg", "quality": q}) for q in (10, 20, 30, 40)),
    "sr-x2": (("set5", {"task": "sr", "scale": 2}),),
    "sr-x4": (("set5", {"task": "sr", "scale": 4}),),
    "restore-default": (
        *(("set12", {"task": "denoise", "sigma": s}) for s in (15, 25, 50)),
        ("set5", {"task": "denoise", "sigma": 25}),
        *(("classic5", {"task": "jpeg", "quality": q}) for q in (10, 20, 40))),
}

CARD_TEXT: dict[str, tuple[str, str]] = {  # (what it is, published figures and limits)
    "denoise-gray": (
        ("A **blind Gaussian denoiser for gray images** (never told the noise level; trained on "
        "sigma 0-55)."),
        ("Published, Set12 sigma 15 / 25 / 50: BM3D 32.37 / 29.97 / 26.72, DnCNN-S 32.86 / "
        "30.44 / 27.18, FFDNet 32.75 / 30.43 / 27.32 (the papers' tables). Limits: additive "
        "white Gaussian noise only; Set12 was the validation set during training (no model "
        "selection on it: the last weights are shipped), so held-out figures may be a little "
        "lower; a colour image is denoised plane by plane.")),
    "denoise-color": (
        "A **blind Gaussian denoiser for RGB images** (sigma 0-55, independent per plane).",
        ("Trained on only 32 colour images (mcmaster, set14), so augmented hard: 8 flips/"
        "rotations, random plane order, copies shrunk to 0.8/0.6/0.4. Set5 was the validation "
        "set (last weights shipped). Limits: white Gaussian noise only, not camera noise "
        "(which is spatially and chromatically correlated).")),
    "jpeg": (
        ("A **JPEG deblocking net for gray images** (quality 10-40, Pillow/libjpeg tables); "
        "a colour image is restored plane by plane."),
        ("Published, classic5 quality 10 / 20 / 30 / 40: ARCNN 29.03 / 31.15 / 32.51 / 33.34, "
        "DnCNN-3 29.40 / 31.63 / 32.91 / 33.77. Limits: trained on gray JPEG only (colour "
        "JPEG's 4:2:0 chroma artifacts are not modelled; use restore-default for colour); "
        "classic5 was the validation set (last weights shipped).")),
    "sr-x2": (
        ("**x2 super-resolution** of one plane (a colour image is upscaled plane by plane), "
        "for images shrunk with MATLAB's bicubic `imresize`."),
        ("Published, Set5 x2 (Y): bicubic 33.66, SRCNN 36.66, DnCNN-3 37.58. Limits: learns the "
        "inverse of one known blur-and-decimate (MATLAB bicubic); real camera images or other "
        "resamplers fare worse; Set5 was the validation set (last weights shipped).")),
    "sr-x4": (
        ("**x4 super-resolution** of one plane (a colour image is upscaled plane by plane), "
        "for images shrunk with MATLAB's bicubic `imresize`."),
        "Published, Set5 x4 (Y): bicubic 28.42, SRCNN 30.48, DnCNN-3 31.40. Limits as sr-x2."),
    "restore-default": (
        ("The default model of `restorer restore`: **one blind RGB net for gray and colour "
        "images** with Gaussian noise (sigma 0-50) or JPEG artifacts (quality 10-90), which "
        "also leaves clean images nearly alone; `--strength 0..1` blends its output with the "
        "input."),
        ("A gray image is shown to it as three equal planes (with equal noise, as a gray file "
        "has) and the mean of its output planes is kept, exactly as the pipeline does. It is "
        "a generalist: the specialists (denoise-gray, denoise-color, jpeg) are better at their "
        "own task. Limits: not trained on noise followed by JPEG, blur or camera noise.")),
}


def measure_card_table(name: str, model: Any, data: Path) -> list[dict[str, Any]]:
    """The card's evaluations of ``model`` (see ``CARD_EVALS``), as table rows."""
    rows = []
    for folder, kwargs in CARD_EVALS[name]:
        result = evaluate(model, data / folder, **kwargs)
        setting = {"denoise": "sigma {sigma}", "jpeg": "quality {quality}",
                   "sr": "x{scale}"}[kwargs["task"]].format(**kwargs)
        flags = " ".join(f"--{k} {v}" for k, v in kwargs.items())
        rows.append({"set": folder, "setting": setting, "count": result["count"],
                     "input_psnr": result["input_psnr"], "psnr": result["psnr"],
                     "ssim": result["ssim"], "baseline_psnr": result.get("baseline_psnr"),
                     "command": f"restorer eval --model {name} --data DATA/{folder} {flags}"})
    return rows


def _card(name: str, path: Path, sha256: str, provenance: dict[str, Any],
          stages: list[dict[str, Any]], table: list[dict[str, Any]], net: torch.nn.Module
          ) -> str:
    what, notes = CARD_TEXT[name]
    recipe = RECIPES[name]
    spec = json.dumps(recipe.net)
    lines = [f"# {name}", "", what, "", "| | |", "| --- | --- |",
             (f"| file | `{path.name}` ({path.stat().st_size:,} bytes, weights stored as float16, "
             f"sha256 `{sha256}`) |"),
             (f"| net | `{spec}`; {provenance['parameters']:,} parameters; receptive field "
             f"{net.receptive_field} px |"),
             (f"| input / output | float32 NCHW `[0, 1]`, {recipe.channels} plane(s); output "
             f"{net.scale}x the input's size |"),
             f"| learnt | {_learnt(recipe)} |",
             (f"| training data | {', '.join(recipe.train)} (`../shared/data`), random "
             f"{recipe.patch}x{recipe.patch} crops{' (low-resolution side)' if recipe.task == 'sr' else ''}"
             f", 8 flips/rotations |"),
             (f"| training | {sum(s['steps'] for s in stages):,} steps, "
             f"{sum(s['wall_seconds'] for s in stages) / 60:.1f} minutes on "
             f"{stages[-1]['hardware']} |"), "",
             "## How it was trained", "",
             ("`python -m restorer.recipes` (plain PyTorch around `restorer.train.train_step`, "
             "batches made on the GPU by `restorer.synth`, bf16 autocast, channels_last, Adam "
             "with warm-up and cosine decay, L1 loss, EMA 0.999 of the weights shipped), from "
             "the repository root on a leased GPU machine where `.data` was a copy of "
             "`../shared/data`. Stages (each continues the previous one's weights):"), ""]
    for index, stage in enumerate(stages, 1):
        last = stage["history"][-1]["validation"]
        lines += [f"{index}. `{stage['command']}` — {stage['steps']:,} steps of "
                  f"{stage['config']['batch']} crops, {stage['wall_seconds']:.0f} s, peak lr "
                  f"{stage['config']['lr']:g}; validation at the end: "
                  + "; ".join(f"{v['set']} {_setting(v)} {v['psnr']:.2f} dB" for v in last)]
    lines += ["", "## Measured", "",
              "Measured on the shipped file with `restorer eval` on a 2-core x86_64 CPU "
              "(torch CPU), in the conventions of `../shared/data/README.md` (noise seeded per "
              "image, unclipped; output rounded to uint8; JPEG on Y for colour images; SR on Y "
              "with the border cropped by the scale). Input = the degraded image as saved "
              "(bicubic upscale for SR)"
              + ("; NLM = scikit-image non-local means told the true sigma" if any(
                  r["baseline_psnr"] is not None for r in table) else "") + ".", ""]
    header = "| set | setting | images | input PSNR | **PSNR** | SSIM |"
    rule = "| --- | --- | --- | --- | --- | --- |"
    if any(r["baseline_psnr"] is not None for r in table):
        header, rule = header + " NLM PSNR |", rule + " --- |"
    lines += [header, rule]
    for r in table:
        row = (f"| {r['set']} | {r['setting']} | {r['count']} | {r['input_psnr']:.2f} | "
               f"**{r['psnr']:.2f}** | {r['ssim']:.4f} |")
        if r["baseline_psnr"] is not None:
            row += f" {r['baseline_psnr']:.2f} |"
        lines.append(row)
    lines += ["", "Commands (DATA = `../shared/data`):", "", "```"]
    lines += [r["command"] for r in table]
    lines += ["```", "", "## Notes", "", notes, ""]
    return "\n".join(lines)


def _setting(validation: dict[str, Any]) -> str:
    if validation["task"] == "denoise":
        return f"sigma {validation['sigma']:g}"
    if validation["task"] == "jpeg":
        return f"q{validation['quality']}"
    return f"x{validation['scale']}"


def _learnt(recipe: Recipe) -> str:
    if recipe.task == "denoise":
        return (f"additive white Gaussian noise, sigma uniform in {list(recipe.sigma_range)} "
                "(0-255 scale) per crop, unclipped")
    if recipe.task == "jpeg":
        return f"Pillow JPEG, quality uniform in {min(recipe.qualities)}-{max(recipe.qualities)}"
    if recipe.task == "sr":
        return f"MATLAB bicubic downscale by {recipe.net['scale']} (unrounded)"
    mix = recipe.mixture
    return (f"per crop: clean ({mix.clean:.0%}), Gaussian noise sigma in "
            f"{list(recipe.sigma_range)} ({mix.noise:.0%}), or JPEG quality "
            f"{min(recipe.qualities)}-{max(recipe.qualities)} ({mix.jpeg:.0%})")


def ship(name: str, stages: Sequence[str | Path], data: str | Path,
         zoo_dir: str | Path = ZOO_DIR) -> Path:
    """Put the last of ``stages`` (model files of one recipe's successive runs) into the zoo:
    weights as float16 (``ZOO/NAME.safetensors``, provenance with every stage's summary) and a
    card ``ZOO/NAME.md`` with the evaluation table measured now on this machine."""
    loaded = [load_model(str(stage)) for stage in stages]
    if any(m.provenance.get("recipe") != name for m in loaded):
        raise ValueError(f"every stage must come from recipe {name!r}")
    summaries = [{k: v for k, v in m.provenance.items() if k != "init"} for m in loaded]
    final = loaded[-1]
    provenance = {**final.provenance, "stages": [
        {k: v for k, v in s.items() if k not in ("config", "history")} for s in summaries]}
    path = Path(zoo_dir) / f"{name}.safetensors"
    sha256 = save_model(str(path), final.net, provenance, dtype=torch.float16)
    shipped = load_model(str(path))
    table = measure_card_table(name, shipped, Path(data))
    card = _card(name, path, sha256, provenance, summaries, table, shipped.net)
    path.with_suffix(".md").write_text(card)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m restorer.recipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(RECIPES), help="the zoo model to train")
    parser.add_argument("--ship", nargs="+", metavar="MODEL",
                        help="instead of training: put the last of these stage files into the "
                             "zoo as float16 with a card measured now")
    parser.add_argument("--data", default="../shared/data", help="folder holding the sets")
    parser.add_argument("--out", help="folder for NAME.safetensors")
    parser.add_argument("--minutes", type=float, help="wall-time budget")
    parser.add_argument("--init", help="a model file to continue from (weights only)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    parser.add_argument("--batch", type=int, help="crops per step (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--val-seconds", type=float, default=150.0)
    parser.add_argument("--workers", type=int, default=4, help="processes that bank JPEGs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.ship:
        log.info("shipped %s and its card", ship(args.name, args.ship, args.data))
        return
    if not args.out or not args.minutes:
        parser.error("training needs --out and --minutes")
    train_recipe(args.name, args.data, args.out, args.minutes, args.device, args.init, args.lr,
                 args.seed, args.val_seconds, args.workers, batch=args.batch,
                 command=shlex.join(["python", "-m", "restorer.recipes"]
                                    + list(argv if argv is not None else sys.argv[1:])))


if __name__ == "__main__":
    main()


__all__ = ["CARD_EVALS", "RECIPES", "Batches", "Recipe", "Validation", "main", "ship",
           "train_recipe"]
