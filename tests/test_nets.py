import hashlib
import itertools
import json

import pytest
import torch
from safetensors.torch import save as save_tensors

from restorer.errors import ModelError
from restorer.nets import ALIASES, NETS, RestorationNet, build_net, net_spec
from restorer.weights.checkpoint import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    load_model,
    load_model_bytes,
)
from restorer.weights.zoo import bundled

SMALL = {
    "dncnn": {"num_features": 8, "num_layers": 5},
    "srnet": {"num_features": 8, "num_blocks": 2},
    "unet": {"num_features": (8, 16, 32), "num_blocks": 1},
    "opponent": {"trunk": {"arch": "unet", "channels": 1, "num_features": (8, 16, 32),
                           "num_blocks": 1}},
    "noisemap": {"estimator_features": 4, "estimator_layers": 3},
}
RGB_ONLY = {"opponent"}  # nets made for RGB: no channels in their spec


def _small(arch, channels):
    if arch == "noisemap":  # its trunk restores the same planes, with as many guide planes
        return {"arch": arch, "channels": channels, **SMALL[arch],
                "trunk": {"arch": "unet", "channels": channels, "num_features": (8, 16, 32),
                          "num_blocks": 1, "guide_channels": channels}}
    if arch in RGB_ONLY:
        assert channels == 3
        return {"arch": arch, **SMALL[arch]}
    return {"arch": arch, "channels": channels, **SMALL[arch]}


ARCH_CHANNELS = [(arch, channels) for arch in sorted(NETS) for channels in (1, 3)
                 if channels == 3 or arch not in RGB_ONLY]


def test_every_net_has_a_small_config():
    assert set(SMALL) == set(NETS)


@pytest.mark.parametrize("arch,channels", ARCH_CHANNELS)
def test_every_net_forward_backward_finite(arch, channels):
    net = build_net(_small(arch, channels))
    x = torch.rand(2, channels, 37, 29, requires_grad=True)
    y = net(x)
    scale = net.scale
    assert y.shape == (2, channels, 37 * scale, 29 * scale)
    y.mean().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert build_net(net_spec(net)).state_dict().keys() == net.state_dict().keys()


@pytest.mark.parametrize("arch", sorted(NETS))
def test_receptive_field_is_what_the_net_sees(arch):
    """A pixel change moves outputs no further than receptive_field // 2 away (times the scale).

    For DnCNN the bound is exact. Pooling nets see a window that depends on where the pixel
    sits in the pooling grid, and a super-resolution output pixel sits between input pixels,
    so for them the bound is checked at several positions, and must be nearly reached at one.
    """
    torch.manual_seed(0)
    channels = 3 if arch in RGB_ONLY else 1
    _check_receptive_field(build_net(_small(arch, channels)).eval(), arch, channels)


def test_a_pooled_estimator_widens_the_receptive_field_by_its_window():
    torch.manual_seed(0)
    spec = {**_small("noisemap", 3), "estimator_window": 7}
    net = build_net(spec).eval()
    assert net.receptive_field == build_net(_small("noisemap", 3)).receptive_field + 12
    _check_receptive_field(net, "noisemap", 3)


