"""The recipes that train the bundled zoo, runnable on one GPU without Ray.

Each recipe fixes a net, its data split (folders of ``shared/data``, see its README), the
degradation it learns and its validation. Training is plain PyTorch: the training core
(:class:`restorer.train.core.Trainer`) with batches made on the device by
:mod:`restorer.train.synth`; bf16 autocast and channels_last on CUDA; an exponential moving average
(EMA) of the parameters is what gets validated and saved. It runs for a wall-time budget (so that it
fits a leased GPU's 10-minute calls): the learning rate warms up over ``warmup`` steps and follows
a cosine over the budget. It continues from a saved model with ``--init`` (weights only: Adam
restarts, with its warm-up, at ``--lr``). Every ``--val-seconds`` and at the end it validates with
:func:`restorer.quality.evaluate.evaluate` and writes ``OUT/NAME.safetensors`` with its provenance.
``--ship`` writes the model card from the templates in ``restorer/zoo/cards/``.

    python -m restorer.train.recipes denoise-gray --data ../shared/data --out zoo-out --minutes 8
    python -m restorer.train.recipes denoise-gray --data ../shared/data --out zoo-out --minutes 8 \\
        --init zoo-out/denoise-gray.safetensors --lr 2e-4

On a CPU the same command works (slowly); ``restorer train`` is the Ray Train path for
clusters.

Size: one recipe table and the loop that runs it, with the card it writes; the training maths
is :mod:`restorer.train.core`, the prose :mod:`restorer.zoo` templates.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import json
import logging
import math
import platform
import shlex
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from restorer.image import degrade
from restorer.nets import build_net
from restorer.nets.noisemap import from_unet
from restorer.pipeline.actor import cpu_has_bf16
from restorer.quality.evaluate import evaluate, evaluate_pairs, image_files, read_image
from restorer.train import synth
from restorer.train.core import EMA, Precision, Schedule, Trainer, precision_for
from restorer.weights.checkpoint import count_parameters, load_model, save_model

log = logging.getLogger(__name__)

TASKS = ("denoise", "jpeg", "sr", "mixture", "practical")
LOG_EVERY = 50  # steps between progress lines (and snapshots to fall back on)


@dataclass(frozen=True)
class Validation:
    folder: str  # a folder of shared/data
    task: str  # restorer.quality.evaluate task: denoise, jpeg, sr; or pairs (evaluate_pairs)
    sigma: float = 25.0
    quality: int | None = None
    scale: int | None = None

    def run(self, net: torch.nn.Module, data: Path) -> dict[str, Any]:
        if self.task == "pairs":  # real noisy / clean pairs (cc15): the 8-bit files as given
            result = evaluate_pairs(net, data / self.folder, through="net")
            return {"set": self.folder, "task": "pairs", "psnr": round(result["psnr"], 3),
                    "ssim": round(result["ssim"], 4),
                    "input_psnr": round(result["input_psnr"], 3)}
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
    task: str  # denoise | jpeg | sr | mixture | practical (a noise-map net, CPU-made pairs)
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
    practical: synth.PracticalMixture = field(default_factory=synth.PracticalMixture)
    # parameter ranges of the practical crops' degradations (restorer.image.degrade)
    degradation: degrade.PracticalConfig = field(default_factory=degrade.PracticalConfig)
    estimator_lr_scale: float = 3.0  # a noise-map net's estimator learns at this multiple
    # share of a noise-map net's batch restored with the true map (the rest with its estimate)
    map_true_share: float = 0.5
    # the image loss's gradient reaches a noise-map net's estimator through its map (end to end,
    # as CBDNet); False: the estimator learns from the map loss alone (train.noise_map_step)
    map_grad: bool = True
    # weight of the map loss (train.asymmetric_map_loss) beside the image loss; 0 with the trunk
    # frozen and map_grad: the estimator learns the map the trunk restores best with
    map_weight: float = 1.0
    # parts of the net (its attributes, e.g. "trunk") that keep their weights: no gradient and
    # not in the optimizer (a tiny learning rate is no freeze: Adam moves every weight by ~lr a
    # step whatever its gradient); ``--set freeze=trunk``
    freeze: tuple[str, ...] = ()
    # the zoo name its shipped file takes (its card and evaluations are that name's), when it is
    # the next version of a bundled model; None = the recipe's own name
    ships_as: str | None = None
    # Not trained itself: an opponent net (restorer.nets.opponent) whose trunk is the shipped
    # net of this recipe; ``--ship`` takes that recipe's stage files.
    trunk_of: str | None = None

    def __post_init__(self):
        if not self.map_weight >= 0:
            raise ValueError(f"map_weight {self.map_weight}: give a weight >= 0")
        if self.map_weight == 0 and not self.map_grad:
            raise ValueError("map_weight=0 with map_grad=false leaves a noise-map net's "
                             "estimator nothing to learn from: give map_weight > 0, or "
                             "map_grad=true to teach it through the image loss")

    @property
    def channels(self) -> int:
        return 3 if self.net["arch"] == "opponent" else self.net.get("channels", 1)


RECIPES: dict[str, Recipe] = {
    # Blind gray denoiser, DnCNN-S's data: train400, validated on Set12.
    "denoise-gray": Recipe(
        net={"arch": "unet", "channels": 1, "features": [32, 64, 128, 256], "blocks": 2},
        train=("train400",), task="denoise", sigma_range=(0.0, 55.0),
        validation=(Validation("set12", "denoise", sigma=15),
                    Validation("set12", "denoise", sigma=25),
                    Validation("set12", "denoise", sigma=50))),
    # Blind colour denoiser: denoise-gray's net run on the three opponent planes of an RGB
    # image (luma and two colour differences, noise independent across them). It beat a
    # U-Net trained on the 32 colour images we have (mcmaster, set14) by 0.5-0.6 dB on Set5,
    # and CBM3D; validated on Set5 (and mcmaster, which its trunk never saw).
    "denoise-color": Recipe(
        net={"arch": "opponent", "trunk": {"arch": "unet", "channels": 1,
                                           "features": [32, 64, 128, 256], "blocks": 2}},
        train=("train400",), task="denoise", sigma_range=(0.0, 55.0), trunk_of="denoise-gray",
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
    # The next default of `restorer restore` (ships as restore-default once a stage meets the
    # card's bounds; stages in zoo/stages/README.md): one noise-aware RGB net for gray (three
    # equal planes) and colour photos as cameras and the web make them (restorer.image.degrade's
    # practical degradations: camera noise, blur, resizing, JPEG once or twice), plus clean crops,
    # white Gaussian noise 0-50 and JPEG 10-90 alone. Continues the former blind U-Net (its weights
    # are the trunk's; the noise map's are new). Validated on real camera pairs (cc15).
    "restore-photo": Recipe(
        ships_as="restore-default",
        net={"arch": "noisemap", "channels": 3, "estimator_features": 24,
             "estimator_layers": 4, "estimator_window": 0, "chroma_features": 0,
             "chroma_layers": 6, "chroma_scale": 4, "chroma_leak": 0.0,
             "trunk": {"arch": "unet", "channels": 3, "features": [32, 64, 128, 256],
                       "blocks": 2, "guide_channels": 3}},
        train=("urban100", "sunhays80", "train400"), task="practical", patch=64, batch=16,
        lr=1e-4, warmup=100, map_true_share=0.0,
        practical=synth.PracticalMixture(clean=0.1, gaussian=0.15, jpeg=0.2, practical=0.55),
        validation=(Validation("cc15", "pairs"), Validation("set5", "denoise", sigma=25),
                    Validation("classic5", "jpeg", quality=20),
                    Validation("set5", "denoise", sigma=0))),  # clean photos left alone
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
                 seed: int, workers: int | None = None):
        self.device = device
        self.recipe = recipe
        self.pairs: synth.PracticalPairs | None = None
        if recipe.task == "practical":  # made on the CPU (restorer.image.degrade), ahead
            self.pairs = synth.PracticalPairs(images, recipe.patch, recipe.batch, seed,
                                              recipe.practical, recipe.degradation,
                                              workers=pair_workers(workers, device),
                                              pin_memory=device.type == "cuda")
            return
        variants: list[list[np.ndarray]] = []
        if recipe.task in ("jpeg", "mixture"):
            variants = synth.jpeg_variants(images, recipe.qualities,
                                           4 if workers is None else max(workers, 1))
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

    def __call__(self) -> tuple[torch.Tensor, ...]:
        """``(clean, degraded)``, and the true noise map third for a practical recipe."""
        recipe = self.recipe
        if self.pairs is not None:
            return tuple(t.to(self.device, non_blocking=True) for t in self.pairs())
        generator = self.generator
        crops = self.bank.sample(recipe.patch, recipe.batch, generator, recipe.permute_channels)
        clean = synth.float_batch(crops["clean"])
        shared = self.gray_images[crops["image"]]
        if recipe.task == "denoise":
            return clean, synth.add_noise(clean, recipe.sigma_range, generator, shared)
        if recipe.task == "sr":
            return clean, crops["low"].float()
        count = clean.shape[0]
        pick = torch.randint(len(recipe.qualities), (count,), device=clean.device,
                             generator=generator)
        jpeg = synth.float_batch(crops["variant"][pick, torch.arange(count, device=clean.device)])
        if recipe.task == "jpeg":
            return clean, jpeg
        kind = torch.multinomial(self.mixture_weights, count, replacement=True, generator=generator)
        noisy = synth.add_noise(clean, recipe.sigma_range, generator, shared)
        kind = kind[:, None, None, None]
        return clean, torch.where(kind == 0, clean, torch.where(kind == 1, noisy, jpeg))

    def close(self) -> None:
        """Stop the processes or the thread making a practical recipe's pairs."""
        if self.pairs is not None:
            self.pairs.close()


