"""A training run's checkpoint folders on storage: write, list, resume from, prune.

A run lives under ``STORAGE/NAME/`` (a local folder or ``s3://`` prefix). Every checkpoint is
a folder ``checkpoint_*`` (named by Ray Train) holding:

- ``model.safetensors`` - a restorer model (the EMA weights when the run keeps an EMA) with
  its net spec and provenance, loadable by ``restorer restore --model``;
- ``state.pt`` - the :class:`restorer.train.core.Trainer` state (optimizer, EMA, trained weights),
  read back with ``weights_only=True``;
- ``meta.json`` - ``{"format_version", "step"}``;
- ``history.jsonl`` - the run's metrics so far, one JSON record per validation.

A folder counts when the first three files are there and ``meta.json`` reads; a resume takes
the newest one that loads. No Ray here: :mod:`restorer.train.distributed` passes Ray's checkpoint
in.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from restorer.errors import JobError, RestorerError, StorageError
from restorer.io import storage
from restorer.job.specs import TrainSpec, spec_to_dict
from restorer.train.core import Trainer, load_state, save_state
from restorer.weights.checkpoint import count_parameters, model_bytes

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_FILES = ("model.safetensors", "state.pt", "meta.json")


def write_checkpoint(folder: str, spec: TrainSpec, model: nn.Module, trainer: Trainer,
                     step: int, history: list[dict[str, Any]], world_size: int) -> None:
    """Write a checkpoint of ``trainer`` at ``step`` into the local ``folder``; ``model`` is
    the net shipped in ``model.safetensors``, ``history[-1]`` its metrics."""
    last = history[-1]
    provenance = {"command": f"restorer train (run {spec.name})", "spec": spec_to_dict(spec),
                  "steps": step, "workers": world_size, "metrics": {
                      k: round(v, 4) for k, v in last.items() if k.startswith("val_")},
                  "parameters": count_parameters(model)}
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(model_bytes(model, provenance))
    save_state(trainer.state_dict(), os.path.join(folder, "state.pt"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"format_version": CHECKPOINT_FORMAT_VERSION, "step": step}, f)
    with open(os.path.join(folder, "history.jsonl"), "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)


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


def read_checkpoint(read: Callable[[str], bytes]
                    ) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
    """(state, step, history) from a checkpoint folder, given ``read(name) -> bytes``."""
    meta = json.loads(read("meta.json"))
    if meta["format_version"] > CHECKPOINT_FORMAT_VERSION:
        raise JobError("checkpoint written by a newer restorer; upgrade restorer")
    state = load_state(read("state.pt"))
    try:
        lines = read("history.jsonl").decode().splitlines()
    except (StorageError, OSError):
        lines = []
    return state, int(meta["step"]), [json.loads(line) for line in lines if line.strip()]


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

                return (*read_checkpoint(read_local), ray_checkpoint.path)
    for step, folder in candidates:
        try:
            return (*read_checkpoint(lambda name, folder=folder: storage.read_bytes(
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


__all__ = ["CHECKPOINT_FILES", "CHECKPOINT_FORMAT_VERSION", "checkpoint_folders",
           "prune_checkpoints", "read_checkpoint", "resume_state", "write_checkpoint"]