def _check_receptive_field(net, arch, channels, where=((48, 48), (45, 50), (51, 43), (40, 57)),
                           slack=1):
    scale, half = net.scale, net.receptive_field // 2
    x = torch.rand(1, channels, 96, 96)
    reach = 0
    for y0, x0 in where if arch != "dncnn" else [(48, 48)]:
        bumped = x.clone()
        bumped[0, 0, y0, x0] += 0.5
        with torch.no_grad():
            diff = ((net(bumped) - net(x)).abs()[0] > 0).any(0)
        rows = diff.any(1).nonzero().flatten()
        cols = diff.any(0).nonzero().flatten()
        # output pixel i covers input positions [i / scale, (i + 1) / scale)
        for found, centre in ((rows, y0), (cols, x0)):
            assert found.min() >= (centre - half) * scale, (arch, y0, x0)
            assert found.max() < (centre + half + 1) * scale, (arch, y0, x0)
            reach = max(reach, centre - found.min() // scale, found.max() // scale - centre)
        if arch == "dncnn":
            assert rows.max() - rows.min() + 1 == net.receptive_field
    assert reach >= half - slack, (arch, reach, half)  # and the bound is (nearly) tight


def test_unknown_arch_and_keys_are_named():
    with pytest.raises(ModelError, match="Unknown net arch 'nope'"):
        build_net({"arch": "nope"})
    with pytest.raises(ModelError, match=r"Unknown keys \['depth'\]"):
        build_net({"arch": "dncnn", "depth": 3})


@pytest.mark.parametrize("arch", sorted(NETS))
def test_every_net_declares_the_interface(arch):
    """channels, scale, alignment and receptive_field are declared, as ints, by every net."""
    net = build_net(_small(arch, 3))
    assert isinstance(net, RestorationNet)
    for name in ("channels", "scale", "alignment", "receptive_field"):
        assert type(getattr(net, name)) is int and getattr(net, name) >= 1, name
    assert net.channels == 3
    # 2 ** (levels - 1) for a U-Net (the opponent net's trunk here)
    assert net.alignment == (4 if arch in ("unet", "opponent", "noisemap") else 1)
    assert net.scale == (2 if arch == "srnet" else 1)


def test_former_config_names_build_the_same_net():
    """``features``/``blocks`` (the U-Net's first names) are aliases of ``num_features``/
    ``num_blocks``; giving both names for one field is an error."""
    assert ALIASES == {"features": "num_features", "blocks": "num_blocks"}
    torch.manual_seed(0)
    old = build_net({"arch": "unet", "channels": 1, "features": [8, 16], "blocks": 1}).eval()
    new = build_net({"arch": "unet", "channels": 1, "num_features": [8, 16], "num_blocks": 1})
    new.load_state_dict(old.state_dict())
    x = torch.rand(1, 1, 20, 24)
    with torch.no_grad():
        assert torch.equal(old(x), new.eval()(x))
    assert net_spec(old) == net_spec(new) and "num_features" in net_spec(old)
    with pytest.raises(ModelError, match="gives both 'features' and 'num_features'"):
        build_net({"arch": "unet", "features": [8, 16], "num_features": [8, 16]})


def test_a_model_file_with_the_former_names_loads_unchanged(tmp_path):
    """A user's file written before the rename: same bytes, same sha256, same outputs."""
    torch.manual_seed(1)
    net = build_net({"arch": "unet", "channels": 1, "num_features": [4, 8], "num_blocks": 1})
    old_spec = {"arch": "unet", "blocks": 1, "channels": 1, "features": [4, 8], "residual": True}
    data = save_tensors({k: v.contiguous() for k, v in net.state_dict().items()},
                        metadata={"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
                                  "net": json.dumps(old_spec, sort_keys=True),
                                  "provenance": "{}"})
    path = tmp_path / "old.safetensors"
    path.write_bytes(data)
    loaded = load_model(str(path))
    assert path.read_bytes() == data
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert loaded.spec == {"arch": "unet", "channels": 1, "num_features": [4, 8],
                           "num_blocks": 1, "residual": True}
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.net(x), net.eval()(x))


@pytest.mark.parametrize("name", sorted(bundled()))
def test_every_zoo_file_loads_unchanged(name):
    """The bundled files are not rewritten: each loads as it is, under the sha256 its card
    names, whichever config names its header holds (the U-Nets keep the former ones)."""
    entry = bundled()[name]
    data = entry.path.read_bytes()
    loaded = load_model_bytes(data, str(entry.path))
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert loaded.sha256 in entry.card.read_text()
    assert isinstance(loaded.net, RestorationNet)
    assert build_net(loaded.spec).state_dict().keys() == loaded.net.state_dict().keys()


def test_opponent_planes_are_decorrelated_and_the_transform_is_exact():
    """White RGB noise stays white and independent across the opponent planes (what lets a
    gray denoiser restore each), and with an identity trunk the net returns its input."""
    from restorer.nets.opponent import CENTRE, OPPONENT

    matrix = torch.tensor(OPPONENT, dtype=torch.float64)
    gram = matrix @ matrix.T
    assert torch.allclose(gram, torch.diag(torch.diag(gram)))  # orthogonal rows
    assert torch.allclose(torch.diag(gram).sqrt(),
                          torch.tensor([3 ** -0.5, 2 ** -0.5, 6 ** 0.5 / 4], dtype=torch.float64))
    # every plane of a [0, 1] image lies in [0, 1]
    corners = torch.tensor(list(itertools.product((0.0, 1.0), repeat=3)), dtype=torch.float64)
    planes = corners @ matrix.T + torch.tensor(CENTRE, dtype=torch.float64)
    assert planes.min() >= 0 and planes.max() <= 1
    net = build_net(_small("opponent", 3)).eval()
    torch.nn.init.zeros_(net.trunk.tail.weight)  # x - body(x) with body(x) = 0: identity
    torch.nn.init.zeros_(net.trunk.tail.bias)
    x = torch.rand(2, 3, 19, 23)
    with torch.no_grad():
        assert torch.allclose(net(x), x, atol=1e-6)