def pair_workers(workers: int | None, device: torch.device) -> int:
    """Processes making a practical recipe's pairs: ``workers`` if given (0: one thread in the
    training process); by default none on a CPU (its cores train) and, on a GPU, the host's
    cores less two (the training loop and the copy to the GPU), at most 16."""
    if workers is not None:
        return workers
    if device.type == "cpu":
        return 0
    import os

    return max(1, min(16, len(os.sched_getaffinity(0)) - 2))


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
                f"{platform.system()}")
    return (f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), "
            f"torch {torch.__version__}")


def _freeze(net: torch.nn.Module, parts: Sequence[str]) -> None:
    """Stop the gradient of each named part of ``net`` (``Recipe.freeze``)."""
    children = [name for name, _ in net.named_children()]
    for name in (part for part in parts if part):
        if name not in children:
            raise ValueError(f"freeze: {type(net).__name__} has no part {name!r}; its parts: "
                             f"{children}")
        getattr(net, name).requires_grad_(False)


def _optimizer(net: torch.nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """Adam over the parameters that train (see :func:`_freeze`); a noise-map net's new
    estimator at ``recipe.estimator_lr_scale`` times the rate."""
    training = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    if not training:
        raise ValueError(f"freeze {list(recipe.freeze)} leaves nothing of the net to train")
    if getattr(net, "estimator", None) is None:
        return torch.optim.Adam([p for _, p in training], lr=lr)
    groups = [{"params": [p for name, p in training if not name.startswith("estimator.")]},
              {"params": [p for name, p in training if name.startswith("estimator.")],
               "lr_scale": recipe.estimator_lr_scale}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr)


def _parsed_like(current: Any, text: str, key: str) -> Any:
    """``text`` as a value of ``current``'s type (a tuple or a net spec's list:
    comma-separated, like its items)."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        if isinstance(current, tuple | list):
            kinds = [type(item) for item in current] or [str]
            return type(current)(kinds[min(i, len(kinds) - 1)](item.strip())
                                 for i, item in enumerate(text.split(",")))
        if current is None:
            return text
        return type(current)(text)
    except ValueError:
        raise ValueError(f"--set {key}={text}: not a {type(current).__name__} like "
                         f"{current!r}") from None


def override(recipe: Recipe, setting: str) -> Recipe:
    """``recipe`` with one field changed by ``setting``, ``KEY=VALUE`` where KEY names a field
    of the recipe or, dotted, of one of its parts (``practical.clean=0.25``,
    ``degradation.blur_sigma=0.3,1.5``) or of the net's spec (``net.estimator_layers=8``);
    unknown keys are refused with the known ones."""
    key, sep, text = setting.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {setting!r}: write KEY=VALUE, e.g. practical.clean=0.25")

    def replaced(obj: Any, path: list[str]) -> Any:
        is_spec = isinstance(obj, dict)
        names = list(obj) if is_spec else [f.name for f in dataclasses.fields(obj)]
        if path[0] not in names:
            raise ValueError(f"--set {key}: {'the net spec' if is_spec else type(obj).__name__}"
                             f" has no field {path[0]!r}; choose from {names}")
        current = obj[path[0]] if is_spec else getattr(obj, path[0])
        if len(path) > 1:
            if not (dataclasses.is_dataclass(current) or isinstance(current, dict)):
                raise ValueError(f"--set {key}: {path[0]!r} has no fields")
            value = replaced(current, path[1:])
        elif dataclasses.is_dataclass(current) or isinstance(current, dict):
            raise ValueError(f"--set {key}: set one of its fields, e.g. {key}.NAME=VALUE")
        else:
            value = _parsed_like(current, text, key)
        if is_spec:
            return {**obj, path[0]: value}
        return dataclasses.replace(obj, **{path[0]: value})

    return replaced(recipe, key.split("."))


def _as_trained(name: str, settings: Sequence[str], batch: int | None, patch: int | None,
                estimator_lr_scale: float | None) -> Recipe:
    """Recipe ``name`` as :func:`train_recipe` trains it: its ``settings`` (:func:`override`)
    and the command line's batch, patch and estimator rate applied; a recipe that is not
    trained itself (an opponent net runs another's trunk) is refused naming what to train."""
    recipe = RECIPES[name]
    for setting in settings:
        recipe = override(recipe, setting)
    if recipe.trunk_of:
        raise ValueError(f"{name} is not trained itself: its net runs {recipe.trunk_of}'s on "
                         f"opponent planes; train {recipe.trunk_of}, then `python -m "
                         f"restorer.train.recipes {name} --ship` its stage files")
    if batch:
        recipe = dataclasses.replace(recipe, batch=batch)
    if patch:
        recipe = dataclasses.replace(recipe, patch=patch)
    if estimator_lr_scale:
        recipe = dataclasses.replace(recipe, estimator_lr_scale=estimator_lr_scale)
    return recipe


def _recipe_net(recipe: Recipe, init: str | None
                ) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The recipe's net, with ``init``'s weights when given (a U-Net becomes a noise-map
    net's trunk, :func:`restorer.nets.noisemap.from_unet`; a noise-map net whose estimator
    is not the recipe's shape gives its trunk only, e.g. ``--set net.estimator_layers=8``
    widens it; a part init lacks, e.g. a chroma branch, starts anew), and what the provenance
    records of ``init`` (None without one)."""
    net = build_net(recipe.net)
    if not init:
        return net, None
    start = load_model(init)
    if recipe.net["arch"] == "noisemap" and start.spec["arch"] == "unet":
        start = dataclasses.replace(start, net=from_unet(start.net.float(), net.config))
    if _shapes(start.net) == _shapes(net):
        net.load_state_dict(start.net.state_dict())
    elif (start.spec["arch"] == recipe.net["arch"] == "noisemap"
          and _shapes(start.net.trunk) == _shapes(net.trunk)):
        anew = []  # the parts of the recipe's net that init lacks or holds in another shape
        for part, module in net.named_children():
            given = getattr(start.net, part, None)
            if given is not None and _shapes(given) == _shapes(module):
                module.load_state_dict(given.state_dict())
            else:
                anew.append(part)
        log.info("%s: its trunk continues; %s start anew (estimator: init's %s, the recipe's "
                 "%s)", init, anew, _estimator_shape(start.net), _estimator_shape(net))
    else:
        raise ValueError(f"{init} holds net {start.spec}, not the recipe's {recipe.net}")
    return net, {"uri": str(init), "sha256": start.sha256,
                 "steps": start.provenance.get("steps_total", start.provenance.get("steps")),
                 "wall_seconds": start.provenance.get("wall_seconds_total")}


def _estimator_shape(net: torch.nn.Module) -> str:
    config = net.config
    return (f"{config.estimator_layers} layers x {config.estimator_features}, window "
            f"{config.estimator_window}")


def _shapes(net: torch.nn.Module) -> dict[str, torch.Size]:
    return {key: value.shape for key, value in net.state_dict().items()}


def _snapshot(step: int, net: torch.nn.Module, ema: torch.nn.Module) -> dict[str, Any]:
    """Copies of the net's and the EMA's weights at ``step``: where a diverged run goes back."""
    return {"step": step, "net": {k: v.clone() for k, v in net.state_dict().items()},
            "ema": {k: v.clone() for k, v in ema.state_dict().items()}}


def _provenance(name: str, recipe: Recipe, command: str | None, lr: float, seed: int,
                images: int, device: torch.device, net: torch.nn.Module,
                init_info: dict[str, Any] | None, bf16: bool) -> dict[str, Any]:
    """What a stage's model file says of how it was made, before its steps and history."""
    return {
        "recipe": name, "command": command or shlex.join([sys.executable] + sys.argv),
        "config": {**asdict(recipe), "lr": lr, "seed": seed},
        "data": {"train": list(recipe.train), "train_images": images},
        "hardware": hardware(device), "parameters": count_parameters(net), "init": init_info,
        "precision": "bf16" if bf16 else "fp32",
    }


def train_recipe(name: str, data: str | Path, out_dir: str | Path, minutes: float,
                 device: str = "auto", init: str | None = None, lr: float | None = None,
                 seed: int = 0, val_seconds: float = 150.0, workers: int | None = None,
                 command: str | None = None, batch: int | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None,
                 keep_checkpoints: bool = False, estimator_lr_scale: float | None = None,
                 patch: int | None = None, settings: Sequence[str] = (),
                 precision_name: str | None = None) -> dict[str, Any]:
    """Train recipe ``name`` for ``minutes`` of wall time; returns the provenance it saved.
    With ``keep_checkpoints`` every validation's weights also stay as ``NAME-stepN`` beside
    the final file (a stage is then chosen by its whole history, not only its end).
    ``settings`` change the recipe's fields first (:func:`override`); the provenance's config
    records the recipe as trained. ``precision_name`` (auto, fp32, bf16; default: bf16 on
    CUDA and on CPUs with native bf16) is how the steps compute
    (:func:`restorer.train.core.precision_for`)."""
    recipe = _as_trained(name, settings, batch, patch, estimator_lr_scale)
    data = Path(data)
    out = Path(out_dir) / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    torch.manual_seed(seed)
    setup_started = time.perf_counter()
    images = load_training_images(data, recipe)
    batches = Batches(recipe, images, device, seed, workers)  # its processes fork before CUDA
    net, init_info = _recipe_net(recipe, init)
    net, precision = _on_device(net, recipe, device, precision_name)
    base_lr = lr or recipe.lr
    # the EMA averages the parameters only (buffers keep their initial values)
    trainer = Trainer(net, _optimizer(net, recipe, base_lr), recipe.loss,
                      precision, EMA(net, recipe.ema, buffers=False))
    schedule = Schedule(base_lr, recipe.min_lr, recipe.warmup)  # by wall time, warm-up by step
    provenance = _provenance(name, recipe, command, base_lr, seed, len(images), device, net,
                             init_info, precision.autocast is not None)
    setup_seconds = time.perf_counter() - setup_started
    log.info("%s: %s, %d parameters, %d training images, setup %.0f s on %s", name, recipe.net,
             count_parameters(net), len(images), setup_seconds, device)
    checkpoint = _Checkpoints(name, out, recipe, data, provenance, init_info or {},
                              keep_checkpoints, progress)
    try:
        _run_steps(name, recipe, trainer, batches, schedule, minutes * 60.0, val_seconds,
                   checkpoint)
    finally:
        batches.close()
    return provenance


def _run_steps(name: str, recipe: Recipe, trainer: Trainer, batches: Batches,
               schedule: Schedule, budget: float, val_seconds: float,
               checkpoint: _Checkpoints) -> None:
    """Train for ``budget`` seconds of wall time, validating every ``val_seconds`` and at the
    end; a step whose loss is not finite goes back to the last good weights at half the rate.
    The progress lines say the share of the time spent waiting for batches (on a GPU: too few
    ``--workers`` making them)."""
    net, ema = trainer.net, trainer.averaged()
    base_lr = schedule.lr
    started = time.perf_counter()
    last_val = started
    step, running, waited = 0, 0.0, 0.0
    good = _snapshot(0, net, ema)
    while True:
        elapsed = time.perf_counter() - started
        if elapsed >= budget:
            break
        clean, degraded, *noise_map = batches()
        waited += time.perf_counter() - started - elapsed
        loss = trainer.step(clean, degraded, schedule(elapsed / budget, step), *noise_map,
                            true_share=recipe.map_true_share, map_grad=recipe.map_grad,
                            map_weight=recipe.map_weight)
        if not math.isfinite(loss):  # diverged: back to the last good weights, half the rate
            base_lr /= 2
            log.warning("%s: loss %s at step %d; back to step %d's weights, peak lr %.1e",
                        name, loss, step, good["step"], base_lr)
            net.load_state_dict(good["net"])
            ema.load_state_dict(good["ema"])
            trainer.optimizer = _optimizer(net, recipe, base_lr)
            schedule = dataclasses.replace(schedule, lr=base_lr)
            continue
        running += loss
        step += 1
        if step % LOG_EVERY == 0:
            good = _snapshot(step, net, ema)
            seconds = time.perf_counter() - started
            log.info("%s step %d loss %.5f lr %.2e %.1f steps/s, %.0f%% waiting for data", name,
                     step, running / LOG_EVERY, trainer.optimizer.param_groups[0]["lr"],
                     step / seconds, 100 * waited / seconds)
            running = 0.0
        if time.perf_counter() - last_val >= val_seconds:
            checkpoint(step, time.perf_counter() - started, ema)
            last_val = time.perf_counter()
    checkpoint(step, time.perf_counter() - started, ema)


def _on_device(net: torch.nn.Module, recipe: Recipe, device: torch.device,
               precision_name: str | None) -> tuple[torch.nn.Module, Precision]:
    """``net`` frozen where the recipe says, on ``device``, and how its steps compute: bf16
    autocast and channels_last on CUDA and on CPUs with native bf16 (2x the steps)."""
    precision = precision_for(device, precision_name or (
        "bf16" if device.type == "cpu" and cpu_has_bf16() else "auto"))
    _freeze(net, recipe.freeze)
    net = net.to(device)
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, precision


@dataclass
class _Checkpoints:
    """A run's validations: each validates the averaged net, adds to the history in the
    provenance (totals continue ``init``'s) and saves the model (``keep``: also as
    ``NAME-stepN`` in float16)."""

    name: str
    out: Path
    recipe: Recipe
    data: Path
    provenance: dict[str, Any]
    init_info: dict[str, Any]
    keep: bool
    progress: Callable[[dict[str, Any]], None] | None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, step: int, wall: float, ema: torch.nn.Module) -> None:
        record = {"step": step, "wall_seconds": round(wall, 1),
                  "validation": [v.run(ema, self.data) for v in self.recipe.validation]}
        self.history.append(record)
        self.provenance.update(
            steps=step, wall_seconds=round(wall, 1),
            steps_total=(self.init_info.get("steps") or 0) + step,
            wall_seconds_total=round((self.init_info.get("wall_seconds") or 0.0) + wall, 1),
            history=self.history)
        save_model(str(self.out), ema, self.provenance)
        if self.keep:
            save_model(str(self.out.with_name(f"{self.name}-step{step}.safetensors")), ema,
                       self.provenance, dtype=torch.float16)
        log.info("%s step %d (%.0f s): %s", self.name, step, wall,
                 json.dumps(record["validation"]))
        if self.progress:
            self.progress(record)


ZOO_DIR = Path(__file__).parent.parent / "zoo"

# Photos as cameras and browsers save them (8-bit, measured on RGB): restorer.quality.evaluate's
# photo tasks and JPEG alone, on colour sets no recipe trains on.
PHOTO_EVALS: tuple[dict[str, Any], ...] = (
    {"task": "noise+jpeg", "sigma": 15, "quality": 75},
    {"task": "jpeg", "quality": 30, "measure": "rgb"},
    {"task": "poisson", "shot": 0.004, "read_sigma": 2},
    {"task": "blur+noise", "blur": 1.2, "sigma": 3},
)
# Real camera noise (cc15 pairs, through the actor) on every denoising card.
REAL_PAIRS = ("cc15", {"task": "pairs"})

# What each card measures: (set, evaluate keyword arguments), and the published figures beside.
CARD_EVALS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "denoise-gray": (*(("set12", {"task": "denoise", "sigma": s, "baseline": "nlm"})
                       for s in (15, 25, 50)), REAL_PAIRS),
    "denoise-color": (*(("set5", {"task": "denoise", "sigma": s, "baseline": "nlm"})
                        for s in (15, 25, 50)), REAL_PAIRS),
    "jpeg": tuple(("classic5", {"task": "jpeg", "quality": q}) for q in (10, 20, 30, 40)),
    "sr-x2": (("set5", {"task": "sr", "scale": 2}),),
    "sr-x4": (("set5", {"task": "sr", "scale": 4}),),
    "restore-default": (
        ("cc15", {"task": "pairs"}),
        *(("mcmaster", kwargs) for kwargs in PHOTO_EVALS),
        *(("set5", kwargs) for kwargs in PHOTO_EVALS),
        ("set5", {"task": "denoise", "sigma": 0}),
        *(("set12", {"task": "denoise", "sigma": s}) for s in (15, 25, 50)),
        ("set5", {"task": "denoise", "sigma": 25}),
        *(("classic5", {"task": "jpeg", "quality": q}) for q in (10, 20, 40))),
}

