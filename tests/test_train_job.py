"""Ray Train jobs: 2 DDP workers on the shared local Ray, checkpoints, resume, faults, S3."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from restorer.io.samples import write_samples
from restorer.job.specs import spec_from_dict
from restorer.pipeline import RestoreActor
from restorer.train.distributed import run_train
from restorer.weights.zoo import get_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    write_samples(str(root / "train"), sigma=0)
    write_samples(str(root / "val"), sigma=0)
    return root


def _spec(data, storage_path, name, steps=8, workers=2):
    return spec_from_dict({
        "kind": "train", "name": name,
        "net": {"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 4},
        "data": {"uri": str(data / "train"), "val_uri": str(data / "val"), "val_images": 2,
                 "val_crop": 64},
        "optim": {"steps": steps, "batch_size": 4, "patch_size": 32, "seed": 3},
        "validation": {"every": 2},
        "output": {"storage_path": storage_path},
        "resources": {"workers": workers},
    })


def _curve(history):
    return [(h["step"], round(h["loss"], 5), round(h["val_psnr"], 4)) for h in history]


def _history(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _checkpoints(run):
    return [d for d in os.listdir(run) if d.startswith("checkpoint_")] if os.path.isdir(run) \
        else []


def _train_worker_pids():
    import ray._private.state

    return [a["Pid"] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and "RayTrainWorker" in a["ActorClassName"]]


def test_two_workers_checkpoint_resume_and_survive_a_killed_worker(ray_session, data,
                                                                    tmp_path):
    clean = run_train(_spec(data, str(tmp_path), "clean"))
    assert clean["steps"] == 8
    curve = _curve(_history(tmp_path / "clean" / "history.jsonl"))
    assert [s for s, _, _ in curve] == [2, 4, 6, 8]
    assert (tmp_path / "clean" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "clean" / "report.html").read_text()
    for section in ("summary", "curves", "history", "samples"):
        assert f'id="{section}"' in page
    assert page.count("data:image/png;base64,") >= 1 + 3 * 2  # curves + 2 validation crops

    # the run's model is the checkpoint with the best validation PSNR (not the last), a
    # restorer model that restore uses, its provenance naming that step and its metrics
    model = get_model(str(tmp_path / "clean" / "model.safetensors"))
    history = _history(tmp_path / "clean" / "history.jsonl")
    best = max(history, key=lambda h: h["val_psnr"])
    assert model.provenance["steps"] == best["step"] and model.provenance["workers"] == 2
    assert model.provenance["metrics"]["val_psnr"] == round(best["val_psnr"], 4)
    actor = RestoreActor(model=str(tmp_path / "clean" / "model.safetensors"), tile=0)
    restored, _ = actor.restore_arrays([np.full((20, 20, 1), 128, np.uint8)])
    assert restored[0].shape == (20, 20, 1)

    # a run killed part-way (SIGKILL of the whole job) continues at the right step on rerun,
    # on the same curve
    spec_file = tmp_path / "resumed.toml"
    spec_file.write_text(f'''kind = "train"
name = "resumed"
[net]
arch = "dncnn"
channels = 1
num_features = 8
num_layers = 4
[data]
uri = "{data / 'train'}"
val_uri = "{data / 'val'}"
val_images = 2
val_crop = 64
[optim]
steps = 8
batch_size = 4
patch_size = 32
seed = 3
[validation]
every = 2
[output]
storage_path = "{tmp_path}"
[resources]
workers = 2
''')
    address = ray_session.get_runtime_context().gcs_address
    job = subprocess.Popen([sys.executable, "-m", "restorer", "train", str(spec_file),
                            "--address", address], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not _checkpoints(tmp_path / "resumed") and time.time() < deadline:
            time.sleep(0.2)
        job.send_signal(signal.SIGKILL)
        job.wait(30)
    finally:
        job.kill()
    assert _checkpoints(tmp_path / "resumed"), "no checkpoint appeared in time"
    resumed = run_train(_spec(data, str(tmp_path), "resumed"))
    assert resumed["steps"] == 8
    assert _curve(_history(tmp_path / "resumed" / "history.jsonl")) == curve

    # a worker killed mid-run: FailureConfig restarts the group from the last checkpoint
    killed = []

    def killer():
        deadline = time.time() + 180
        while not _checkpoints(tmp_path / "faulty") and time.time() < deadline:
            time.sleep(0.1)
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    thread = threading.Thread(target=killer)
    thread.start()
    faulty = run_train(_spec(data, str(tmp_path), "faulty"))
    thread.join()
    assert killed, "no train worker was found to kill"
    assert faulty["steps"] == 8
    assert _curve(_history(tmp_path / "faulty" / "history.jsonl")) == curve


def test_checkpoints_on_s3_and_resume_from_them(ray_session, data, bucket):
    import s3fs

    first = run_train(_spec(data, f"s3://{bucket}/runs", "s3run", steps=4, workers=1))
    assert first["steps"] == 4
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    assert fs.exists(f"{bucket}/runs/s3run/model.safetensors")
    second = run_train(_spec(data, f"s3://{bucket}/runs", "s3run", steps=6, workers=1))
    history = [json.loads(line) for line in
               fs.cat_file(f"{bucket}/runs/s3run/history.jsonl").decode().splitlines()]
    assert [h["step"] for h in history] == [2, 4, 6]  # steps 2 and 4 came from the first run
    assert second["steps"] == 6


def test_a_super_resolution_net_trains_and_its_model_restores(ray_session, data, tmp_path):
    spec = spec_from_dict({
        "kind": "train", "name": "sr",
        "net": {"arch": "srnet", "scale": 2, "num_features": 8, "num_blocks": 1},
        "data": {"uri": str(data / "train"), "val_uri": str(data / "val"), "val_images": 2,
                 "val_crop": 64},
        "degradation": {"kind": "sr"},
        "optim": {"steps": 4, "batch_size": 4, "patch_size": 32},
        "validation": {"every": 2},
        "output": {"storage_path": str(tmp_path)},
        "resources": {"workers": 1},
    })
    summary = run_train(spec)
    assert summary["steps"] == 4 and np.isfinite(summary["final"]["val_psnr"])
    model = get_model(summary["model"])
    assert model.net.scale == 2
    actor = RestoreActor(model=summary["model"], tile=0)
    restored, _ = actor.restore_arrays([np.zeros((20, 30, 1), np.uint8)])
    assert restored[0].shape == (40, 60, 1)