def test_opponent_net_restores_each_plane_with_its_trunk():
    """The planes go through the trunk as gray images: the net equals transforming, running
    the trunk on each plane alone, and transforming back."""
    from restorer.nets.opponent import CENTRE, OPPONENT

    torch.manual_seed(2)
    net = build_net(_small("opponent", 3)).eval()
    x = torch.rand(1, 3, 21, 30)
    matrix = torch.tensor(OPPONENT)
    centre = torch.tensor(CENTRE).view(3, 1, 1)
    planes = torch.einsum("ij,jhw->ihw", matrix, x[0]) + centre
    with torch.no_grad():
        alone = torch.cat([net.trunk(planes[i][None, None])[0] for i in range(3)])
        expected = torch.einsum("ij,jhw->ihw", torch.linalg.inv(matrix), alone - centre)
        assert torch.allclose(net(x)[0], expected, atol=1e-5)


def test_opponent_trunk_must_be_one_plane_at_scale_one():
    with pytest.raises(ValueError, match="trunk must restore one plane"):
        build_net({"arch": "opponent", "trunk": {"arch": "unet", "channels": 3}})
    with pytest.raises(ValueError, match="trunk must restore one plane"):
        build_net({"arch": "opponent", "trunk": {"arch": "srnet", "channels": 1, "scale": 2}})


def test_the_colour_denoiser_is_the_gray_one_on_opponent_planes():
    """denoise-color ships denoise-gray's weights as its trunk (its provenance names them)."""
    from restorer.weights.zoo import get_model

    color, gray = get_model("denoise-color"), get_model("denoise-gray")
    assert color.spec["arch"] == "opponent" and color.net.channels == 3
    assert color.provenance["trunk"] == {"recipe": "denoise-gray", "sha256": gray.sha256}
    for name, tensor in gray.net.state_dict().items():
        assert torch.equal(color.net.trunk.state_dict()[name], tensor), name


def _chroma_net(scale=2, layers=2, seed=0):
    """A small noise-map net with a chroma branch whose last convolution is not zero (a new
    branch adds nothing, which would hide what it sees)."""
    torch.manual_seed(seed)
    net = build_net({**_small("noisemap", 3), "chroma_features": 6, "chroma_layers": layers,
                     "chroma_scale": scale}).eval()
    torch.nn.init.normal_(net.chroma.body[-1].weight, std=0.05)
    return net


@pytest.mark.parametrize("scale,layers", [(2, 2), (4, 3)])
def test_a_chroma_branch_widens_the_receptive_field_by_its_blocks(scale, layers):
    """The branch's 3x3 convolutions at 1/scale resolution reach ``layers`` blocks of ``scale``
    px either side of a pixel's block, and the pixel may sit anywhere in it: the net's window
    grows by 2 x (layers x scale + scale - 1) px, and a pixel change moves no output beyond it
    (checked from every position in a block). The bound adds the trunk's widest window to the
    branch's, which a pixel reaches only from where the trunk's pooling grid falls: the bound
    is reached to within a block."""
    net = _chroma_net(scale, layers)
    plain = build_net(_small("noisemap", 3))
    assert net.receptive_field == plain.receptive_field + 2 * (layers * scale + scale - 1)
    assert net.alignment == max(plain.alignment, scale)
    _check_receptive_field(net, "noisemap", 3, [(44 + i, 44 + i) for i in range(8)], scale)


def test_a_new_chroma_branch_restores_as_the_net_without_it():
    """Its last convolution starts at zero: the trunk's and estimator's weights given, the net
    with a branch restores as the one without (up to the colour transforms' rounding), so a
    stage can add it to a trained net; the branch changes only the chroma (YCbCr luma kept)."""
    torch.manual_seed(3)
    plain = build_net(_small("noisemap", 3)).eval()
    branched = build_net({**_small("noisemap", 3), "chroma_features": 6,
                          "chroma_layers": 2, "chroma_scale": 2}).eval()
    missing = branched.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("chroma.") for key in missing)
    x = torch.rand(2, 3, 21, 34)
    with torch.no_grad():
        assert torch.allclose(branched(x), plain(x), atol=1e-6)
        torch.nn.init.normal_(branched.chroma.body[-1].weight, std=0.05)
        changed, before = branched(x), plain(x)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert (changed - before).abs().max() > 1e-3
    assert torch.allclose((changed * luma).sum(1), (before * luma).sum(1), atol=1e-5)