# Edges and frames, on every denoising/JPEG card: odd-size crops made at run time (``--trim
# 1x3``: Set12 255x253 / 511x509), the outermost 16 px against the interior (``--edges``, with
# BM3D for the denoisers) and the photo inside a clean 48 px frame, black and mid-gray.
UNIFORMITY_EVALS: dict[str, tuple[str, dict[str, Any]]] = {
    "denoise-gray": ("set12", {"task": "denoise", "sigma": 25}),
    "denoise-color": ("set5", {"task": "denoise", "sigma": 25}),
    "restore-default": ("set12", {"task": "denoise", "sigma": 25}),
    "jpeg": ("classic5", {"task": "jpeg", "quality": 10}),
}
UNIFORMITY_VARIANTS = (("edges", {"edges": True}), ("black frame", {"frame": 0}),
                       ("gray frame", {"frame": 128}))
ODD_TRIM = (1, 3)

CARDS = importlib.resources.files("restorer") / "zoo" / "cards"  # card.md and text.toml
CARD_PROSE = tomllib.loads((CARDS / "text.toml").read_text(encoding="utf-8"))
# (what it is, published figures and limits) by model, from zoo/cards/text.toml
CARD_TEXT: dict[str, tuple[str, str]] = {
    name: (text["what"], text["notes"]) for name, text in CARD_PROSE["models"].items()}


