import pytest
import torch

from restorer.errors import ModelError
from restorer.nets import NETS, build_net, net_spec

SMALL = {
    "dncnn": {"num_features": 8, "num_layers": 5},
    "srnet": {"num_features": 8, "num_blocks": 2},
    "unet": {"features": (8, 16, 32), "blocks": 1},
}


def test_every_net_has_a_small_config():
    assert set(SMALL) == set(NETS)


@pytest.mark.parametrize("arch", sorted(NETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_net_forward_backward_finite(arch, channels):
    net = build_net({"arch": arch, "channels": channels, **SMALL[arch]})
    x = torch.rand(2, channels, 37, 29, requires_grad=True)
    y = net(x)
    scale = getattr(net, "scale", 1)
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
    net = build_net({"arch": arch, "channels": 1, **SMALL[arch]}).eval()
    scale, half = net.scale, net.receptive_field // 2
    x = torch.rand(1, 1, 96, 96)
    reach = 0
    for y0, x0 in [(48, 48), (45, 50), (51, 43), (40, 57)] if arch != "dncnn" else [(48, 48)]:
        bumped = x.clone()
        bumped[0, 0, y0, x0] += 0.5
        with torch.no_grad():
            diff = (net(bumped) - net(x)).abs()[0, 0] > 0
        rows = diff.any(1).nonzero().flatten()
        cols = diff.any(0).nonzero().flatten()
        # output pixel i covers input positions [i / scale, (i + 1) / scale)
        for found, centre in ((rows, y0), (cols, x0)):
            assert found.min() >= (centre - half) * scale, (arch, y0, x0)
            assert found.max() < (centre + half + 1) * scale, (arch, y0, x0)
            reach = max(reach, centre - found.min() // scale, found.max() // scale - centre)
        if arch == "dncnn":
            assert rows.max() - rows.min() + 1 == net.receptive_field
    assert reach >= half - 1, (arch, reach, half)  # and the bound is (nearly) tight


def test_unknown_arch_and_keys_are_named():
    with pytest.raises(ModelError, match="Unknown net arch 'nope'"):
        build_net({"arch": "nope"})
    with pytest.raises(ModelError, match=r"Unknown keys \['depth'\]"):
        build_net({"arch": "dncnn", "depth": 3})
