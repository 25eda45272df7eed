"""`restorer convert`: state dicts and whole pickled modules, read without running anything."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from restorer.cli import main
from restorer.errors import ModelError
from restorer.image.metrics import psnr
from restorer.nets import build_net
from restorer.weights.checkpoint import load_model
from restorer.weights.unpickle import UnsafePickleError, read_torch_file

SHARED = Path(__file__).resolve().parents[2] / "shared"
PEER_MODEL = SHARED / "peer-models" / "dncnn-pytorch-sigma25" / "model.pth"

FORMATS = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False}}

# Appended to by PublishedDnCNN.__setstate__, which only a real unpickling of the class runs.
UNPICKLED: list[str] = []


class PublishedDnCNN(nn.Module):
    """The layout of the DnCNN authors' PyTorch net: no last bias, BatchNorm eps 1e-4."""

    def __init__(self, depth: int = 5, n_channels: int = 8, image_channels: int = 1,
                 padding: int = 1):
        super().__init__()
        layers = [nn.Conv2d(image_channels, n_channels, 3, padding=padding), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(n_channels, n_channels, 3, padding=padding, bias=False),
                       nn.BatchNorm2d(n_channels, eps=1e-4, momentum=0.95), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(n_channels, image_channels, 3, padding=padding, bias=False))
        self.dncnn = nn.Sequential(*layers)

    def forward(self, x):
        return x - self.dncnn(x)

    def __setstate__(self, state):
        UNPICKLED.append(type(self).__name__)
        super().__setstate__(state)