def test_a_new_chroma_branch_carries_the_chroma_noise_to_its_last_layer():
    """On a photo-like input (a gray ramp with chroma noise of 3 levels, the map at that
    level), the features reaching a new 6-layer branch's last convolution keep a spread of
    order 0.1, and the part of them the noise makes above 0.02: its inputs are scaled (what
    the trunk removed from the chroma x 32) and its layers He-initialised. Unscaled inputs and
    PyTorch's default initialisation left them at 0.017 and 1e-4 here (4e-4 on cc15), and
    stages 30-33 learnt nothing."""
    torch.manual_seed(0)
    net = build_net({**_small("noisemap", 3), "chroma_features": 48, "chroma_layers": 6,
                     "chroma_scale": 4}).eval()
    seen = []
    net.chroma.body[-1].register_forward_hook(lambda module, inputs, out: seen.append(inputs[0]))
    ramp = torch.linspace(0.2, 0.8, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    chroma = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(1)) * 3 / 255
    noisy = ramp + torch.einsum("ij,bjhw->bihw", net.chroma.to_rgb[:, 1:], chroma)
    level = torch.full_like(ramp, 3 / 255)
    with torch.no_grad():
        net(noisy, level)
        net(ramp.contiguous(), level)
    assert float(seen[0].std()) > 0.1, float(seen[0].std())
    assert float((seen[0] - seen[1]).std()) > 0.02, float((seen[0] - seen[1]).std())


def test_a_chroma_branch_needs_colour_and_is_left_out_of_specs_without_it():
    """Gray nets are refused one, naming the fix; specs of nets without one (every file
    written before it existed) do not name its fields, so their hashes and specs stay."""
    with pytest.raises(ValueError, match="needs 3 planes.*chroma_features = 0"):
        build_net({**_small("noisemap", 1), "chroma_features": 4})
    with pytest.raises(ValueError, match=">= 2 layers"):
        build_net({**_small("noisemap", 3), "chroma_features": 4, "chroma_layers": 1})
    plain = net_spec(build_net(_small("noisemap", 3)))
    assert not any(key.startswith("chroma") for key in plain)
    branched = net_spec(_chroma_net())
    assert (branched["chroma_features"], branched["chroma_layers"],
            branched["chroma_scale"]) == (6, 2, 2)
    assert "chroma_leak" not in branched  # a ReLU branch's spec (stage 35's) stays as written
    rebuilt = build_net(branched)
    assert rebuilt.state_dict().keys() == _chroma_net().state_dict().keys()


@pytest.mark.parametrize("leak", [0.0, 0.1])
def test_a_leaky_chroma_branch_still_learns_through_units_that_are_off(leak):
    """Every unit of the first hidden layer pushed negative (bias -100): a ReLU branch passes
    its first convolution no gradient at all (stage 34's dead units); with ``chroma_leak`` the
    gradient comes through at the leak's share. The leak is written in the spec; a slope
    outside [0, 1) is refused."""
    spec = {**_small("noisemap", 3), "chroma_features": 6, "chroma_layers": 3,
            "chroma_scale": 2, "chroma_leak": leak}
    net = build_net(spec)
    torch.nn.init.normal_(net.chroma.body[-1].weight, std=0.05)
    first = net.chroma.body[0]
    torch.nn.init.constant_(first.bias, -100.0)
    net(torch.rand(2, 3, 32, 32)).square().mean().backward()
    flowing = float(first.weight.grad.abs().max())
    if leak:
        assert flowing > 1e-6
        assert net_spec(net)["chroma_leak"] == leak
        assert isinstance(net.chroma.body[1], torch.nn.LeakyReLU)
    else:
        assert flowing == 0.0
    with pytest.raises(ValueError, match="negative slope in"):
        build_net({**spec, "chroma_leak": 1.0})


def test_a_chroma_branch_keeps_its_colour_transforms_in_float32_under_autocast():
    """bf16 autocast runs the convolutions in bf16, but the YCbCr transforms and the sum stay
    float32: the output is float32 and within the bf16 convolutions' error of the fp32 one."""
    net = _chroma_net(4, 3)
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        full = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    assert low.dtype == torch.float32
    assert (low - full).abs().max() < 0.05
