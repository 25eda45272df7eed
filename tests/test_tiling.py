import numpy as np
import pytest
import torch

from restorer.nets import build_net
from restorer.tiling import plan_tiles, run_tiled, tile_positions


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_net({"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 6}).eval()


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 13), (32, 32, 13), (7, 32, 13),
                                                 (1000, 256, 40), (257, 256, 40)])
def test_positions_cover_with_overlap(length, tile, overlap):
    starts = tile_positions(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    for a, b in zip(starts, starts[1:]):
        assert b - a <= tile - overlap  # neighbours overlap by at least `overlap`


@pytest.mark.parametrize("shape", [(300, 517), (64, 64), (3, 400), (129, 65)])
def test_tiled_equals_whole_image(net, shape):
    torch.manual_seed(1)
    image = torch.rand(1, *shape)
    with torch.no_grad():
        whole = net(image[None])[0]
        tiled = run_tiled([image], net, tile=48, overlap=net.receptive_field + 3,
                          halo=net.receptive_field // 2, batch_size=3)[0]
    whole8 = (whole.clamp(0, 1) * 255).round()
    tiled8 = (tiled.clamp(0, 1) * 255).round()
    assert (whole8 - tiled8).abs().max() <= 1
    mse = float(((whole - tiled) ** 2).mean())
    assert mse == 0 or 10 * np.log10(1 / mse) >= 50


def test_tiles_of_many_images_share_batches(net):
    shapes = []

    def forward(batch):
        shapes.append(tuple(batch.shape))
        return net(batch)

    images = [torch.rand(1, 100, 100), torch.rand(1, 80, 120), torch.rand(1, 20, 20)]
    with torch.no_grad():
        outs = run_tiled(images, forward, tile=48, overlap=16, halo=6, batch_size=8)
    assert [o.shape for o in outs] == [i.shape for i in images]
    assert all(s[0] <= 8 for s in shapes)
    assert len({s[2:] for s in shapes}) == 2  # 48x48 tiles from both big images, one 20x20
    assert max(s[0] for s in shapes) == 8  # batches are filled across images


def test_overlap_smaller_than_receptive_field_is_refused(net):
    with pytest.raises(ValueError, match="receptive field"):
        run_tiled([torch.rand(1, 100, 100)], net, tile=48, overlap=4, halo=6)


def test_plan_whole_image_when_tile_is_zero():
    plan = plan_tiles(1000, 2000, 0, 0)
    assert plan.count == 1 and (plan.tile_height, plan.tile_width) == (1000, 2000)
