"""Training jobs on Ray Train: ``TorchTrainer`` (Train V2), DDP on CPUs or GPUs.

The per-worker loop is plain PyTorch around :func:`restorer.train.train_step`; this module adds
what a cluster needs:

- **data**: clean images from the restore input layer (a folder or ``s3://`` prefix), read by
  every worker; random patches with flips/rotations and degradations synthesised on the fly
  with an explicit RNG seeded by (seed, rank, step), so a resumed run draws the same batches;
- **checkpoints**: every ``validation.every`` steps rank 0 validates (PSNR, SSIM on a held-apart
  folder), and writes a checkpoint folder: ``model.safetensors`` (a restorer model with its net
  spec and provenance, loadable by ``restorer restore --model``), ``state.pt`` (optimizer, EMA,
  step; loaded with ``weights_only=True``), ``meta.json`` (format version, step) and the
  ``history.jsonl`` so far. Ray keeps the best (by validation PSNR) and the latest;
- **resume**: the same run name and storage path continue from the newest complete checkpoint
  folder on storage (``model.safetensors``, ``state.pt`` and ``meta.json`` all there and
  readable), whatever Ray's snapshot of its checkpoints says: a killed driver's snapshot lags
  the folders its workers finished; ``FailureConfig`` restarts dead workers from it. Once a run
  finishes, checkpoint folders that Ray does not keep (a killed run's orphans) are deleted, so
  ``output.keep`` folders remain;
- **results**: ``STORAGE/NAME/model.safetensors`` (the best), ``history.jsonl`` and
  ``curves.png`` (loss and validation PSNR by step).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from restorer import console, degrade, storage
from restorer.checkpoint import count_parameters, model_bytes
from restorer.errors import JobError, NotFoundError, RestorerError, SpecError, StorageError
from restorer.jobs import ResourceSpec, StorageSpec, register_kind, spec_to_dict
from restorer.nets import build_net
from restorer.progress import Progress, stderr_is_tty

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
DEGRADATIONS = ("noise", "jpeg", "blur", "blind", "sr")


def _default_net() -> dict[str, Any]:
    return {"arch": "dncnn", "channels": 1, "num_features": 32, "num_layers": 12}


@dataclass(frozen=True)
class TrainData:
    uri: str = ""  # clean training images: folder or s3:// prefix
    val_uri: str = ""  # clean validation images, held apart; "" = no validation
    val_images: int = 4  # validate on at most this many images (first in listing order)
    val_crop: int = 256  # centre crop of each validation image, pixels; 0 = whole image


@dataclass(frozen=True)
class Degradation:
    kind: str = "noise"  # noise | jpeg | blur | blind (noise or jpeg, DnCNN-3) | sr (MATLAB
    # bicubic downscale by the net's scale; for super-resolution nets)
    sigma_min: float = 0.0  # Gaussian noise std range, 0-255 scale (blind when min < max)
    sigma_max: float = 55.0
    quality_min: int = 10  # JPEG quality range
    quality_max: int = 40
    blur_min: float = 0.5  # Gaussian blur std range, pixels
    blur_max: float = 2.0
    val_sigma: float = 25.0  # validation: noise std (noise and blind kinds)
    val_quality: int = 20  # validation: JPEG quality (jpeg kind)


@dataclass(frozen=True)
class Optim:
    steps: int = 2000  # optimiser steps in all (a resumed run continues to this count)
    batch_size: int = 32  # patches per step per worker
    patch_size: int = 48
    lr: float = 1e-3  # Adam, cosine-decayed to min_lr
    min_lr: float = 1e-5
    loss: str = "l1"  # l1 | mse
    seed: int = 0
    ema: float = 0.0  # 0 = off; else the decay of an exponential moving average of weights
    precision: str = "auto"  # auto: bf16 autocast + channels_last on CUDA, fp32 on CPU | fp32


@dataclass(frozen=True)
class Validation:
    every: int = 200  # steps between validation + checkpoint


@dataclass(frozen=True)
class Output:
    storage_path: str = "checkpoints"  # local folder or s3:// prefix for runs
    init: str = ""  # fine-tune from this model (zoo name or path); "" = from scratch
    keep: int = 2  # checkpoints kept (the best by validation PSNR and the latest)


@dataclass(frozen=True)
class TrainSpec:
    kind: str = "train"
    name: str = "train"  # the run name: same name + storage path = resume
    net: dict[str, Any] = field(default_factory=_default_net)  # see restorer.nets
    data: TrainData = field(default_factory=TrainData)
    degradation: Degradation = field(default_factory=Degradation)
    optim: Optim = field(default_factory=Optim)
    validation: Validation = field(default_factory=Validation)
    output: Output = field(default_factory=Output)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)

    def validate(self) -> TrainSpec:
        if not self.data.uri:
            raise SpecError("data.uri is empty; give the folder or prefix of clean images")
        if self.degradation.kind not in DEGRADATIONS:
            raise SpecError(f"degradation.kind = {self.degradation.kind!r}; use one of "
                            f"{DEGRADATIONS}")
        if self.optim.precision not in ("auto", "fp32"):
            raise SpecError(f"optim.precision = {self.optim.precision!r}; use auto or fp32")
        if self.optim.loss not in ("l1", "mse"):
            raise SpecError(f"optim.loss = {self.optim.loss!r}; use l1 or mse")
        if self.optim.steps < 1 or self.optim.batch_size < 1 or self.validation.every < 1:
            raise SpecError("optim.steps, optim.batch_size and validation.every must be >= 1")
        if not self.name or "/" in self.name:
            raise SpecError(f"name = {self.name!r}; give a run name without '/'")
        try:
            scale = build_net(self.net).scale
        except Exception as e:  # noqa: BLE001 - report the net spec error as a spec error
            raise SpecError(f"[net]: {e}") from None
        if (scale > 1) != (self.degradation.kind == "sr"):
            raise SpecError(f"the net's scale is {scale} and degradation.kind is "
                            f"{self.degradation.kind!r}: super-resolution nets (scale > 1) "
                            "train with kind = \"sr\", and only they do")
        if scale > 1 and self.optim.patch_size % scale:
            raise SpecError(f"optim.patch_size = {self.optim.patch_size} must be a multiple of "
                            f"the net's scale {scale}")
        return self


register_kind("train", TrainSpec)


# --- data ------------------------------------------------------------------------------------

def load_clean_images(uri: str, channels: int, options: storage.StorageOptions,
                      limit: int = 0, min_side: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Clean images under ``uri`` as float32 HW (gray) or HWC (RGB) in ``[0, 1]``."""
    from restorer.codec import decode

    images, keys = [], []
    for entries in storage.walk_files(uri, options=options):
        for entry in entries:
            pixels = decode(storage.read_bytes(entry.uri, options), name=entry.key).pixels
            peak = 65535.0 if pixels.dtype == np.uint16 else 255.0
            image = pixels.astype(np.float32) / peak
            if channels == 1:
                image = image.mean(-1) if image.shape[-1] == 3 else image[..., 0]
            elif image.shape[-1] == 1:
                image = np.repeat(image, 3, -1)
            if min(image.shape[:2]) >= min_side:
                images.append(image)
                keys.append(entry.key)
            if limit and len(images) >= limit:
                return images, keys
    if not images:
        raise JobError(f"No usable images (at least {min_side}px on each side) under {uri}")
    return images, keys


