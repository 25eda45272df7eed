import itertools

import numpy as np
import pytest
import torch

from restorer.image.tiling import (
    balanced_tile,
    effective_tile,
    pad_reflect,
    plan_tiles,
    reflect_indices,
    run_tiled,
    tile_positions,
)
from restorer.nets import build_net


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_net({"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 6}).eval()


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 13), (32, 32, 13), (7, 32, 13),
                                                 (1000, 256, 40), (257, 256, 40)])
def test_positions_cover_with_overlap(length, tile, overlap):
    starts = tile_positions(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    for a, b in itertools.pairwise(starts):
        assert b - a <= tile - overlap  # neighbours overlap by at least `overlap`


def _assert_same_up_to_rounding(whole, tiled):
    assert tiled.shape == whole.shape
    whole8 = (whole.clamp(0, 1) * 255).round()
    tiled8 = (tiled.clamp(0, 1) * 255).round()
    assert (whole8 - tiled8).abs().max() <= 1
    mse = float(((whole - tiled) ** 2).mean())
    assert mse == 0 or 10 * np.log10(1 / mse) >= 50


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("shape", [(300, 517), (64, 64), (3, 400), (129, 65)])
def test_tiled_equals_whole_image(net, shape, balanced):
    torch.manual_seed(1)
    image = torch.rand(1, *shape)
    with torch.no_grad():
        whole = net(image[None])[0]
        tiled = run_tiled([image], net, tile=48, overlap=net.receptive_field + 3,
                          halo=net.receptive_field // 2, batch_size=3, balanced=balanced)[0]
    _assert_same_up_to_rounding(whole, tiled)


SMALL_NETS = {
    "unet": {"arch": "unet", "features": (8, 16, 32), "blocks": 1},  # alignment 4
    "srnet-x2": {"arch": "srnet", "scale": 2, "num_features": 8, "num_blocks": 2},
    "srnet-x4": {"arch": "srnet", "scale": 4, "num_features": 8, "num_blocks": 2},
}


@pytest.fixture(scope="module", params=sorted(SMALL_NETS))
def other_net(request):
    torch.manual_seed(0)
    return build_net({"channels": 1, **SMALL_NETS[request.param]}).eval()


# odd sides, sides not a multiple of the U-Net's alignment, thinner and smaller than one tile,
# and sides shorter than the pad to the alignment (1, 3: mirrored more than once)
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("shape", [(100, 133), (61, 64), (3, 170), (7, 9), (1, 1), (3, 5),
                                   (7, 7), (1, 133), (129, 2)])
def test_aligned_and_super_resolution_nets_tile_like_whole_images(other_net, shape, balanced):
    torch.manual_seed(1)
    image = torch.rand(1, *shape)
    rf = other_net.receptive_field
    with torch.no_grad():
        whole = other_net(image[None])[0]
        tiled = run_tiled([image], other_net, tile=60, overlap=rf + 3, halo=rf // 2,
                          scale=other_net.scale, batch_size=3,
                          alignment=other_net.alignment, balanced=balanced)[0]
    assert tiled.shape == (1, shape[0] * other_net.scale, shape[1] * other_net.scale)
    _assert_same_up_to_rounding(whole, tiled)


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("shape", [(61, 133), (7, 9), (1, 1), (129, 2)])
def test_opponent_net_tiles_like_whole_images(shape, balanced):
    """The colour transform is per pixel: an opponent net tiles as its trunk does."""
    torch.manual_seed(3)
    net = build_net({"arch": "opponent", "trunk": {"arch": "unet", "channels": 1,
                                                   "features": (8, 16, 32), "blocks": 1}}).eval()
    image = torch.rand(3, *shape)
    rf = net.receptive_field
    with torch.no_grad():
        whole = net(image[None])[0]
        tiled = run_tiled([image], net, tile=60, overlap=rf + 3, halo=rf // 2, scale=1,
                          batch_size=3, alignment=net.alignment, balanced=balanced)[0]
    _assert_same_up_to_rounding(whole, tiled)


@pytest.mark.parametrize("length,tile,overlap,alignment", [
    (384, 256, 8, 1), (640, 256, 8, 1), (1001, 256, 40, 1), (257, 256, 40, 1),
    (1000, 448, 112, 8), (480, 448, 112, 8), (200, 256, 8, 1), (96, 32, 13, 16)])
def test_balanced_tiles_keep_the_count_and_shrink_to_fit(length, tile, overlap, alignment):
    side = balanced_tile(length, tile, overlap, alignment)
    count = len(tile_positions(length, tile, overlap, alignment))
    starts = tile_positions(length, side, overlap, alignment)
    assert len(starts) == count  # as many tiles as the configured tile needs
    assert side <= min(tile, length) and side % alignment == 0 or side == length
    assert starts[0] == 0 and starts[-1] + side == length
    for a, b in itertools.pairwise(starts):
        assert b - a <= side - overlap  # still overlapping by at least `overlap`
    smaller = side - alignment
    if count > 1 and smaller > -(-overlap // alignment) * alignment:  # no smaller tile does it
        assert len(tile_positions(length, side - alignment, overlap, alignment)) > count
    if (length, tile, overlap) == (384, 256, 8):
        assert side == 196  # 2 x 196 px instead of 2 x 256: 1.7x fewer pixels a 384x384 image


def test_unaligned_tiles_break_a_unet():
    """Why the alignment exists: off the pooling grid, a U-Net's tiles disagree."""
    torch.manual_seed(0)
    unet = build_net({"channels": 1, **SMALL_NETS["unet"]}).eval()
    image = torch.rand(1, 150, 203)
    rf = unet.receptive_field
    with torch.no_grad():
        whole = unet(image[None])[0]
        plain = run_tiled([image], unet, tile=58, overlap=rf + 3, halo=rf // 2)[0]
        aligned = run_tiled([image], unet, tile=58, overlap=rf + 3, halo=rf // 2,
                            alignment=unet.alignment)[0]
    assert (whole - plain).abs().max() > 1e-3
    assert (whole - aligned).abs().max() < 1e-5


@pytest.mark.parametrize("length,tile,overlap,alignment", [(400, 64, 29, 4), (8, 64, 29, 4),
                                                           (1000, 448, 112, 8), (456, 448, 112, 8),
                                                           (96, 32, 13, 16)])
def test_aligned_positions_cover_with_overlap(length, tile, overlap, alignment):
    starts = tile_positions(length, tile, overlap, alignment)
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    assert all(s % alignment == 0 for s in starts)
    for a, b in itertools.pairwise(starts):
        assert b - a <= tile - overlap


def test_aligned_plan_pads_the_image_and_rounds_the_tile():
    plan = plan_tiles(301, 517, 100, 29, alignment=8)
    assert (plan.height, plan.width) == (304, 520)  # padded to multiples of 8
    assert (plan.tile_height, plan.tile_width) == (96, 96)  # 100 rounded down to 8
    assert all(y % 8 == 0 for y in plan.ys) and all(x % 8 == 0 for x in plan.xs)
    small = plan_tiles(5, 13, 100, 29, alignment=8)
    assert small.count == 1 and (small.tile_height, small.tile_width) == (8, 16)
    assert plan_tiles(5, 13, 0, 0, alignment=8).tile_width == 16
    with pytest.raises(ValueError, match="alignment"):
        tile_positions(100, 30, 10, alignment=8)


def test_effective_tile_is_at_least_four_overlaps():
    assert effective_tile(256, 112, alignment=8) == 448  # a default 4-level U-Net
    assert effective_tile(256, 40) == 256  # DnCNN-17: already wide enough
    assert effective_tile(0, 112, alignment=8) == 0  # whole images stay whole
    assert effective_tile(100, 30, alignment=16) == 128  # rounded up to the alignment
    assert effective_tile(1024, 112, alignment=8) == 1024


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


@pytest.mark.parametrize("length", [1, 2, 3, 5, 7, 8])
@pytest.mark.parametrize("pad", [0, 1, 3, 7, 20])
def test_reflect_indices_mirror_like_numpy_for_any_length(length, pad):
    side = np.arange(length)
    expected = np.pad(side, (0, pad), mode="reflect")  # numpy mirrors again past one length
    assert reflect_indices(0, length + pad, length).tolist() == expected.tolist()
    start = min(2, length + pad)  # a window that starts inside the side
    assert reflect_indices(start, length + pad, length).tolist() == expected[start:].tolist()


def test_pad_reflect_matches_torch_reflect_where_torch_can():
    image = torch.rand(2, 3, 13, 10)
    expected = torch.nn.functional.pad(image, (0, 6, 0, 3), mode="reflect")
    assert torch.equal(pad_reflect(image, 3, 6), expected)
    assert pad_reflect(image, 0, 0) is image


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 7), (9, 15), (8, 8)])
def test_unet_pads_to_its_alignment_with_the_mirror_image(shape):
    """What the first convolution sees: the image mirrored to a multiple of 8, not its edge
    repeated (a flat, noiseless strip that the net would take for structure)."""
    torch.manual_seed(0)
    unet = build_net({"arch": "unet", "channels": 1, "features": (4, 4, 4, 4), "blocks": 1})
    seen = []
    unet.down[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    image = torch.rand(1, 1, *shape)
    with torch.no_grad():
        out = unet(image)
    assert out.shape == image.shape
    height, width = -(-shape[0] // 8) * 8, -(-shape[1] // 8) * 8
    expected = np.pad(image[0, 0].numpy(), ((0, height - shape[0]), (0, width - shape[1])),
                      mode="reflect")
    assert seen[0].shape[-2:] == (height, width)
    assert np.array_equal(seen[0][0, 0].numpy(), expected)


@pytest.mark.parametrize("window,chroma", [(0, 0), (5, 0), (0, 2)])
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("shape", [(61, 133), (7, 9), (1, 1), (129, 2)])
def test_noise_map_net_tiles_like_whole_images(shape, balanced, window, chroma):
    """The estimator runs at half resolution (stride 2, bilinear back up) on the aligned,
    padded image, its pooling window inside the receptive field: tiles starting on multiples
    of the alignment see the same map. A chroma branch (space-to-depth by ``chroma`` px, its
    last convolution made non-zero here) tiles the same: its blocks start on the alignment."""
    torch.manual_seed(4)
    net = build_net({"arch": "noisemap", "channels": 3, "estimator_features": 4,
                     "estimator_layers": 3, "estimator_window": window,
                     "chroma_features": 4 if chroma else 0, "chroma_layers": 2,
                     "chroma_scale": chroma or 4,
                     "trunk": {"arch": "unet", "channels": 3, "num_features": (8, 16, 32),
                               "num_blocks": 1, "guide_channels": 3}}).eval()
    if chroma:
        torch.nn.init.normal_(net.chroma.body[-1].weight, std=0.05)
    image = torch.rand(3, *shape)
    rf = net.receptive_field
    with torch.no_grad():
        whole = net(image[None])[0]
        tiled = run_tiled([image], net, tile=60, overlap=rf + 3, halo=rf // 2, scale=1,
                          batch_size=3, alignment=net.alignment, balanced=balanced)[0]
    _assert_same_up_to_rounding(whole, tiled)


def _blend_everywhere(images, forward, tile, overlap, halo, scale, alignment, balanced):
    """The blend written out: every tile's ``out * w`` and ``w`` added over the whole canvas in
    tile order, then ``canvas / max(weights, 1e-8)`` (run_tiled copies where one tile alone
    has weight 1, and must give these very floats)."""
    from restorer.image.tiling import _cut, _ramp

    results = []
    for image in images:
        plan = plan_tiles(image.shape[-2], image.shape[-1], tile, overlap, alignment, balanced)
        canvas = torch.zeros(image.shape[0], plan.height * scale, plan.width * scale)
        weights = torch.zeros(1, plan.height * scale, plan.width * scale)
        for y in plan.ys:
            for x in plan.xs:
                out = forward(_cut(image, y, x, plan.tile_height, plan.tile_width)[None])[0]
                if plan.count == 1:
                    canvas, weights = out, torch.ones(1)
                    continue
                wy = _ramp(plan.tile_height * scale, y * scale, plan.height * scale,
                           halo * scale, overlap * scale, out.device)
                wx = _ramp(plan.tile_width * scale, x * scale, plan.width * scale,
                           halo * scale, overlap * scale, out.device)
                w = wy[:, None] * wx[None, :]
                rows = slice(y * scale, (y + plan.tile_height) * scale)
                columns = slice(x * scale, (x + plan.tile_width) * scale)
                canvas[:, rows, columns] += out * w
                weights[:, rows, columns] += w
        blended = canvas / weights.clamp_min(1e-8)
        results.append(blended[:, :image.shape[-2] * scale, :image.shape[-1] * scale])
    return results


@pytest.mark.parametrize("spec,scale", [
    ({"arch": "dncnn", "channels": 3, "num_features": 4, "num_layers": 2}, 1),
    ({"arch": "unet", "channels": 3, "num_features": (8, 16), "num_blocks": 1}, 1),
    ({"arch": "srnet", "channels": 1, "scale": 2, "num_features": 8, "num_blocks": 1}, 2)])
@pytest.mark.parametrize("balanced", [False, True])
def test_stitched_tiles_are_the_blend_to_the_last_bit(spec, scale, balanced):
    torch.manual_seed(0)
    net = build_net(spec).eval()
    halo = net.receptive_field // 2
    images = [torch.rand(net.channels, 97, 333), torch.rand(net.channels, 130, 100),
              torch.rand(net.channels, 40, 41)]
    for tile, overlap in ((48, 2 * halo + 1), (64, 2 * halo + 9)):
        tile = max(tile, overlap + 16)
        with torch.inference_mode():
            tiled = run_tiled(images, net, tile, overlap, halo, scale, 1, net.alignment,
                              balanced)
            written_out = _blend_everywhere(images, net, tile, overlap, halo, scale,
                                            net.alignment, balanced)
        for got, want in zip(tiled, written_out):
            assert got.shape == want.shape and torch.equal(got, want)


def test_run_tiled_reports_the_share_of_tiles_done_after_each_forward_pass():
    """The actor's progress within a batch: one call per forward pass, rising to 1.0, by tile
    area (a 100x60 image's tiles and a 40x40 one's)."""
    from restorer.image.tiling import run_tiled

    images = [torch.rand(1, 100, 60), torch.rand(1, 40, 40)]
    passes, shares = [], []

    def forward(batch):
        passes.append(batch.shape[0])
        return batch

    run_tiled(images, forward, tile=32, overlap=9, halo=4, batch_size=2,
              progress=shares.append)
    assert len(shares) == len(passes) > 2
    assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0)
    assert 0 < shares[0] < 1
