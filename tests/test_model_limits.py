"""Model files and stores that could hurt a job: torch's floor, zip bombs, hostile net sizes in
a file's metadata, and an output store that ignores create-only writes. Without Ray."""

from __future__ import annotations

import io
import json
import logging
import os
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from PIL import Image
from safetensors.torch import save as save_tensors

from restorer.errors import ModelError
from restorer.io import storage
from restorer.nets import build_net
from restorer.weights.checkpoint import MODEL_FORMAT, MODEL_FORMAT_VERSION, load_model_bytes
from restorer.weights.unpickle import read_torch_file

ROOT = Path(__file__).resolve().parents[1]


def test_torch_is_at_least_2_6():
    """torch.load(weights_only=True) (training checkpoints) could run code before 2.6."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_requirement = next(Requirement(d) for d in dependencies if d.startswith("torch"))
    assert not torch_requirement.specifier.contains("2.5.1")
    assert torch_requirement.specifier.contains("2.6.0")


def test_a_zip_bomb_in_a_torch_file_is_refused_before_it_is_inflated():
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 << 20))  # 64 MiB in ~64 KB
    data = sink.getvalue()
    assert len(data) < 1 << 20
    with pytest.raises(ModelError, match="would inflate to 67,108,864 bytes"):
        read_torch_file(data, "bomb.pt")


def test_a_real_torch_file_is_within_the_caps():
    sink = io.BytesIO()
    torch.save({"weight": torch.arange(1000, dtype=torch.float32)}, sink)
    loaded = read_torch_file(sink.getvalue(), "real.pt").obj
    assert torch.equal(loaded["weight"], torch.arange(1000, dtype=torch.float32))


def _model_file(spec: dict) -> bytes:
    return save_tensors({"x": torch.zeros(1)}, metadata={
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "net": json.dumps(spec)})


def test_a_hostile_net_size_in_a_model_file_is_refused_before_allocating():
    data = _model_file({"arch": "dncnn", "channels": 1, "num_features": 10**6, "num_layers": 3,
                        "batch_norm": False})
    with pytest.raises(ModelError, match="num_features = 1000000 is outside"):
        load_model_bytes(data, "hostile.safetensors")


def test_a_net_above_the_parameter_cap_is_refused():
    """Counted on the meta device (nothing allocated): 3 x 4096^2 x 9 = 453 M parameters."""
    from restorer.nets import MAX_NET_PARAMETERS

    spec = {"arch": "dncnn", "channels": 1, "num_features": 4096, "num_layers": 5,
            "batch_norm": False}
    with pytest.raises(ModelError, match=f"453,074,945 parameters, more than "
                                         f"{MAX_NET_PARAMETERS:,}"):
        build_net(spec)
    build_net(dict(spec, num_features=64, num_layers=17))  # the paper's DnCNN: fine


def test_create_only_probe(tmp_path, monkeypatch):
    assert storage.create_only_honoured(str(tmp_path / "_restorer"))
    assert os.listdir(tmp_path / "_restorer") == []  # the probe is removed

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert not storage.create_only_honoured(str(tmp_path / "_restorer"))


def test_create_only_probe_on_s3(s3_server, bucket, monkeypatch):
    folder = f"s3://{bucket}/out/_restorer"
    assert storage.create_only_honoured(folder)
    fs, _ = storage.filesystem(folder)
    real_pipe = fs.pipe_file

    def ignoring_if_none_match(path, data, mode="overwrite", **kwargs):
        return real_pipe(path, data, **kwargs)  # a store that ignores If-None-Match

    monkeypatch.setattr(fs, "pipe_file", ignoring_if_none_match)
    assert not storage.create_only_honoured(folder)
    assert storage.list_names(folder) == []


def test_a_job_on_a_store_without_create_only_writes_warns_what_exactly_once_means(
        tmp_path, tiny_model, monkeypatch, caplog):
    """Checked at start, before the lease: stopped here by a live lease (no Ray needed)."""
    from restorer.errors import OutputConflictError
    from restorer.output.lease import Lease
    from restorer.pipeline import restore

    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(source / "a.png")
    out = tmp_path / "out"
    monkeypatch.setattr(storage, "create_only_honoured", lambda folder, options=None: False)
    with Lease(str(out / "_restorer" / "lease.json"), heartbeat_seconds=3600), \
            caplog.at_level(logging.WARNING), pytest.raises(OutputConflictError):
        restore(str(source), str(out), model=tiny_model)
    assert "does not refuse a second create-only write" in caplog.text
    assert "one job at a time" in caplog.text