def measure_card_table(name: str, model: Any, data: Path) -> list[dict[str, Any]]:
    """The card's evaluations of ``model`` (see ``CARD_EVALS``), as table rows."""
    rows = []
    for folder, kwargs in CARD_EVALS[name]:
        task = kwargs["task"]
        if task == "pairs":
            result = evaluate_pairs(model, data / folder)
            command = f"restorer eval --model {name} --pairs DATA/{folder}"
        else:
            arguments = dict(kwargs)
            if "read_sigma" in arguments:
                arguments["read"] = (arguments.pop("read_sigma") / 255.0) ** 2
            result = evaluate(model, data / folder, **arguments)
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in kwargs.items())
            command = f"restorer eval --model {name} --data DATA/{folder} {flags}"
        rows.append({"set": folder, "setting": _card_setting(kwargs, result),
                     "count": result["count"], "input_psnr": result["input_psnr"],
                     "psnr": result["psnr"], "ssim": result["ssim"],
                     "baseline_psnr": result.get("baseline_psnr"), "command": command})
    return rows


def _card_setting(kwargs: dict[str, Any], result: dict[str, Any]) -> str:
    """The "setting" cell of a card row, saying what the PSNR is measured on where it is not
    the whole image."""
    task = kwargs["task"]
    text = {"denoise": "sigma {sigma}", "jpeg": "quality {quality}", "sr": "x{scale}",
            "pairs": "real camera noise (RGB, through the actor)",
            "noise+jpeg": "noise sigma {sigma}, then JPEG q{quality} (8-bit, RGB)",
            "poisson": "Poisson-Gaussian, variance {shot} x + ({read_sigma}/255)^2 (8-bit, RGB)",
            "blur+noise": "blur {blur} px, then noise sigma {sigma} (8-bit, RGB)",
            }[task].format(**kwargs)
    if task == "denoise" and kwargs["sigma"] == 0:
        text = "clean (sigma 0): PSNR(output, input)"
    if task == "jpeg" and result.get("measured_on") == "RGB":
        text += " (RGB)"
    return text


