import io
import pickle

import pytest
import torch
from safetensors.torch import save as save_tensors

from restorer.errors import ModelError
from restorer.nets import build_net
from restorer.weights.checkpoint import load_model, model_bytes, save_model
from restorer.weights.zoo import DEFAULT_MODEL, bundled, get_model, resolve_model_uri


def test_round_trip_keeps_weights_spec_and_provenance(tmp_path):
    net = build_net({"arch": "dncnn", "channels": 3, "num_features": 8, "num_layers": 4})
    sha = save_model(str(tmp_path / "m.safetensors"), net, {"steps": 3})
    loaded = load_model(str(tmp_path / "m.safetensors"))
    assert loaded.sha256 == sha and loaded.provenance == {"steps": 3}
    assert loaded.spec["channels"] == 3 and not loaded.net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.net.state_dict()[k])


def test_pickles_are_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelError, match="pickled PyTorch checkpoint.*restorer convert"):
        load_model(str(path))
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buffer)
    (tmp_path / "zip.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ModelError, match="pickled"):
        load_model(str(tmp_path / "zip.pt"))


def test_a_safetensors_header_whose_length_starts_with_0x80_is_not_a_pickle(tmp_path):
    """Regression: a header of 128 + 256k bytes made the file look like a pickle (0x80)."""
    net = build_net({"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 4})
    for pad in range(300):
        data = model_bytes(net, {"note": "x" * pad})
        if data[0] == 0x80:
            break
    else:
        pytest.fail("no provenance length gave a header length with low byte 0x80")
    (tmp_path / "m.safetensors").write_bytes(data)
    assert load_model(str(tmp_path / "m.safetensors")).provenance["note"] == "x" * pad


def test_bare_or_mismatched_safetensors_are_refused(tmp_path):
    (tmp_path / "bare.safetensors").write_bytes(save_tensors({"w": torch.zeros(2)}))
    with pytest.raises(ModelError, match="without a restorer net spec"):
        load_model(str(tmp_path / "bare.safetensors"))
    net = build_net({"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 4})
    save_model(str(tmp_path / "m.safetensors"), net)
    data = (tmp_path / "m.safetensors").read_bytes()
    assert b'num_features\\": 8' in data  # the spec is a JSON string inside the header
    data = data.replace(b'num_features\\": 8', b'num_features\\": 9')
    (tmp_path / "bad.safetensors").write_bytes(data)
    with pytest.raises(ModelError, match="do not match its net spec"):
        load_model(str(tmp_path / "bad.safetensors"))


def test_default_model_is_bundled_and_loads():
    assert DEFAULT_MODEL in bundled()
    loaded = get_model(None)
    assert loaded.spec["arch"] == "unet" and loaded.spec["channels"] == 3 and loaded.provenance
    with pytest.raises(ModelError, match="Unknown model 'no-such-model'"):
        resolve_model_uri("no-such-model")