class LeakyNet(nn.Module):
    """Shapes like a DnCNN, but LeakyReLU activations: not importable as dncnn."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(8, 1, 3, padding=1))


def _trained_looking(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, so that eps and every tensor matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*net.parameters(), *net.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.2 + 1e-3)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.mul_(1e-2)  # eps 1e-4 vs 1e-5 changes the output
    return net.eval()


def _convert(*args: str):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_converts_without_flags(tmp_path, fmt):
    ours = _trained_looking(build_net({"arch": "dncnn", "num_features": 8, "num_layers": 5}))
    published = {name.replace("body.", "model."): t for name, t in ours.state_dict().items()}
    torch.save(published, tmp_path / "sd.pth", **FORMATS[fmt])
    result = _convert(tmp_path / "sd.pth", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output
    loaded = load_model(str(tmp_path / "out.safetensors"))
    assert loaded.spec == {"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 5,
                           "batch_norm": True, "batch_norm_eps": 1e-5, "last_bias": True}
    x = torch.rand(1, 1, 12, 10)
    with torch.no_grad():
        assert torch.equal(loaded.net(x), ours(x))
    imported = loaded.provenance["imported"]
    assert imported["sha256"] == hashlib.sha256((tmp_path / "sd.pth").read_bytes()).hexdigest()
    assert imported["format"].startswith(fmt) and imported["content"] == "state dict"
    assert any("eps" in note for note in imported["notes"])  # a state dict does not hold eps


def test_bare_safetensors_and_nested_state_dicts_convert(tmp_path):
    ours = _trained_looking(build_net({"arch": "dncnn", "num_features": 8, "num_layers": 3}))
    save_file({name.replace("body.", "model."): t for name, t in ours.state_dict().items()},
              str(tmp_path / "bare.safetensors"))  # stored as bias, weight: names must map
    torch.save({"epoch": 3, "state_dict": ours.state_dict()}, tmp_path / "ckpt.pth")
    x = torch.rand(1, 1, 8, 8)
    for source in ("bare.safetensors", "ckpt.pth"):
        result = _convert(tmp_path / source, tmp_path / f"{source}.out")
        assert result.exit_code == 0, result.output
        loaded = load_model(str(tmp_path / f"{source}.out"))
        assert loaded.spec["batch_norm"] is True and loaded.spec["num_layers"] == 3
        with torch.no_grad():
            assert torch.equal(loaded.net(x), ours(x)), source


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_module_converts_faithfully_without_importing_its_class(tmp_path, fmt):
    published = _trained_looking(PublishedDnCNN())
    torch.save(published, tmp_path / "whole.pth", **FORMATS[fmt])
    UNPICKLED.clear()
    result = _convert(tmp_path / "whole.pth", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output
    assert UNPICKLED == []  # the class in the file was never instantiated for real
    loaded = load_model(str(tmp_path / "out.safetensors"))
    assert loaded.spec["batch_norm_eps"] == 1e-4 and loaded.spec["last_bias"] is False
    assert (loaded.spec["num_layers"], loaded.spec["num_features"]) == (5, 8)
    x = torch.rand(2, 1, 9, 13)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), published(x), rtol=0, atol=1e-6)
    assert loaded.provenance["imported"]["content"].endswith("PublishedDnCNN")
    listing = CliRunner().invoke(main, ["models", str(tmp_path / "out.safetensors")])
    assert listing.exit_code == 0, listing.output
    sha = hashlib.sha256((tmp_path / "whole.pth").read_bytes()).hexdigest()
    assert f"imported from {tmp_path / 'whole.pth'} (sha256 {sha[:12]}" in listing.output
    assert "BatchNorm eps 0.0001, no bias on the last convolution" in listing.output


def test_flags_that_disagree_with_the_file_are_refused(tmp_path):
    torch.save(_trained_looking(PublishedDnCNN()), tmp_path / "whole.pth")
    result = _convert(tmp_path / "whole.pth", tmp_path / "out.safetensors", "--num-layers", "17")
    assert result.exit_code == 1 and "num_layers=5" in result.output
    result = _convert(tmp_path / "whole.pth", tmp_path / "out.safetensors",
                      "--batch-norm-eps", "1e-5")
    assert result.exit_code == 1 and "eps 0.0001" in result.output
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("net, reason", [
    (PublishedDnCNN(padding=0), "padding=(0, 0)"),  # same shapes, other maths
    (LeakyNet(), "LeakyReLU"),
])
def test_unknown_layouts_are_refused_with_what_was_found(tmp_path, net, reason):
    torch.save(net, tmp_path / "net.pth")
    result = _convert(tmp_path / "net.pth", tmp_path / "out.safetensors")
    assert result.exit_code == 1
    assert reason in result.output and "--net options: dncnn, srnet, unet" in result.output
    result = _convert(tmp_path / "net.pth", tmp_path / "out.safetensors", "--num-layers", "3")
    assert result.exit_code == 1 and reason in result.output  # flags do not override it
    first = next(iter(net.state_dict()))  # e.g. dncnn.0.weight: the layers are listed
    assert first.rsplit(".", 1)[0] + " Conv2d: weight 8x1x3x3, bias 8" in result.output


def test_a_state_dict_of_another_architecture_is_refused(tmp_path):
    unet = build_net({"arch": "unet"})
    torch.save(unet.state_dict(), tmp_path / "unet.pth")
    result = _convert(tmp_path / "unet.pth", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "--net options" in result.output
    name, tensor = next(iter(unet.state_dict().items()))
    assert "x".join(map(str, tensor.shape)) in result.output
    assert name.rsplit(".", 1)[0] in result.output


# --- pickles that would run code ----------------------------------------------------------

def _create_file(path):  # reached through a pickle only if the loader calls unknown globals
    Path(path).touch()


class _System:
    def __init__(self, path): self.path = path
    def __reduce__(self): return os.system, (f"touch {self.path}",)


class _Eval:
    def __init__(self, path): self.path = path
    def __reduce__(self): return eval, (f"open({str(self.path)!r}, 'w').close()",)


class _Subprocess:
    def __init__(self, path): self.path = path
    def __reduce__(self): return subprocess.call, (["touch", str(self.path)],)


class _OwnFunction:
    def __init__(self, path): self.path = path
    def __reduce__(self): return _create_file, (str(self.path),)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload, global_name", [
    (_System, "posix.system"), (_Eval, "builtins.eval"), (_Subprocess, "subprocess.call"),
    (_OwnFunction, "_create_file"),
])
def test_pickles_that_would_run_code_are_refused_and_nothing_runs(tmp_path, fmt, payload,
                                                                  global_name):
    marker = tmp_path / "pwned"
    sd = {"body.0.weight": torch.zeros(8, 1, 3, 3), "hook": payload(marker)}
    torch.save(sd, tmp_path / "evil.pth", **FORMATS[fmt])
    assert not marker.exists()
    result = _convert(tmp_path / "evil.pth", tmp_path / "out.safetensors")
    assert result.exit_code == 1
    assert global_name in result.output and "nothing was run" in result.output
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_a_plain_pickle_of_a_call_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    data = b"\x80\x02" + pickle.dumps(_System(marker), protocol=2)[2:]
    with pytest.raises(UnsafePickleError, match="posix.system"):
        read_torch_file(data, "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensors_keep_their_dtypes_offsets_and_strides(tmp_path, fmt):
    base = torch.arange(40, dtype=torch.float32)
    tensors = {"slice": base[5:17].view(3, 4), "transposed": base[:12].view(3, 4).t(),
               "half": torch.rand(2, 3).half(), "count": torch.tensor(7), "mask": base > 20}
    torch.save(tensors, tmp_path / "t.pth", **FORMATS[fmt])
    read = read_torch_file((tmp_path / "t.pth").read_bytes(), "t.pth").obj
    assert list(read) == list(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_truncated_files_are_refused(tmp_path):
    torch.save(build_net({"arch": "dncnn", "num_features": 8, "num_layers": 3}).state_dict(),
               tmp_path / "sd.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "sd.pth").read_bytes()
    with pytest.raises(ModelError, match="truncated|ends inside"):
        read_torch_file(data[:-100], "sd.pth")


def test_model_specs_without_the_new_fields_keep_todays_layout():
    net = build_net({"arch": "dncnn", "num_features": 8, "num_layers": 4})
    assert net.body[-1].bias is not None and net.body[3].eps == 1e-5


# --- the DnCNN authors' own model ---------------------------------------------------------

@pytest.mark.skipif(not PEER_MODEL.exists(), reason=f"{PEER_MODEL} is not present")
def test_the_authors_dncnn_converts_and_denoises(tmp_path):
    result = _convert(PEER_MODEL, tmp_path / "dncnn.safetensors")
    assert result.exit_code == 0, result.output
    loaded = load_model(str(tmp_path / "dncnn.safetensors"))
    assert loaded.spec == {"arch": "dncnn", "channels": 1, "num_features": 64, "num_layers": 17,
                           "batch_norm": True, "batch_norm_eps": 1e-4, "last_bias": False}
    imported = loaded.provenance["imported"]
    assert imported["sha256"] == hashlib.sha256(PEER_MODEL.read_bytes()).hexdigest()
    assert imported["content"] == "whole module __main__.DnCNN"
    assert json.dumps(imported)  # provenance stays plain JSON
    image_path = SHARED / "data" / "set12" / "01.png"
    if not image_path.exists():
        pytest.skip(f"{image_path} is not present")
    clean = np.asarray(Image.open(image_path).convert("L"), dtype=np.float32)[64:192, 64:192] / 255
    noisy = clean + np.random.default_rng(0).normal(0, 25 / 255, clean.shape).astype(np.float32)
    with torch.no_grad():
        restored = loaded.net(torch.from_numpy(noisy)[None, None])[0, 0].clamp(0, 1).numpy()
    gain = psnr(restored * 255, clean * 255) - psnr(np.clip(noisy, 0, 1) * 255, clean * 255)
    assert gain > 7, gain  # 7.9 dB measured; random or mis-ordered weights do not get here
