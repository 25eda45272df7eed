"""A colour net made of a gray one: RGB is turned into three decorrelated *opponent* planes
(luma and two colour differences), the gray ``trunk`` restores each plane on its own, and the
planes are turned back into RGB.

The rows of the transform are orthogonal, so noise that is white and independent across R, G
and B stays white and independent across the three planes (with standard deviations 0.58,
0.71 and 0.61 times the RGB one): a blind gray denoiser sees in each plane the kind of image it
was trained on. Luma carries most of the structure at a third of the noise variance; this is
the colour space CBM3D (Dabov et al. 2007) denoises in. The colour-difference planes are
centred on 0.5 so that every plane lies in ``[0, 1]`` for an image in ``[0, 1]``.

The transform is per pixel, so the net keeps its trunk's alignment and receptive field (tiled
== untiled holds as for the trunk). The trunk runs on three times the pixels of the image.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# RGB -> (luma, R - B, R - 2G + B), rows orthogonal; the inverse is exact.
OPPONENT = ((1 / 3, 1 / 3, 1 / 3), (1 / 2, 0.0, -1 / 2), (1 / 4, -1 / 2, 1 / 4))
CENTRE = (0.0, 0.5, 0.5)  # added to each plane: the colour differences lie around 0


@dataclass(frozen=True)
class OpponentConfig:
    trunk: Mapping[str, Any] = field(default_factory=lambda: {
        "arch": "unet", "channels": 1, "num_features": [32, 64, 128, 256], "num_blocks": 2})

    def __post_init__(self):
        from restorer.nets import canonical_spec  # the registry imports this module

        object.__setattr__(self, "trunk", canonical_spec(self.trunk))


class OpponentNet(nn.Module):
    config_class = OpponentConfig
    channels = 3
    scale = 1
    runs_per_pixel = 3  # the trunk sees each pixel once per plane
    # precision "auto" stays fp32 on CPUs for this net: bf16 autocast cost denoise-color
    # 0.0102 dB on Set5 (sigma 25), outside the 0.01 dB a CPU backend may cost (issue 28)
    cpu_bf16 = False

    def __init__(self, config: OpponentConfig):
        super().__init__()
        from restorer.nets import build_net  # the registry imports this module

        self.config = config
        self.trunk = build_net(config.trunk)
        if self.trunk.channels != 1 or self.trunk.scale != 1:
            raise ValueError(f"an opponent net's trunk must restore one plane at its size; "
                             f"{config.trunk} has {self.trunk.channels} planes and scale "
                             f"{self.trunk.scale}: give a gray net of scale 1")
        self.alignment = self.trunk.alignment
        matrix = torch.tensor(OPPONENT, dtype=torch.float64)
        self.register_buffer("forward_matrix", matrix.float(), persistent=False)
        self.register_buffer("inverse_matrix", torch.linalg.inv(matrix).float(),
                             persistent=False)
        self.register_buffer("centre", torch.tensor(CENTRE).view(1, 3, 1, 1), persistent=False)

    @property
    def receptive_field(self) -> int:
        return self.trunk.receptive_field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        matrix = self.forward_matrix.to(x.dtype)
        centre = self.centre.to(x.dtype)
        # The colour transforms stay in x's precision under autocast (in bf16 they alone cost
        # Set5 0.03 dB); only the trunk runs in the lower precision.
        with torch.autocast(x.device.type, enabled=False):
            planes = torch.einsum("ij,njhw->nihw", matrix, x) + centre
        restored = self.trunk(planes.reshape(n * 3, 1, h, w)).reshape(n, 3, h, w)
        with torch.autocast(x.device.type, enabled=False):
            return torch.einsum("ij,njhw->nihw", self.inverse_matrix.to(x.dtype),
                                restored.to(x.dtype) - centre)