def degrade_batch(clean: np.ndarray, spec: Degradation, rng: np.random.Generator,
                  scale: int = 1) -> np.ndarray:
    """Degrade each patch of ``clean`` (N, H, W[, C]) float32 [0, 1] as ``spec`` says; kind
    ``sr`` shrinks by ``scale`` (MATLAB bicubic, unrounded)."""
    out = []
    for patch in clean:
        kind = spec.kind if spec.kind != "blind" else ("noise", "jpeg")[int(rng.integers(2))]
        if kind == "sr":
            out.append(degrade.bicubic_downscale(patch, scale))
        elif kind == "noise":
            out.append(degrade.add_gaussian_noise(
                patch, float(rng.uniform(spec.sigma_min, spec.sigma_max)), rng))
        elif kind == "jpeg":
            quality = int(rng.integers(spec.quality_min, spec.quality_max + 1))
            as_uint8 = np.round(np.clip(patch, 0, 1) * 255).astype(np.uint8)
            out.append(degrade.jpeg_compress(as_uint8, quality).astype(np.float32) / 255.0)
        else:
            out.append(degrade.gaussian_blur(
                patch, float(rng.uniform(spec.blur_min, spec.blur_max))))
    return np.stack(out).astype(np.float32)


def _to_uint8(array) -> np.ndarray:
    """Float ``[0, 1]`` -> uint8 as the reference code does: clamp, x255, round."""
    return np.round(np.clip(np.asarray(array), 0, 1) * 255).astype(np.uint8)


