"""Training jobs on Ray Train: ``TorchTrainer`` (Train V2), DDP on CPUs or GPUs.

The spec is :class:`restorer.job.specs.TrainSpec`. The per-worker loop drives the training core
(:class:`restorer.train.core.Trainer`: step, EMA, schedule, precision, state); this module adds what
a cluster needs:

- **data** (:mod:`restorer.train.data`): clean images from the restore input layer (a folder
  or ``s3://`` prefix), read by every worker; random patches with flips/rotations and
  degradations synthesised on the fly with an explicit RNG seeded by (seed, rank, step), so a
  resumed run draws the same batches;
- **checkpoints**: every ``validation.every`` steps, and when ``validation.every_seconds``
  passed since the last one, rank 0 validates (PSNR, SSIM on a held-apart folder) and writes a
  checkpoint folder: ``model.safetensors`` (a restorer model with its net
  spec and provenance, loadable by ``restorer restore --model``), ``state.pt`` (optimizer, EMA,
  step; loaded with ``weights_only=True``), ``meta.json`` (format version, step) and the
  ``history.jsonl`` so far (the format: :mod:`restorer.train.checkpoints`). Ray keeps the
  best (by validation PSNR) and the latest;
- **resume**: the same run name and storage path continue from the newest complete checkpoint
  folder on storage (``model.safetensors``, ``state.pt`` and ``meta.json`` all there and
  readable), whatever Ray's snapshot of its checkpoints says: a killed driver's snapshot lags
  the folders its workers finished; ``FailureConfig`` restarts dead workers from it. Once a run
  finishes, checkpoint folders that Ray does not keep (a killed run's orphans) are deleted, so
  ``output.keep`` folders remain;
- **results**: ``STORAGE/NAME/model.safetensors`` (the best), ``history.jsonl`` and
  ``curves.png`` (loss and validation PSNR by step);
- **the console**: the driver alone shows the run (:class:`_Watcher`: one progress bar or a
  log line every 30 s, one line per checkpoint), fed by rank 0 through a small actor
  (:class:`TrainEvents`); Ctrl-C asks rank 0 for a checkpoint and a clean end, and says where
  it is (:func:`_stop_on_signals`).

The file reads top down: the driver (:func:`run_train`, run where ``restorer train`` runs),
then the loop each Ray Train worker runs (:func:`train_loop_per_worker`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import tempfile
import time
from typing import Any

import numpy as np
import torch

from restorer.errors import JobError, JobStopped, NotFoundError
from restorer.image import degrade
from restorer.io import storage
from restorer.job import console
from restorer.job.progress import Progress
from restorer.job.specs import (
    TRAIN_DEGRADATIONS,
    Degradation,
    Optim,
    Output,
    TrainData,
    TrainSpec,
    Validation,
    spec_to_dict,
)
from restorer.nets import build_net
from restorer.train.checkpoints import (
    CHECKPOINT_FILES,
    CHECKPOINT_FORMAT_VERSION,
    checkpoint_folders,
    prune_checkpoints,
    resume_state,
    write_checkpoint,
)
from restorer.train.core import EMA, Schedule, Trainer, precision_for
from restorer.train.data import (
    degrade_batch,
    load_clean_images,
    to_nchw,
    validate_net,
    validation_samples,
)

log = logging.getLogger(__name__)

DEGRADATIONS = TRAIN_DEGRADATIONS


# --- the driver ------------------------------------------------------------------------------

def run_train(spec: TrainSpec) -> dict[str, Any]:
    """Train with Ray Train's TorchTrainer; returns (and writes) the run's summary."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from restorer.job.sizing import size_workers
    from restorer.pipeline.runtime import cluster_shape, ensure_ray

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
    plan = size_workers(workers, spec.resources.gpus_per_worker,
                        spec.resources.cpus_per_worker or 1.0, spec.resources.threads_per_worker,
                        total_cpus, total_gpus, node_cpus, nodes, reserve_cpus=0.0,
                        can_autoscale=not embedded)
    per_node = -(-plan.workers // max(nodes, 1))  # workers sharing a node's cores
    threads = 2 if plan.gpus_per_worker else max(1, int(node_cpus // per_node))
    storage_path, filesystem = _storage_filesystem(spec.output.storage_path, options)
    events = ray.remote(num_cpus=0)(TrainEvents).remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "threads": spec.resources.threads_per_worker or threads,
                           "quiet": console.quiet, "events": events},
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
    run_uri = storage.join(spec.output.storage_path, spec.name)
    watcher = _Watcher(events, spec)
    try:
        with _stop_on_signals(events, run_uri, options) as stopping:
            result = watcher.run(trainer.fit)
    finally:
        ray.kill(events)
    if result.error:
        raise JobError(f"Training run {spec.name} failed: {result.error}")
    kept = {os.path.basename(c.path.rstrip("/")) for c, _ in result.best_checkpoints or []}
    if result.checkpoint is not None:
        kept.add(os.path.basename(result.checkpoint.path.rstrip("/")))
    prune_checkpoints(run_uri, kept, options)
    summary = finish_run(spec, result, time.time() - started)
    if stopping.is_set() and summary["steps"] < spec.optim.steps:
        raise JobStopped(_saved(run_uri, options, stopped=True) + " (the run's model, history "
                         f"and report so far are in {run_uri}); rerun the same command to go on "
                         f"to step {spec.optim.steps}")
    return summary


class TrainEvents:
    """A Ray actor between rank 0 and the driver: rank 0 sends progress (fire and forget) and
    the driver drains it; the driver asks for a stop (Ctrl-C) and rank 0 reads it."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._stop = False

    def put(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


class _Watcher:
    """The driver's view of a run: one progress bar (a terminal) or a line every 30 s (a log),
    fed by rank 0 through :class:`TrainEvents`, and one line per checkpoint. Nothing of it is
    printed by the workers, so nothing comes twice or with a ``(pid=...)`` prefix."""

    POLL_SECONDS = 0.5

    def __init__(self, events: Any, spec: TrainSpec) -> None:
        self.events, self.spec = events, spec
        self.progress: Progress | None = None

    def run(self, fit: Any) -> Any:
        """``fit()`` in a thread (so that Ray Train installs no SIGINT handler of its own and
        ours decides), while this thread shows its progress; returns its result."""
        import threading

        import ray

        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                with _ray_address_for_train_actors():
                    outcome["result"] = fit()
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                outcome["error"] = e

        from tqdm.contrib.logging import logging_redirect_tqdm

        thread = threading.Thread(target=target, name="restorer-train-fit", daemon=True)
        thread.start()
        try:
            with logging_redirect_tqdm():  # log lines above the bar, not glued to it
                while thread.is_alive():
                    thread.join(self.POLL_SECONDS)
                    self._show(ray.get(self.events.drain.remote()))
                self._show(ray.get(self.events.drain.remote()))
        finally:
            if self.progress is not None:
                self.progress.close()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def _show(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if event["kind"] == "start":
                if event["source"]:
                    log.info("resumed at step %d from %s", event["step"], event["source"])
                if self.progress is not None:  # a worker restarted by FailureConfig
                    self.progress.close()
                self.progress = Progress("train", self.spec.optim.steps, unit="steps",
                                         interval=30.0, initial=event["step"])
                continue
            if self.progress is None:
                continue
            if event["kind"] == "step":
                self.progress.update(event["step"] - self.progress.done,
                                     loss=f"{event['loss']:.4f}")
            elif event["kind"] == "checkpoint":
                self.progress.update(event["step"] - self.progress.done)
                log.info("step %d: checkpoint written (%s; loss %.4f%s)", event["step"],
                         event["why"], event["loss"],
                         f", validation PSNR {event['val_psnr']:.2f} dB"
                         if "val_psnr" in event else "")


@contextlib.contextmanager
def _stop_on_signals(events: Any, run_uri: str, options: storage.StorageOptions):
    """A first Ctrl-C (or SIGTERM) asks rank 0 to write a checkpoint and end the run there;
    a second Ctrl-C aborts at once, saying which checkpoint a rerun resumes from."""
    import threading

    import ray

    stopping = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return

    def handle(signum: int, _frame: Any) -> None:
        if stopping.is_set() and signum == signal.SIGINT:
            log.warning("aborted: %s", _saved(run_uri, options, stopped=False))
            raise KeyboardInterrupt
        stopping.set()
        ray.get(events.request_stop.remote())
        log.warning("stopping: rank 0 writes a checkpoint at its next step, then the run ends "
                    "(Ctrl-C again to abort at once; %s)", _saved(run_uri, options,
                                                                  stopped=False))

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopping
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _saved(run_uri: str, options: storage.StorageOptions, stopped: bool) -> str:
    """What a rerun resumes from: the newest complete checkpoint folder, or none."""
    folders = checkpoint_folders(run_uri, options)
    if not folders:
        return "no checkpoint saved yet: a rerun starts from step 0"
    step, folder = folders[0]
    verb = "stopped with the checkpoint of" if stopped else "last checkpoint:"
    return f"{verb} step {step} in {folder}"


@contextlib.contextmanager
def _ray_address_for_train_actors():
    """Ray Train's controller and its helper actors look the cluster up through Ray's state
    API, which, given no address, guesses from the Ray instances running on this machine and
    fails ("ConnectionError: Found multiple active Ray instances") where there are several.
    For the run, ``RAY_ADDRESS`` names this driver's cluster and Ray Train passes it on to its
    controller (``ENV_VARS_TO_PROPAGATE``), whose actors inherit it."""
    import ray
    from ray.train.v2._internal import constants

    address = ray.get_runtime_context().gcs_address
    propagated = getattr(constants, "ENV_VARS_TO_PROPAGATE", None)
    if not address or not isinstance(propagated, set) or "RAY_ADDRESS" in os.environ:
        yield
        return
    os.environ["RAY_ADDRESS"] = address
    propagated.add("RAY_ADDRESS")
    try:
        yield
    finally:
        propagated.discard("RAY_ADDRESS")
        os.environ.pop("RAY_ADDRESS", None)


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


# --- the per-worker loop ---------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: a :class:`restorer.train.core.Trainer` fed by this rank's batches; rank 0
    validates and checkpoints every ``validation.every`` steps, every
    ``validation.every_seconds``, and at a stop the driver asked for (:class:`_Control`)."""
    import ray.train
    import ray.train.torch

    spec: TrainSpec = config["spec"]
    options = spec.storage.options()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.optim.seed)  # same initial weights on every rank
    net = _spec_net(spec, options)
    channels = net.channels
    images, _ = load_clean_images(spec.data.uri, channels, options,
                                  min_side=spec.optim.patch_size)
    val_images = []
    if rank == 0 and spec.data.val_uri:
        val_images, _ = load_clean_images(spec.data.val_uri, channels, options,
                                          limit=spec.data.val_images)
    scale = net.scale
    precision = precision_for(device, spec.optim.precision)
    if precision.channels_last:
        net = net.to(device, memory_format=torch.channels_last)
    net = ray.train.torch.prepare_model(net)
    trainer = Trainer(net, torch.optim.Adam(net.parameters(), lr=spec.optim.lr),
                      spec.optim.loss, precision,
                      EMA(net, spec.optim.ema, buffers=True) if spec.optim.ema else None)
    schedule = Schedule(spec.optim.lr, spec.optim.min_lr)  # by steps, no warm-up
    step, history = 0, []
    run_uri = storage.join(spec.output.storage_path, spec.name)
    resumed = resume_state(run_uri, options, ray.train.get_checkpoint(),
                           _same_on_every_rank(checkpoint_folders(run_uri, options)))
    events = config.get("events")  # restorer.train.distributed.TrainEvents: the driver's view
    if resumed is not None:
        state, step, history, source = resumed
        trainer.load_state_dict(state)  # the trained weights (the model file may be EMA)
        log.debug("rank %d resumes at step %d from %s", rank, step, source)
    if rank == 0 and events is not None:
        events.put.remote({"kind": "start", "step": step,
                           "source": str(resumed[3]) if resumed is not None else ""})
    resumed_from = step if resumed is not None else None
    if config.get("quiet"):  # Ray Train's INFO chatter stays in the log files
        for name in console.RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    running, count, started = 0.0, 0, time.time()
    control = _Control(rank, events, spec.validation.every_seconds)
    while step < spec.optim.steps:
        rng = np.random.default_rng([spec.optim.seed, rank, step])
        clean = degrade.sample_patches(images, spec.optim.patch_size, spec.optim.batch_size, rng)
        degraded = degrade_batch(clean, spec.degradation, rng, scale)
        loss = trainer.step(to_nchw(clean).to(device), to_nchw(degraded).to(device),
                            schedule(step / spec.optim.steps, step))
        running += loss
        count += 1
        step += 1
        control.progress(step, loss)
        why = control.checkpoint_due(step, spec.validation.every, spec.optim.steps)
        if why:
            metrics = {"step": step, "loss": running / count,
                       "lr": schedule(step / spec.optim.steps, step),
                       "seconds": round(time.time() - started, 2)}
            if resumed_from is not None:  # the first record after a resume says where from
                metrics["resumed_from"], resumed_from = resumed_from, None
            running, count = 0.0, 0
            _report(spec, trainer, metrics, history, val_images, rank, context.get_world_size())
            control.checkpointed(metrics, why)
            if why == "stop":
                break


def _spec_net(spec: TrainSpec, options: storage.StorageOptions) -> torch.nn.Module:
    """The spec's net, with the weights of ``output.init`` when given (the same net spec, or a
    ``JobError`` naming both)."""
    from restorer.nets import net_spec

    net = build_net(spec.net)
    if spec.output.init:
        from restorer.weights.zoo import get_model

        start = get_model(spec.output.init, options)
        if start.spec != net_spec(build_net(spec.net)):
            raise JobError(f"{spec.output.init} holds net {start.spec}, not {spec.net}; "
                           "fine-tuning needs the same net spec")
        net.load_state_dict(start.net.state_dict())
    return net


def _report(spec: TrainSpec, trainer: Trainer, metrics: dict[str, Any],
            history: list[dict[str, Any]], val_images: list[np.ndarray], rank: int,
            world_size: int) -> None:
    """Report a checkpoint to Ray Train at the same step on every rank: rank 0 validates the
    averaged weights on the CPU, adds the figures to ``metrics`` and ``history`` and hands a
    checkpoint folder over; the other ranks report ``metrics`` alone."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    model = build_net(spec.net)  # on the CPU, where validation runs
    model.load_state_dict(trainer.averaged().state_dict())
    if val_images:
        metrics.update(validate_net(model, val_images, spec.degradation, spec.data.val_crop))
    history.append(metrics)
    step = metrics["step"]
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(folder, spec, model, trainer, step, history, world_size)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


class _Control:
    """What rank 0 tells the driver (progress, checkpoints) and what all ranks decide together:
    whether a checkpoint is due by time or a stop was asked for. Those two are decided by rank
    0 every ``CONTROL_STEPS`` steps and broadcast, so every rank checkpoints (and reports to
    Ray Train) at the same step."""

    CONTROL_STEPS = 10  # steps between decisions shared by all ranks
    PROGRESS_SECONDS = 0.2  # rank 0 sends progress at most this often
    STOP_POLL_SECONDS = 0.5  # ... and asks the driver whether to stop at most this often

    def __init__(self, rank: int, events: Any, every_seconds: float) -> None:
        self.rank, self.events, self.every_seconds = rank, events, every_seconds
        self.last_checkpoint = self.last_sent = self.last_poll = time.time()
        self.stop = False

    def progress(self, step: int, loss: float) -> None:
        now = time.time()
        if self.rank == 0 and self.events is not None and now - self.last_sent >= \
                self.PROGRESS_SECONDS:
            self.last_sent = now
            self.events.put.remote({"kind": "step", "step": step, "loss": float(loss)})

    def checkpoint_due(self, step: int, every: int, steps: int) -> str:
        """"" or why a checkpoint is written at ``step``: "steps", "time", "stop" or "end"."""
        if step % self.CONTROL_STEPS == 0:
            decision = ""
            if self.rank == 0:
                import ray

                now = time.time()
                if self.events is not None and now - self.last_poll >= self.STOP_POLL_SECONDS:
                    self.last_poll = now
                    self.stop = ray.get(self.events.stop_requested.remote())
                if self.stop:
                    decision = "stop"
                elif self.every_seconds and now - self.last_checkpoint >= self.every_seconds:
                    decision = "time"
            decision = _same_on_every_rank(decision)
            if decision == "stop" and step < steps:
                return "stop"
            if decision == "time" and step % every and step < steps:
                return f"{self.every_seconds:g} s since the last one"
        if step == steps:
            return "end"
        return f"every {every} steps" if step % every == 0 else ""

    def checkpointed(self, metrics: dict[str, Any], why: str) -> None:
        self.last_checkpoint = time.time()
        if self.rank == 0 and self.events is not None:
            self.events.put.remote({"kind": "checkpoint", "why": why, **{
                k: v for k, v in metrics.items() if k in ("step", "loss", "val_psnr")}})


def _same_on_every_rank(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (DDP ranks must resume from one checkpoint, even if a
    folder completes between their listings)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


__all__ = [
    "CHECKPOINT_FILES",
    "CHECKPOINT_FORMAT_VERSION",
    "DEGRADATIONS",
    "Degradation",
    "Optim",
    "Output",
    "TrainData",
    "TrainSpec",
    "Validation",
    "checkpoint_folders",
    "degrade_batch",
    "load_clean_images",
    "plot_curves",
    "prune_checkpoints",
    "resume_state",
    "run_train",
    "train_loop_per_worker",
    "validate_net",
]
