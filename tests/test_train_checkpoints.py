"""Checkpoint folders of a training run (restorer.train.checkpoints), without Ray."""

import json
import logging
import zipfile

import torch

from restorer.io.storage import StorageOptions
from restorer.job.specs import spec_from_dict
from restorer.nets import build_net
from restorer.train import core
from restorer.train.checkpoints import (
    checkpoint_folders,
    read_checkpoint,
    resume_state,
    write_checkpoint,
)
from restorer.weights.checkpoint import load_model

NET = {"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 3}
SPEC = spec_from_dict({"kind": "train", "name": "run", "net": NET, "data": {"uri": "data"},
                       "optim": {"ema": 0.9}})


def _trainer(seed: int = 0) -> core.Trainer:
    torch.manual_seed(seed)
    net = build_net(NET)
    return core.Trainer(net, torch.optim.Adam(net.parameters(), lr=1e-2), "l1",
                         core.Precision(), core.EMA(net, 0.9))


def _steps(trainer: core.Trainer, count: int) -> None:
    generator = torch.Generator().manual_seed(7)
    for _ in range(count):
        clean = torch.rand(2, 1, 16, 16, generator=generator)
        trainer.step(clean, clean + 0.1 * torch.randn(clean.shape, generator=generator), 1e-2)


def _write(run, trainer, step, history):
    folder = run / f"checkpoint_{step:06d}"
    folder.mkdir(parents=True)
    model = build_net(NET)
    model.load_state_dict(trainer.averaged().state_dict())
    write_checkpoint(str(folder), SPEC, model, trainer, step, history, world_size=2)
    return folder


def test_a_checkpoint_folder_holds_the_model_state_meta_and_history(tmp_path):
    trainer = _trainer()
    _steps(trainer, 3)
    history = [{"step": 3, "loss": 0.5, "val_psnr": 30.123456}]
    folder = _write(tmp_path / "run", trainer, 3, history)
    assert json.loads((folder / "meta.json").read_text()) == {"format_version": 1, "step": 3}
    assert [json.loads(line) for line in (folder / "history.jsonl").open()] == history
    # state.pt as torch.save writes it to a file named state.pt (the format on disk)
    assert "state/data.pkl" in zipfile.ZipFile(folder / "state.pt").namelist()
    model = load_model(str(folder / "model.safetensors"))  # the EMA weights, with provenance
    ema = trainer.ema.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in model.net.state_dict().items())
    assert model.provenance["steps"] == 3 and model.provenance["workers"] == 2
    assert model.provenance["metrics"] == {"val_psnr": 30.1235}
    state, step, read_history = read_checkpoint(lambda name: (folder / name).read_bytes())
    assert (step, read_history, list(state)) == (3, history, ["optimizer", "ema", "net"])


def test_resume_takes_the_newest_folder_that_loads_and_continues_exactly(tmp_path, caplog):
    run = tmp_path / "run"
    trainer = _trainer()
    _steps(trainer, 2)
    _write(run, trainer, 2, [{"step": 2, "loss": 1.0}])
    _steps(trainer, 2)
    _write(run, trainer, 4, [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.9}])
    for step, damage in ((6, lambda data: b""), (8, lambda data: b"not a zip"),
                         (10, lambda data: data[:len(data) // 2])):
        state_pt = _write(run, trainer, step, [{"step": step, "loss": 0.8}]) / "state.pt"
        state_pt.write_bytes(damage(state_pt.read_bytes()))
    partial = _write(run, trainer, 12, [{"step": 12, "loss": 0.7}])
    (partial / "state.pt").unlink()  # not complete: not even a candidate
    options = StorageOptions()
    assert [step for step, _ in checkpoint_folders(str(run), options)] == [10, 8, 6, 4, 2]
    with caplog.at_level(logging.WARNING):
        state, step, history, where = resume_state(str(run), options)
    assert step == 4 and where.endswith("checkpoint_000004") and len(history) == 2
    for skipped in ("checkpoint_000006", "checkpoint_000008", "checkpoint_000010"):
        assert skipped in caplog.text  # tried, found broken, skipped with a warning
    resumed = _trainer(seed=1)
    resumed.load_state_dict(state)
    reference = _trainer()
    _steps(reference, 2)
    _steps(reference, 2)  # the run as it was at step 4 ...
    for trainer_ in (reference, resumed):  # ... and both continue alike, bit for bit
        _steps(trainer_, 2)
    for part in ("net", "ema"):
        mine, theirs = reference.state_dict()[part], resumed.state_dict()[part]
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), part
    assert resume_state(str(tmp_path / "empty"), options) is None
