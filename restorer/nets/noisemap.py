"""A noise-aware restoration net: a small estimator reads how much noise each pixel carries,
and a U-Net restores the image seeing that noise map beside it (CBDNet, Guo et al. 2019; the
noise-map input of FFDNet, Zhang et al. 2018).

``estimate(x)`` is the noise level map: per pixel and plane, the standard deviation of the
noise on the ``[0, 1]`` scale, white-equivalent (``restorer.image.degrade.practical_degradation``
makes the training targets: :func:`restorer.image.degrade.noise_level_map` of the noise left after
demosaicing, the camera's processing, tone curve and JPEG; noise spread over neighbours reads
higher than its std). The
estimator runs at half resolution (a stride-2 convolution, 3x3 convolutions, bilinear x2 back
up): noise levels vary slowly, and so it costs about 1% of the U-Net per pixel. With an
``estimator_window`` its per-pixel levels are averaged over that window (half-resolution
pixels), each weighted by a second output of the estimator (flat pixels tell the noise level
better than textured ones); the window adds to the receptive field, and so to the tiles'
overlap.

``strength`` scales the map before the U-Net sees it: 1 removes the noise the estimator
found; below 1 the net takes the image for cleaner than it is and keeps fine grain (0 keeps
all of it and still removes compression artifacts); above 1 it cleans harder. It is a
setting of the net at run time (``net.strength``), not a weight.

With ``chroma_features`` > 0 (colour nets only), a chroma branch follows the U-Net: it sees
the restored image's luma and chroma, the input's chroma and the (scaled) map at
1/``chroma_scale`` resolution (space-to-depth, then 3x3 convolutions; pixel shuffle back) and
adds a correction to the restored chroma. It was added because the U-Net leaves cc15's colour
blotches (4-16 px) almost untouched; the branch reaches ~``chroma_scale`` x (2 x
``chroma_layers`` + 1) px for ~5% of the U-Net's cost per pixel. Its last convolution starts
at zero, so a net given the branch restores exactly as before until the branch is trained.
No stage file has a trained one yet: on the training mixture it learnt nothing that carried to
cc15 (``restorer/zoo/stages/README.md``, stages 30-32).

Input and output are float32 ``[0, 1]`` NCHW with ``channels`` planes. The input is padded to
a multiple of ``alignment`` (mirror image, bottom and right) once for both parts, so the net
is translation-equivariant in steps of ``alignment`` and tiled == untiled holds as for a
U-Net.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional

from restorer.image.tiling import pad_reflect

MAP_SCALE = 0.05  # the estimator's softplus output times this: noise std on [0, 1]


@dataclass(frozen=True)
class NoiseMapConfig:
    channels: int = 3
    estimator_features: int = 24  # width of the estimator's convolutions
    estimator_layers: int = 4  # 3x3 convolutions of the estimator (the first has stride 2)
    # > 0: the estimate is pooled over a window of this many half-resolution pixels (odd),
    # weighted by a second output per plane (see NoiseMapNet.estimate); 0: per pixel
    estimator_window: int = 0
    trunk: Mapping[str, Any] = field(default_factory=lambda: {
        "arch": "unet", "channels": 3, "num_features": [32, 64, 128, 256], "num_blocks": 2,
        "guide_channels": 3})
    chroma_features: int = 0  # > 0: width of the chroma branch (see ChromaBranch); 0: none
    chroma_layers: int = 6  # its 3x3 convolutions, at 1/chroma_scale resolution
    chroma_scale: int = 4  # its space-to-depth factor
    # the negative slope of its hidden activations: 0 is a ReLU (stage 35's branch); a leak
    # keeps units that a noisy start pushed negative learning (ReLUs there die, stage 34)
    chroma_leak: float = 0.0
    # specs written before the branch existed rebuild nets without it (and keep their hash)
    omitted_at_default: ClassVar[tuple[str, ...]] = (
        "chroma_features", "chroma_layers", "chroma_scale", "chroma_leak")

    def __post_init__(self):
        from restorer.nets import canonical_spec  # the registry imports this module

        object.__setattr__(self, "trunk", canonical_spec(self.trunk))
        if self.estimator_layers < 2 or self.estimator_features < 1:
            raise ValueError(f"the estimator needs >= 2 layers of positive width, got "
                             f"{self.estimator_layers} x {self.estimator_features}")
        if self.estimator_window < 0 or (self.estimator_window and self.estimator_window % 2 == 0):
            raise ValueError(f"estimator_window {self.estimator_window}: give an odd number of "
                             f"half-resolution pixels, or 0 for a per-pixel estimate")
        if self.chroma_features and (self.channels != 3 or self.chroma_layers < 2
                                     or self.chroma_scale < 1):
            raise ValueError(f"a chroma branch ({self.chroma_features} features) needs 3 "
                             f"planes, >= 2 layers and a scale >= 1; got {self.channels} planes, "
                             f"{self.chroma_layers} layers, scale {self.chroma_scale}: give "
                             f"chroma_features = 0 for none")
        if not 0.0 <= self.chroma_leak < 1.0:
            raise ValueError(f"chroma_leak {self.chroma_leak}: give a negative slope in [0, 1) "
                             f"(0: a ReLU)")


# RGB -> luma and two colour differences (BT.601 YCbCr without offsets), and back
YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


class ChromaBranch(nn.Module):
    """A correction of the restored image's chroma from a wide, low-resolution view.

    Inputs per pixel (6 planes), each scaled to be of order 1 where it matters: the restored
    luma (centred), the restored chroma, what the trunk removed from the input's chroma (noise
    of a few levels) and the mean of the noise map over planes (``INPUT_SCALES``);
    space-to-depth by ``scale``; ``layers`` 3x3 convolutions of ``features`` (ReLU between, or
    a leaky ReLU of slope ``leak``; He-initialised); the last makes 2 x scale^2 planes that
    pixel shuffle turns into a full-resolution (Cb, Cr) correction, added before the image
    goes back to RGB. The last convolution starts at zero (the branch adds nothing until
    trained). Unscaled inputs (luma in [0, 1] beside chroma noise of 0.01) and PyTorch's default
    initialisation left the last layer's inputs at ~1e-4 and the branch untrainable (stages
    30-33); with ReLUs its hidden units then died (34-35), a leak keeps them learning (36)."""

    # luma - 0.5, Cb, Cr, removed Cb, removed Cr, map: x 2, 8, 8, 32, 32, 16
    INPUT_SCALES = (2.0, 8.0, 8.0, 32.0, 32.0, 16.0)

    def __init__(self, features: int, layers: int, scale: int, leak: float = 0.0):
        super().__init__()
        self.scale = scale
        area = scale * scale

        def activation() -> nn.Module:
            return nn.LeakyReLU(leak, inplace=True) if leak else nn.ReLU(inplace=True)

        convs: list[nn.Module] = [nn.Conv2d(6 * area, features, 3, padding=1), activation()]
        for _ in range(layers - 2):
            convs += [nn.Conv2d(features, features, 3, padding=1), activation()]
        convs.append(nn.Conv2d(features, 2 * area, 3, padding=1))
        for conv in convs[:-1:2]:
            nn.init.kaiming_normal_(conv.weight, a=leak, nonlinearity="leaky_relu")
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(convs[-1].weight)
        nn.init.zeros_(convs[-1].bias)
        self.body = nn.Sequential(*convs)
        forward = torch.tensor(YCBCR)
        self.register_buffer("to_ycc", forward, persistent=False)
        self.register_buffer("to_rgb", torch.linalg.inv(forward), persistent=False)
        self.register_buffer("scales", torch.tensor(self.INPUT_SCALES).view(1, -1, 1, 1),
                             persistent=False)

    @property
    def receptive_field(self) -> int:
        """Each 3x3 convolution reaches one block of ``scale`` px further on either side, and a
        pixel may sit anywhere in its own block: ``scale - 1`` px more on one side."""
        convs = sum(isinstance(m, nn.Conv2d) for m in self.body)
        return 2 * (convs * self.scale + self.scale - 1) + 1

    def forward(self, restored: torch.Tensor, x: torch.Tensor,
                noise_map: torch.Tensor) -> torch.Tensor:
        # The colour transforms stay in float32 under autocast (8-bit output needs it); the
        # convolutions run in the autocast precision.
        with torch.autocast(x.device.type, enabled=False):
            ycc = torch.einsum("ij,bjhw->bihw", self.to_ycc, restored.float())
            removed = torch.einsum("ij,bjhw->bihw", self.to_ycc[1:], x.float()) - ycc[:, 1:]
            seen = torch.cat([ycc[:, :1] - 0.5, ycc[:, 1:], removed,
                              noise_map.float().mean(1, keepdim=True)], 1) * self.scales
        correction = self.body(functional.pixel_unshuffle(seen, self.scale))
        with torch.autocast(x.device.type, enabled=False):
            chroma = ycc[:, 1:] + functional.pixel_shuffle(correction.float(), self.scale)
            return torch.einsum("ij,bjhw->bihw", self.to_rgb, torch.cat([ycc[:, :1], chroma], 1))


class NoiseMapNet(nn.Module):
    config_class = NoiseMapConfig
    scale = 1
    runs_per_pixel = 1  # the estimator and the trunk, once each

    def __init__(self, config: NoiseMapConfig):
        super().__init__()
        from restorer.nets import build_net  # the registry imports this module

        self.config = config
        self.channels = config.channels
        self.trunk = build_net(config.trunk)
        guide = getattr(self.trunk.config, "guide_channels", 0)
        if (self.trunk.channels, guide, self.trunk.scale) != (config.channels,) * 2 + (1,):
            raise ValueError(f"a noise-map net's trunk must restore {config.channels} planes "
                             f"at its size with {config.channels} guide planes; {config.trunk} "
                             f"does not: give a U-Net with guide_channels = {config.channels}")
        self.alignment = max(2, self.trunk.alignment)
        self.chroma = None
        if config.chroma_features:
            self.chroma = ChromaBranch(config.chroma_features, config.chroma_layers,
                                       config.chroma_scale, config.chroma_leak)
            self.alignment = math.lcm(self.alignment, config.chroma_scale)
        width = config.estimator_features
        layers: list[nn.Module] = [nn.Conv2d(config.channels, width, 3, stride=2, padding=1),
                                   nn.ReLU(inplace=True)]
        for _ in range(config.estimator_layers - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        outputs = config.channels * (2 if config.estimator_window else 1)
        layers.append(nn.Conv2d(width, outputs, 3, padding=1))
        self.estimator = nn.Sequential(*layers)
        self.strength = 1.0

    @property
    def receptive_field(self) -> int:
        """The trunk's window widened by the estimator's (each of its 3x3 convolutions after
        the first adds 4 px at stride 2; the first and the bilinear upsampling 3 + 2 px; the
        pooling window 2 px per half-resolution pixel beyond the first)."""
        window = max(self.config.estimator_window, 1)
        estimator = 3 + 4 * (self.config.estimator_layers - 1) + 2 + 2 * (window - 1)
        field = self.trunk.receptive_field + estimator - 1
        return field if self.chroma is None else field + self.chroma.receptive_field - 1

    def _estimate_aligned(self, x: torch.Tensor) -> torch.Tensor:
        out = self.estimator(x)
        window = self.config.estimator_window
        if window:
            out = out.float()
            level = functional.softplus(out[:, : self.channels])
            weight = torch.sigmoid(out[:, self.channels:]) + 1e-4
            half = window // 2
            pooled = [functional.avg_pool2d(
                functional.pad(part, (half,) * 4, mode="replicate"), window, stride=1)
                for part in (weight * level, weight)]
            low = pooled[0] / pooled[1]
        else:
            low = functional.softplus(out)
        return functional.interpolate(low, scale_factor=2, mode="bilinear",
                                      align_corners=False) * MAP_SCALE

    def estimate(self, x: torch.Tensor) -> torch.Tensor:
        """The noise level map of ``x`` (N, channels, H, W): per pixel and plane the noise's
        standard deviation on the ``[0, 1]`` scale (>= 0), before ``strength``."""
        height, width = x.shape[-2:]
        padded = pad_reflect(x, -height % self.alignment, -width % self.alignment)
        return self._estimate_aligned(padded)[..., :height, :width]

    def forward(self, x: torch.Tensor, noise_map: torch.Tensor | None = None) -> torch.Tensor:
        """Restore ``x``; ``noise_map`` (same shape) replaces the estimate (training feeds true
        maps); ``strength`` scales whichever map is used."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.alignment, -width % self.alignment
        padded = pad_reflect(x, pad_h, pad_w)
        if noise_map is None:
            noise_map = self._estimate_aligned(padded)
        else:
            noise_map = pad_reflect(noise_map, pad_h, pad_w)
        noise_map = noise_map * self.strength
        restored = self.trunk(padded, noise_map)
        if self.chroma is not None:
            restored = self.chroma(restored, padded, noise_map)
        return restored[..., :height, :width]


def from_unet(unet: nn.Module, config: NoiseMapConfig | None = None) -> NoiseMapNet:
    """A noise-map net that starts as ``unet`` (a U-Net of the trunk's shape without guide
    planes): its weights copied, the guide planes' weights zero, so it restores exactly as
    ``unet`` until it is trained."""
    net = NoiseMapNet(config or NoiseMapConfig())
    state = dict(unet.state_dict())
    first = "down.0.0.weight"
    weight = torch.zeros_like(net.trunk.state_dict()[first])
    weight[:, : state[first].shape[1]] = state[first]
    state[first] = weight
    net.trunk.load_state_dict(state)
    return net