def measure_uniformity_table(name: str, model: Any, data: Path) -> list[dict[str, Any]]:
    """The card's edge and frame measures of ``model`` (see ``UNIFORMITY_EVALS``), as rows;
    none for models without them (super-resolution)."""
    if name not in UNIFORMITY_EVALS:
        return []
    folder, kwargs = UNIFORMITY_EVALS[name]
    rows = []
    for variant, extra in UNIFORMITY_VARIANTS:
        baseline = "bm3d" if kwargs["task"] == "denoise" and "edges" in extra else None
        result = evaluate(model, data / folder, trim=ODD_TRIM, baseline=baseline,
                          **kwargs, **extra)
        level = {"denoise": "sigma {sigma}", "jpeg": "quality {quality}"}[kwargs["task"]]
        flags = " ".join([f"--trim {ODD_TRIM[0]}x{ODD_TRIM[1]}"]
                         + [f"--{k} {v}" for k, v in kwargs.items()]
                         + (["--edges"] if "edges" in extra else
                            [f"--frame {'black' if extra['frame'] == 0 else 'gray'}"])
                         + ([f"--baseline {baseline}"] if baseline else []))
        rows.append({"setting": f"{folder} {ODD_TRIM[0]}x{ODD_TRIM[1]}, "
                                f"{level.format(**kwargs)}, {variant}",
                     **{k: result.get(k) for k in (
                         "psnr", "band_psnr", "interior_psnr", "band_gap_mean", "band_gap_max",
                         "baseline_psnr", "baseline_band_psnr", "baseline_interior_psnr")},
                     "command": f"restorer eval --model {name} --data DATA/{folder} {flags}"})
    return rows


