"""Train specs and the per-patch degradations of the Ray Train job, without Ray."""

import numpy as np
import pytest
import torch
from helpers import matlab_imresize

from restorer.errors import SpecError
from restorer.io.samples import scene
from restorer.job.specs import Degradation, spec_from_dict
from restorer.nets import build_net
from restorer.train.data import degrade_batch, validate_net

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


def test_sr_batches_are_matlab_downscales_and_validate_on_the_large_image(rng):
    # The reference is MATLAB imresize(x, 1/2) written from its formulas in helpers.py
    # (Keys cubic a = -0.5, kernel stretched by 2 for antialiasing, mirrored edges).
    clean = rng.random((3, 32, 32)).astype(np.float32)
    low = degrade_batch(clean, Degradation(kind="sr"), rng, scale=2)
    assert low.shape == (3, 16, 16) and low.dtype == np.float32
    for patch, small in zip(clean, low):
        np.testing.assert_allclose(small, matlab_imresize(patch, 0.5), atol=1e-6)

    # Validation shrinks the whole (mod-cropped) image, not a patch of it, and measures the
    # net's output and the bicubic input against the image itself.
    class Bicubic(torch.nn.Module):  # an "SR net" that is MATLAB's bicubic upscale
        scale = 2

        def forward(self, x):
            return torch.from_numpy(matlab_imresize(x[0, 0].numpy(), 2.0)[None, None])

    image = scene(37, 41, 1, seed=0)[..., 0].astype(np.float32)  # smooth: upscalers differ
    result = validate_net(Bicubic(), [image], Degradation(kind="sr"), crop=0)
    cropped = image[:36, :40]
    expected = matlab_imresize(matlab_imresize(cropped, 0.5), 2.0)
    mse = np.mean((_uint8(expected) - _uint8(cropped)) ** 2)
    assert result["val_input_psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse), abs=0.01)
    assert result["val_psnr"] == pytest.approx(result["val_input_psnr"], abs=0.01)
    torch.manual_seed(0)
    result = validate_net(build_net(SR_NET), [image], Degradation(kind="sr"), crop=0)
    assert np.isfinite(result["val_psnr"])


def _uint8(x):
    return np.round(np.clip(x, 0, 1) * 255).astype(np.float64)
