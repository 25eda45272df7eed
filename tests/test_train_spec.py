"""Train specs and the per-patch degradations of the Ray Train job, without Ray."""

import numpy as np
import pytest
import torch

from restorer.errors import SpecError
from restorer.jobs import spec_from_dict
from restorer.nets import build_net
from restorer.train_job import Degradation, degrade_batch, validate_net

SR_NET = {"arch": "srnet", "scale": 2, "num_features": 4, "num_blocks": 1}


def _spec(**changes):
    spec = {"kind": "train", "name": "t", "net": SR_NET, "data": {"uri": "imgs/"},
            "degradation": {"kind": "sr"}, "optim": {"patch_size": 32}}
    for section, values in changes.items():
        spec[section] = values if section == "net" else {**spec.get(section, {}), **values}
    return spec_from_dict(spec).validate()


def test_super_resolution_specs_pair_sr_nets_with_the_sr_degradation():
    assert _spec().degradation.kind == "sr"
    with pytest.raises(SpecError, match='scale is 2 and degradation.kind is \'noise\''):
        _spec(degradation={"kind": "noise"})
    with pytest.raises(SpecError, match="scale is 1 and degradation.kind is 'sr'"):
        _spec(net={"arch": "dncnn", "num_features": 4, "num_layers": 3})
    with pytest.raises(SpecError, match="multiple of the net's scale 2"):
        _spec(optim={"patch_size": 33})
    with pytest.raises(SpecError, match="optim.precision = 'fp16'"):
        _spec(optim={"precision": "fp16"})


def test_sr_batches_are_matlab_downscales_and_validate_on_the_large_image():
    rng = np.random.default_rng(0)
    clean = rng.random((3, 32, 32)).astype(np.float32)
    low = degrade_batch(clean, Degradation(kind="sr"), rng, scale=2)
    assert low.shape == (3, 16, 16) and low.dtype == np.float32
    torch.manual_seed(0)
    net = build_net(SR_NET)
    result = validate_net(net, [rng.random((37, 41)).astype(np.float32)], Degradation(kind="sr"),
                          crop=0)
    assert np.isfinite(result["val_psnr"]) and result["val_input_psnr"] > 0