def _uniformity_section(rows: list[dict[str, Any]]) -> str:
    """The card's "Edges and frames" section (``[card] uniformity`` of ``text.toml``)."""
    if not rows:
        return ""
    lines = ["| set, setting | PSNR | band / interior | gap mean / worst | BM3D PSNR | "
             "BM3D band / interior |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        bm3d = ((f"{r['baseline_psnr']:.2f} | {r['baseline_band_psnr']:.2f} / "
                 f"{r['baseline_interior_psnr']:.2f}") if r["baseline_psnr"] is not None
                else " |")
        lines.append(f"| {r['setting']} | {r['psnr']:.2f} | {r['band_psnr']:.2f} / "
                     f"{r['interior_psnr']:.2f} | {r['band_gap_mean']:.2f} / "
                     f"{r['band_gap_max']:.2f} | {bm3d} |")
    return CARD_PROSE["card"]["uniformity"].format(
        table="\n".join(lines), commands="\n".join(r["command"] for r in rows))


def _card(name: str, path: Path, sha256: str, provenance: dict[str, Any],
          stages: list[dict[str, Any]], table: list[dict[str, Any]], net: torch.nn.Module,
          uniformity: list[dict[str, Any]] | None = None,
          prior: Sequence[dict[str, Any]] = (), zoo_name: str | None = None) -> str:
    """The card's Markdown: ``zoo/cards/card.md`` filled in with the prose of ``text.toml``;
    ``prior``: the stages of a shipped model that ``stages`` continued (listed first)."""
    recipe = RECIPES[name]
    zoo_name = zoo_name or name
    what, notes = CARD_TEXT[zoo_name]
    prose = CARD_PROSE["card"]
    if recipe.trunk_of:  # the trunk's stages, as its own shipped file lists them
        stages = provenance["stages"]
        lines = [prose["trunk_stage"].format(
            index=index, command=stage["command"], steps=stage["steps"],
            seconds=stage["wall_seconds"], trunk=recipe.trunk_of)
            for index, stage in enumerate(stages, 1)]
    else:
        lines = [prose["prior_stage"].format(
            index=index, command=stage["command"], steps=stage["steps"],
            seconds=stage["wall_seconds"], hardware=stage["hardware"])
            for index, stage in enumerate(prior, 1)]
        lines += [prose["stage"].format(
            index=index, command=stage["command"], steps=stage["steps"],
            batch=stage["config"]["batch"], seconds=stage["wall_seconds"],
            lr=stage["config"]["lr"], validation="; ".join(prose["stage_validation"].format(
                set=v["set"], setting=_setting(v), psnr=v["psnr"])
                for v in stage["history"][-1]["validation"]))
            for index, stage in enumerate(stages, len(prior) + 1)]
        stages = [*prior, *stages]
    hardware = list(dict.fromkeys(stage["hardware"] for stage in stages))
    how = prose["how_cpu" if "CPU" in stages[-1]["hardware"] else "how_gpu"]
    baseline = any(r["baseline_psnr"] is not None for r in table)
    header = "| set | setting | images | input PSNR | **PSNR** | SSIM |"
    rule = "| --- | --- | --- | --- | --- | --- |"
    if baseline:
        header, rule = header + " NLM PSNR |", rule + " --- |"
    rows = [header, rule]
    for r in table:
        row = (f"| {r['set']} | {r['setting']} | {r['count']} | {r['input_psnr']:.2f} | "
               f"**{r['psnr']:.2f}** | {r['ssim']:.4f} |")
        if r["baseline_psnr"] is not None:
            row += f" {r['baseline_psnr']:.2f} |"
        rows.append(row)
    return (CARDS / "card.md").read_text(encoding="utf-8").format(
        name=zoo_name, what=what, notes=notes, file=path.name, size=path.stat().st_size,
        sha256=sha256, net=json.dumps(recipe.net), parameters=provenance["parameters"],
        receptive_field=net.receptive_field, channels=recipe.channels,
        scale=net.scale, learnt=_learnt(recipe), train=", ".join(recipe.train),
        patch=recipe.patch, crop_side=prose["sr_crop_side"] if recipe.task == "sr" else "",
        steps=sum(s["steps"] for s in stages),
        minutes=sum(s["wall_seconds"] for s in stages) / 60, hardware="; ".join(hardware),
        how=how,
        stages="\n".join(lines), nlm_note=prose["nlm_note"] if baseline else "",
        table="\n".join(rows), commands="\n".join(r["command"] for r in table),
        uniformity=_uniformity_section(uniformity or []))