def _nchw(batch: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(batch))
    return tensor[:, None] if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)


# --- validation ------------------------------------------------------------------------------

def validate_net(net: torch.nn.Module, images: list[np.ndarray], spec: Degradation,
                 crop: int, seed: int = 0) -> dict[str, float]:
    """Mean PSNR/SSIM of ``net`` on degraded copies of ``images`` (fixed per-image seeds;
    output clamped, x255, rounded to uint8, as the reference code)."""
    from restorer import metrics

    psnrs, ssims, inputs = [], [], []
    net.eval()
    for index, image in enumerate(images):
        if crop:
            top = max(0, (image.shape[0] - crop) // 2)
            left = max(0, (image.shape[1] - crop) // 2)
            image = image[top:top + crop, left:left + crop]
        rng = np.random.default_rng([seed, index])
        kind = "noise" if spec.kind in ("noise", "blind") else spec.kind
        scale = net.scale
        if kind == "sr":
            image = image[: image.shape[0] - image.shape[0] % scale,
                          : image.shape[1] - image.shape[1] % scale]
            degraded = degrade.bicubic_downscale(image, scale)
        elif kind == "noise":
            degraded = degrade.add_gaussian_noise(image, spec.val_sigma, rng)
        elif kind == "jpeg":
            degraded = degrade.jpeg_compress(np.round(image * 255).astype(np.uint8),
                                             spec.val_quality).astype(np.float32) / 255.0
        else:
            degraded = degrade.gaussian_blur(image, (spec.blur_min + spec.blur_max) / 2)
        with torch.no_grad():
            restored = net(_nchw(degraded[None]))[0]
        restored = restored[0] if image.ndim == 2 else restored.permute(1, 2, 0)
        clean8 = _to_uint8(image)
        psnrs.append(metrics.psnr(_to_uint8(restored.numpy()), clean8))
        ssims.append(metrics.ssim(_to_uint8(restored.numpy()), clean8))
        shown = degrade.bicubic_resize(degraded, float(scale)) if kind == "sr" else degraded
        inputs.append(metrics.psnr(_to_uint8(shown), clean8))
    return {"val_psnr": float(np.mean(psnrs)), "val_ssim": float(np.mean(ssims)),
            "val_input_psnr": float(np.mean(inputs))}


# --- the per-worker loop ---------------------------------------------------------------------

def _cosine(optim: Optim, step: int) -> float:
    """The learning rate at ``step``: the cosine schedule of :func:`restorer.train.cosine_lr`."""
    from restorer.train import cosine_lr

    return cosine_lr(optim.lr, optim.min_lr, step / optim.steps)


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if hasattr(net, "module") else net


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: plain PyTorch around ``train_step``; reports and checkpoints."""
    import ray.train
    import ray.train.torch

    from restorer.train import train_step

    spec: TrainSpec = config["spec"]
    options = spec.storage.options()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.optim.seed)  # same initial weights on every rank
    net = build_net(spec.net)
    if spec.output.init:
        from restorer.models import get_model

        start = get_model(spec.output.init, options)
        if start.spec != _spec_of(spec.net):
            raise JobError(f"{spec.output.init} holds net {start.spec}, not {spec.net}; "
                           "fine-tuning needs the same net spec")
        net.load_state_dict(start.net.state_dict())
    channels = net.channels
    images, _ = load_clean_images(spec.data.uri, channels, options,
                                  min_side=spec.optim.patch_size)
    val_images = []
    if rank == 0 and spec.data.val_uri:
        val_images, _ = load_clean_images(spec.data.val_uri, channels, options,
                                          limit=spec.data.val_images)
    optimizer = torch.optim.Adam(net.parameters(), lr=spec.optim.lr)
    ema = None
    step, history = 0, []
    run_uri = storage.join(spec.output.storage_path, spec.name)
    resumed = resume_state(run_uri, options, ray.train.get_checkpoint(),
                           _same_on_every_rank(checkpoint_folders(run_uri, options)))
    if resumed is not None:
        state, step, history, source = resumed
        net.load_state_dict(state["net"])  # the trained weights (the model file may be EMA)
        optimizer.load_state_dict(state["optimizer"])
        ema = state.get("ema")
        log.info("rank %d resumes at step %d from %s", rank, step, source)
    resumed_from = step if resumed is not None else None
    scale = net.scale
    fast_cuda = device.type == "cuda" and spec.optim.precision == "auto"
    if fast_cuda:
        net = net.to(device, memory_format=torch.channels_last)
    net = ray.train.torch.prepare_model(net)
    if spec.optim.ema and ema is None:
        ema = {k: v.detach().clone() for k, v in _unwrap(net).state_dict().items()}
    if config.get("quiet"):  # Ray Train's INFO chatter stays in the log files
        for name in console.RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    running, count, started = 0.0, 0, time.time()
    progress = None
    if rank == 0:  # one bar for the run: on the driver's terminal (Ray's tqdm), else log lines
        bar = None
        if config.get("tty"):
            from ray.experimental.tqdm_ray import tqdm as bar
        progress = Progress("train", spec.optim.steps, unit="steps", interval=30.0, tty=False,
                            initial=step, bar=bar)
    while step < spec.optim.steps:
        rng = np.random.default_rng([spec.optim.seed, rank, step])
        clean = degrade.sample_patches(images, spec.optim.patch_size, spec.optim.batch_size, rng)
        degraded = degrade_batch(clean, spec.degradation, rng, scale)
        for group in optimizer.param_groups:
            group["lr"] = _cosine(spec.optim, step)
        degraded = _nchw(degraded).to(device)
        if fast_cuda:
            degraded = degraded.contiguous(memory_format=torch.channels_last)
        running += train_step(net, optimizer, _nchw(clean).to(device), degraded,
                              spec.optim.loss, torch.bfloat16 if fast_cuda else None)
        count += 1
        step += 1
        if progress is not None:
            progress.update(1)
        if ema is not None:
            with torch.no_grad():
                for k, v in _unwrap(net).state_dict().items():
                    ema[k].mul_(spec.optim.ema).add_(v.detach(), alpha=1 - spec.optim.ema) \
                        if v.dtype.is_floating_point else ema[k].copy_(v)
        if step % spec.validation.every == 0 or step == spec.optim.steps:
            metrics = {"step": step, "loss": running / count, "lr": _cosine(spec.optim, step),
                       "seconds": round(time.time() - started, 2)}
            if resumed_from is not None:  # the first record after a resume says where from
                metrics["resumed_from"], resumed_from = resumed_from, None
            running, count = 0.0, 0
            if rank == 0:
                model = _unwrap(net)
                if ema is not None:
                    model = build_net(spec.net)
                    model.load_state_dict(ema)
                if val_images:
                    metrics.update(validate_net(model.cpu() if ema is not None else model,
                                                val_images, spec.degradation,
                                                spec.data.val_crop))
                    if ema is None:
                        _unwrap(net).to(device)
                history.append(metrics)
                with tempfile.TemporaryDirectory() as folder:
                    _write_checkpoint(folder, spec, model, net, optimizer, ema, step, history,
                                      context.get_world_size())
                    ray.train.report(metrics,
                                     checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics, checkpoint=None)
            if progress is not None:
                progress.update(0, loss=f"{metrics['loss']:.4f}", **(
                    {"val_psnr": f"{metrics['val_psnr']:.2f}"} if "val_psnr" in metrics else {}))
    if progress is not None:
        progress.close()


CHECKPOINT_FILES = ("model.safetensors", "state.pt", "meta.json")


def checkpoint_folders(run_uri: str, options: storage.StorageOptions) -> list[tuple[int, str]]:
    """``(step, uri)`` of the checkpoint folders under a run that hold every file of
    :data:`CHECKPOINT_FILES` and a readable ``meta.json``, the highest step first."""
    found = []
    for name in storage.list_dirs(run_uri, options):
        if not name.startswith("checkpoint_"):
            continue
        folder = storage.join(run_uri, name)
        if not set(CHECKPOINT_FILES) <= set(storage.list_names(folder, options)):
            continue
        try:
            meta = json.loads(storage.read_bytes(storage.join(folder, "meta.json"), options))
            found.append((int(meta["step"]), folder))
        except (StorageError, ValueError, KeyError, TypeError) as e:
            log.warning("checkpoint %s has no readable meta.json (%s); skipped", folder, e)
    return sorted(found, reverse=True)


def _load_checkpoint(read) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
    """(state, step, history) from a checkpoint folder, given ``read(name) -> bytes``."""
    meta = json.loads(read("meta.json"))
    if meta["format_version"] > CHECKPOINT_FORMAT_VERSION:
        raise JobError("checkpoint written by a newer restorer; upgrade restorer")
    state = torch.load(io.BytesIO(read("state.pt")), weights_only=True)
    try:
        lines = read("history.jsonl").decode().splitlines()
    except (StorageError, OSError):
        lines = []
    return state, int(meta["step"]), [json.loads(line) for line in lines if line.strip()]


def _same_on_every_rank(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (DDP ranks must resume from one checkpoint, even if a
    folder completes between their listings)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def resume_state(run_uri: str, options: storage.StorageOptions, ray_checkpoint=None,
                 candidates: list[tuple[int, str]] | None = None):
    """(state, step, history, where) of the newest checkpoint that loads, or None.

    Checkpoint folders on storage are tried newest step first (a truncated one is skipped with
    a warning); Ray's checkpoint (``ray.train.get_checkpoint()``) is used only when it is
    newer than all of them, or storage holds none (its snapshot lags when a driver is killed).
    """
    if candidates is None:
        candidates = checkpoint_folders(run_uri, options)
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as folder:
            try:
                with open(os.path.join(folder, "meta.json")) as f:
                    ray_step = int(json.load(f)["step"])
            except (OSError, ValueError, KeyError):
                ray_step = -1
            if not candidates or ray_step > candidates[0][0]:
                def read_local(name: str) -> bytes:
                    with open(os.path.join(folder, name), "rb") as f:
                        return f.read()

                return (*_load_checkpoint(read_local), ray_checkpoint.path)
    for step, folder in candidates:
        try:
            return (*_load_checkpoint(lambda name, folder=folder: storage.read_bytes(
                storage.join(folder, name), options)), folder)
        except (RestorerError, OSError, RuntimeError, ValueError, KeyError) as e:
            log.warning("checkpoint %s (step %d) does not load (%s); trying an older one",
                        folder, step, e)
    return None


def prune_checkpoints(run_uri: str, kept: set[str], options: storage.StorageOptions) -> list[str]:
    """Delete the run's ``checkpoint_*`` folders whose names are not in ``kept`` (the ones Ray
    keeps); returns the deleted names. A killed run leaves folders Ray never learnt of."""
    deleted = []
    if not kept:
        return deleted
    for name in storage.list_dirs(run_uri, options):
        if name.startswith("checkpoint_") and name not in kept:
            storage.delete(storage.join(run_uri, name), options, recursive=True)
            deleted.append(name)
    if deleted:
        log.info("deleted %d checkpoint folders that Ray does not keep (a killed run's): %s",
                 len(deleted), ", ".join(deleted))
    return deleted


def _spec_of(net_spec: dict[str, Any]) -> dict[str, Any]:
    from restorer.nets import net_spec as spec_from_net

    return spec_from_net(build_net(net_spec))


def _write_checkpoint(folder: str, spec: TrainSpec, model: torch.nn.Module, net, optimizer,
                      ema, step: int, history: list[dict[str, Any]], world_size: int) -> None:
    last = history[-1]
    provenance = {"command": f"restorer train (run {spec.name})", "spec": spec_to_dict(spec),
                  "steps": step, "workers": world_size, "metrics": {
                      k: round(v, 4) for k, v in last.items() if k.startswith("val_")},
                  "parameters": count_parameters(model)}
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(model_bytes(model, provenance))
    torch.save({"optimizer": optimizer.state_dict(), "ema": ema,
                "net": _unwrap(net).state_dict()}, os.path.join(folder, "state.pt"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"format_version": CHECKPOINT_FORMAT_VERSION, "step": step}, f)
    with open(os.path.join(folder, "history.jsonl"), "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)


# --- the driver ------------------------------------------------------------------------------

def _storage_filesystem(uri: str, options: storage.StorageOptions):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""
    if not storage.is_remote(uri):
        return os.path.abspath(storage.local_path(uri)), None
    import pyarrow.fs

    fs, path = storage.filesystem(uri, options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _absolute_paths(spec: TrainSpec) -> TrainSpec:
    """Local paths made absolute: Ray Train workers run in another working directory."""
    def absolute(uri: str) -> str:
        if not uri or storage.is_remote(uri):
            return uri
        path = storage.local_path(uri)
        return os.path.abspath(path) if os.path.exists(path) or "/" in uri or "." in uri \
            else uri  # a zoo name (output.init) stays a name

    return dataclasses.replace(
        spec,
        data=dataclasses.replace(spec.data, uri=absolute(spec.data.uri),
                                 val_uri=absolute(spec.data.val_uri)),
        output=dataclasses.replace(spec.output, storage_path=absolute(spec.output.storage_path),
                                   init=absolute(spec.output.init)))


def _has_images(uri: str, options: storage.StorageOptions) -> bool:
    """Whether the folder ``uri`` holds an image, found without listing it all where possible."""
    if not storage.is_remote(uri):
        return storage.has_local_file(uri, storage.IMAGE_EXTENSIONS)
    return next(iter(storage.walk_files(uri, options=options)), None) is not None


def run_train(spec: TrainSpec) -> dict[str, Any]:
    """Train with Ray Train's TorchTrainer; returns (and writes) the run's summary."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from restorer.runtime import cluster_shape, ensure_ray, plan_workers

    spec = _absolute_paths(spec.validate())
    options = spec.storage.options()
    for field_name, uri in (("data.uri", spec.data.uri), ("data.val_uri", spec.data.val_uri)):
        if not uri:
            continue
        if not storage.is_dir(uri, options):
            raise NotFoundError(f"Training data {uri} ({field_name}) does not exist or is not a "
                                "folder; check the path (or bucket and credentials)")
        if not _has_images(uri, options):
            raise NotFoundError(f"Training data {uri} ({field_name}) holds no images "
                                f"({' '.join(storage.IMAGE_EXTENSIONS)}); point {field_name} "
                                "at a folder of clean images")
    embedded = ensure_ray(spec.resources.address, spec.resources.num_cpus,
                          spec.resources.object_store_mb)
    total_cpus, total_gpus, node_cpus, nodes = cluster_shape()
    workers = spec.resources.workers or 1
    plan = plan_workers(workers, spec.resources.gpus_per_worker,
                        spec.resources.cpus_per_worker or 1.0, spec.resources.threads_per_worker,
                        total_cpus, total_gpus, node_cpus, nodes, reserve_cpus=0.0,
                        can_autoscale=not embedded)
    per_node = -(-plan.workers // max(nodes, 1))  # workers sharing a node's cores
    threads = 2 if plan.gpus_per_worker else max(1, int(node_cpus // per_node))
    storage_path, filesystem = _storage_filesystem(spec.output.storage_path, options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "threads": spec.resources.threads_per_worker or threads,
                           "tty": stderr_is_tty(), "quiet": console.quiet},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers, use_gpu=plan.gpus_per_worker > 0,
            resources_per_worker={"CPU": plan.cpus_per_worker,
                                  **({"GPU": plan.gpus_per_worker}
                                     if plan.gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(
            name=spec.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=3),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=max(1, spec.output.keep),
                checkpoint_score_attribute="val_psnr" if spec.data.val_uri else "step",
                checkpoint_score_order="max")))
    started = time.time()
    result = trainer.fit()
    if result.error:
        raise JobError(f"Training run {spec.name} failed: {result.error}")
    kept = {os.path.basename(c.path.rstrip("/")) for c, _ in result.best_checkpoints or []}
    if result.checkpoint is not None:
        kept.add(os.path.basename(result.checkpoint.path.rstrip("/")))
    prune_checkpoints(storage.join(spec.output.storage_path, spec.name), kept, options)
    return finish_run(spec, result, time.time() - started)


def finish_run(spec: TrainSpec, result, seconds: float) -> dict[str, Any]:
    """Copy the best model, the history and a plot of the curves next to the run."""
    options = spec.storage.options()
    run_uri = storage.join(spec.output.storage_path, spec.name)
    best = result.get_best_checkpoint("val_psnr" if spec.data.val_uri else "step", "max") \
        or result.checkpoint
    with best.as_directory() as folder, \
            open(os.path.join(folder, "model.safetensors"), "rb") as f:
        model = f.read()
    with result.checkpoint.as_directory() as folder, \
            open(os.path.join(folder, "history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    storage.write_bytes(storage.join(run_uri, "model.safetensors"), model, options)
    storage.write_bytes(storage.join(run_uri, "history.jsonl"),
                        "".join(json.dumps(h) + "\n" for h in history).encode(), options)
    curves = plot_curves(history)
    storage.write_bytes(storage.join(run_uri, "curves.png"), curves, options)
    summary = {"kind": "train", "name": spec.name, "steps": history[-1]["step"],
               "final": history[-1], "best_val_psnr": max(
                   (h.get("val_psnr", float("nan")) for h in history), default=None),
               "model": storage.join(run_uri, "model.safetensors"),
               "history": storage.join(run_uri, "history.jsonl"),
               "elapsed_seconds": round(seconds, 1), "spec": spec_to_dict(spec)}
    from restorer.report import write_train_report

    summary["report"] = write_train_report(run_uri, summary, history, curves,
                                           validation_samples(spec, model), options)
    storage.write_bytes(storage.join(run_uri, "summary.json"),
                        json.dumps(summary, indent=2).encode(), options)
    return summary


def validation_samples(spec: TrainSpec, model: bytes, count: int = 3,
                       crop: int = 128) -> list[dict[str, Any]]:
    """Degraded / restored / clean centre crops of the first validation images (uint8 HWC)."""
    from restorer import metrics
    from restorer.checkpoint import load_model_bytes

    if not spec.data.val_uri:
        return []
    net = load_model_bytes(model, "the run's best model").net
    images, keys = load_clean_images(spec.data.val_uri, net.channels, spec.storage.options(),
                                     limit=count)
    samples = []
    scale = net.scale
    for index, (image, key) in enumerate(zip(images, keys)):
        top, left = max(0, (image.shape[0] - crop) // 2), max(0, (image.shape[1] - crop) // 2)
        clean = image[top:top + crop, left:left + crop]
        clean = clean[: clean.shape[0] - clean.shape[0] % scale,
                      : clean.shape[1] - clean.shape[1] % scale]
        degraded = degrade_batch(clean[None], dataclasses.replace(
            spec.degradation, sigma_min=spec.degradation.val_sigma,
            sigma_max=spec.degradation.val_sigma, kind="noise" if spec.degradation.kind in (
                "noise", "blind") else spec.degradation.kind,
            quality_min=spec.degradation.val_quality, quality_max=spec.degradation.val_quality),
            np.random.default_rng([spec.optim.seed, index]), scale)[0]
        with torch.no_grad():
            restored = net(_nchw(degraded[None]))[0]
        if scale > 1:  # shown (and measured) at the clean image's size, as bicubic upscales
            degraded = degrade.bicubic_resize(degraded, float(scale))
        restored = restored[0].numpy() if clean.ndim == 2 else restored.permute(1, 2, 0).numpy()

        def hwc(array):
            array = _to_uint8(array)
            return array[..., None] if array.ndim == 2 else array

        samples.append({"name": key, "degraded": hwc(degraded), "restored": hwc(restored),
                        "clean": hwc(clean),
                        "input_psnr": metrics.psnr(hwc(degraded), hwc(clean)),
                        "psnr": metrics.psnr(hwc(restored), hwc(clean))})
    return samples


def plot_curves(history: list[dict[str, Any]], width: int = 640, height: int = 360) -> bytes:
    """A PNG with the training loss (left axis) and validation PSNR (right axis) by step."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 50, width - 50, 20, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    steps = [h["step"] for h in history]
    span = max(max(steps) - min(steps), 1)

    def series(key: str, color: str, label_x: int) -> None:
        points = [(h["step"], h[key]) for h in history if key in h]
        if not points:
            return
        low = min(v for _, v in points)
        high = max(v for _, v in points)
        scale = (high - low) or 1.0
        xy = [(left + (s - min(steps)) / span * (right - left),
               bottom - (v - low) / scale * (bottom - top)) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((label_x, 4), f"{key}: {low:.4g}..{high:.4g}", fill=color)

    series("loss", "blue", left)
    series("val_psnr", "red", width // 2)
    draw.text((left, bottom + 8), f"step {min(steps)}", fill="black")
    draw.text((right - 60, bottom + 8), f"step {max(steps)}", fill="black")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


__all__ = [
    "TrainSpec",
    "dataclasses",
    "degrade_batch",
    "load_clean_images",
    "plot_curves",
    "run_train",
    "train_loop_per_worker",
    "validate_net",
]
