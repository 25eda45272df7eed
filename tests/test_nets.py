import pytest
import torch

from restorer.errors import ModelError
from restorer.nets import NETS, build_net, net_spec

SMALL = {"dncnn": {"num_features": 8, "num_layers": 5}}


@pytest.mark.parametrize("arch", sorted(NETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_net_forward_backward_finite(arch, channels):
    net = build_net({"arch": arch, "channels": channels, **SMALL.get(arch, {})})
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
    """A pixel change moves outputs no further than receptive_field // 2 away."""
    torch.manual_seed(0)
    net = build_net({"arch": arch, "channels": 1, **SMALL.get(arch, {})}).eval()
    x = torch.rand(1, 1, 64, 64)
    bumped = x.clone()
    bumped[0, 0, 32, 32] += 0.5
    with torch.no_grad():
        diff = (net(bumped) - net(x)).abs()[0, 0] > 0
    rows = diff.any(1).nonzero().flatten()
    half = net.receptive_field // 2
    assert rows.min() >= 32 - half and rows.max() <= 32 + half
    assert rows.max() - rows.min() + 1 == net.receptive_field


def test_unknown_arch_and_keys_are_named():
    with pytest.raises(ModelError, match="Unknown net arch 'nope'"):
        build_net({"arch": "nope"})
    with pytest.raises(ModelError, match=r"Unknown keys \['depth'\]"):
        build_net({"arch": "dncnn", "depth": 3})
