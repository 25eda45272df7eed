"""``--strength``: a noise-aware model scales its noise map by it (0..3); other models blend
their output with the input (0..1), and a strength above 1 is refused for them."""

import numpy as np
import pytest
import torch

from restorer.errors import ModelError, SpecError
from restorer.job import specs
from restorer.nets import build_net
from restorer.pipeline.actor import RestoreActor
from restorer.weights.checkpoint import save_model

NOISE_MAP = {"arch": "noisemap", "channels": 3, "estimator_features": 4, "estimator_layers": 3,
             "trunk": {"arch": "unet", "channels": 3, "num_features": (8, 16, 32),
                       "num_blocks": 1, "guide_channels": 3}}


@pytest.fixture
def noise_map_model(tmp_path):
    torch.manual_seed(0)
    net = build_net(NOISE_MAP).eval()
    with torch.no_grad():
        net.trunk.down[0][0].weight[:, 3:] = 2.0  # make the map matter
        net.estimator[-1].bias.fill_(2.0)  # a clearly non-zero estimate
    path = tmp_path / "aware.safetensors"
    save_model(str(path), net, {"purpose": "tests"})
    return str(path)


def test_strength_above_one_needs_a_noise_aware_model(tiny_model):
    with pytest.raises(ModelError, match="strength 2 needs a noise-aware model"):
        RestoreActor(model=tiny_model, tile=0, strength=2.0)


def test_a_noise_aware_model_takes_strength_as_its_map_scale(noise_map_model):
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    outputs = {}
    for strength in (0.0, 1.0, 2.5):
        actor = RestoreActor(model=noise_map_model, tile=0, strength=strength)
        assert actor.noise_aware and actor.net.strength == strength
        (outputs[strength],), _ = actor.restore_arrays([image])
    # not a blend with the input: strength 0 still runs the net (map zero)
    assert not np.array_equal(outputs[0.0], image)
    assert not np.array_equal(outputs[0.0], outputs[1.0])
    assert not np.array_equal(outputs[1.0], outputs[2.5])


def test_spec_strength_range():
    ok = specs.spec_from_flags(specs.RestoreSpec, input="a", output="b", strength=2.0)
    assert ok.validate().model.strength == 2.0
    with pytest.raises(SpecError, match="0..3"):
        specs.spec_from_flags(specs.RestoreSpec, input="a", output="b", strength=3.5).validate()


def test_eval_draws_a_strength_sheet_of_the_first_pair(tmp_path, noise_map_model):
    from click.testing import CliRunner
    from PIL import Image

    from restorer.cli import main

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    rng = np.random.default_rng(1)
    clean = rng.integers(60, 200, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(clean).save(pairs / "a_gt.png")
    Image.fromarray(np.clip(clean + rng.normal(0, 8, clean.shape), 0, 255).astype(np.uint8)
                    ).save(pairs / "a_noisy.png")
    sheet = tmp_path / "sheet.png"
    args = ["eval", "--model", noise_map_model, "--pairs", str(pairs), "--through", "net",
            "--sheet", str(sheet)]
    one = CliRunner().invoke(main, args + ["--sheet-strengths", "1"])
    assert one.exit_code == 0, one.output
    one_height = Image.open(sheet).height
    three = CliRunner().invoke(main, args + ["--sheet-strengths", "0,1,2.5"])
    assert three.exit_code == 0, three.output
    assert Image.open(sheet).height > 2.5 * one_height * 0.8  # a row per strength
    bad = CliRunner().invoke(main, args + ["--sheet-strengths", "a,b"])
    assert bad.exit_code == 2 and "0,0.5,1,2" in bad.output