def _setting(validation: dict[str, Any]) -> str:
    if validation["task"] == "pairs":
        return "real pairs"
    if validation["task"] == "denoise":
        return f"sigma {validation['sigma']:g}"
    if validation["task"] == "jpeg":
        return f"q{validation['quality']}"
    return f"x{validation['scale']}"


def _learnt(recipe: Recipe) -> str:
    """The "learnt" row: ``[learnt]`` of ``zoo/cards/text.toml`` for the recipe's task."""
    mix = recipe.mixture
    qualities = recipe.qualities or (0,)
    practical = recipe.practical
    return CARD_PROSE["learnt"][recipe.task].format(
        sigma_range=list(recipe.sigma_range), quality_min=min(qualities),
        quality_max=max(qualities), scale=recipe.net.get("scale", 1), clean=mix.clean,
        noise=mix.noise, jpeg=mix.jpeg, p_clean=practical.clean,
        p_gaussian=practical.gaussian, p_jpeg=practical.jpeg, p_practical=practical.practical,
        p_gray=practical.gray, p_sigma=list(practical.sigma_range),
        p_quality=list(practical.quality_range))


def ship(name: str, stages: Sequence[str | Path], data: str | Path,
         zoo_dir: str | Path = ZOO_DIR) -> Path:
    """Put the last of ``stages`` (model files of one recipe's successive runs) into the zoo:
    weights as float16 (``ZOO/NAME.safetensors``, provenance with every stage's summary) and a
    card ``ZOO/NAME.md`` with the evaluation table measured now on this machine."""
    recipe = RECIPES[name]
    trained = recipe.trunk_of or name
    # the name the file ships under (and the stages of the first CPU stages, trained under it)
    zoo_name = recipe.ships_as or name
    loaded = [load_model(str(stage)) for stage in stages]
    allowed = {trained, recipe.ships_as} - {None}
    if any(m.provenance.get("recipe") not in allowed for m in loaded):
        raise ValueError(f"every stage must come from recipe {trained!r}")
    prior: list[dict[str, Any]] = []  # stages of a shipped model that the others continued
    if len(loaded) > 1 and loaded[0].provenance.get("stages") and not recipe.trunk_of:
        prior, loaded = list(loaded[0].provenance["stages"]), loaded[1:]
    summaries = [{k: v for k, v in m.provenance.items() if k != "init"} for m in loaded]
    final = loaded[-1]
    provenance = {**final.provenance, "stages": prior + [
        {k: v for k, v in s.items() if k not in ("config", "history")} for s in summaries]}
    if recipe.trunk_of and len(loaded) == 1 and final.provenance.get("stages"):
        provenance["stages"] = final.provenance["stages"]  # a shipped trunk: all its stages
    net = final.net
    if recipe.trunk_of:  # the trained gray net becomes the trunk of an opponent net
        net = build_net(recipe.net)
        net.trunk.load_state_dict(final.net.state_dict())
        provenance.update(recipe=name, trunk={"recipe": trained, "sha256": final.sha256},
                          parameters=count_parameters(net))
    path = Path(zoo_dir) / f"{zoo_name}.safetensors"
    sha256 = save_model(str(path), net, provenance, dtype=torch.float16)
    shipped = load_model(str(path))
    table = measure_card_table(zoo_name, shipped, Path(data))
    uniformity = measure_uniformity_table(zoo_name, shipped, Path(data))
    card = _card(name, path, sha256, provenance, summaries, table, shipped.net, uniformity,
                 prior, zoo_name)
    path.with_suffix(".md").write_text(card)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m restorer.train.recipes", description=__doc__,
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
    parser.add_argument("--patch", type=int, help="crop side in pixels (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--val-seconds", type=float, default=150.0)
    parser.add_argument("--workers", type=int,
                        help="processes that bank JPEGs (default 4), or that make a practical "
                             "recipe's pairs (default: 0, a thread, on a CPU; the cores less "
                             "two, at most 16, on a GPU)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every validation's weights (float16) as NAME-stepN too")
    parser.add_argument("--estimator-lr-scale", type=float,
                        help="a noise-map net's estimator learns at this multiple of --lr "
                             "(default: the recipe's)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                        help="how steps compute (default: bf16 autocast on CUDA and on CPUs "
                             "with native bf16, else fp32)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a field of the recipe, dotted for its parts and its "
                             "net's spec: practical.clean=0.25, degradation.blur=0.15, "
                             "map_true_share=0.25, map_grad=false, net.estimator_layers=8 "
                             "(repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.ship:
        log.info("shipped %s and its card", ship(args.name, args.ship, args.data))
        return
    if not args.out or not args.minutes:
        parser.error("training needs --out and --minutes")
    train_recipe(args.name, args.data, args.out, args.minutes, args.device, args.init, args.lr,
                 args.seed, args.val_seconds, args.workers, batch=args.batch,
                 keep_checkpoints=args.keep_checkpoints,
                 estimator_lr_scale=args.estimator_lr_scale, patch=args.patch,
                 settings=args.set, precision_name=args.precision,
                 command=shlex.join(["python", "-m", "restorer.train.recipes"]
                                    + list(argv if argv is not None else sys.argv[1:])))


if __name__ == "__main__":
    main()


__all__ = ["CARD_EVALS", "RECIPES", "Batches", "Recipe", "Validation", "main", "override",
           "ship", "train_recipe"]
