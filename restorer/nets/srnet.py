"""A PixelShuffle super-resolution net (ESPCN's sub-pixel upsampling, Shi et al. 2016, on an
EDSR-style body of residual blocks, Lim et al. 2017).

Input: float32 ``[0, 1]`` NCHW low-resolution images with ``channels`` planes; output: the
image ``scale`` times larger on each side. The net learns the difference from a bicubic
upscale of its input, which it adds back (``torch``'s bicubic, a = -0.75).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class SRNetConfig:
    channels: int = 1  # 1 for gray nets (a colour image is upscaled plane by plane), 3 for RGB
    scale: int = 2  # 2 or 4 (two x2 PixelShuffle stages)
    num_features: int = 48  # width of the body
    num_blocks: int = 8  # residual blocks (conv, ReLU, conv, + skip) in the body

    def __post_init__(self):
        if self.scale not in (2, 4):
            raise ValueError(f"SRNet scale must be 2 or 4, got {self.scale}")
        if self.num_blocks < 1 or self.num_features < 1:
            raise ValueError(f"SRNet needs num_blocks >= 1 and num_features >= 1, got "
                             f"{self.num_blocks}, {self.num_features}")


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRNet(nn.Module):
    config_class = SRNetConfig
    alignment = 1
    runs_per_pixel = 1

    def __init__(self, config: SRNetConfig):
        super().__init__()
        self.config = config
        self.channels = config.channels
        self.scale = config.scale
        width = config.num_features
        self.head = nn.Conv2d(config.channels, width, 3, padding=1)
        self.body = nn.Sequential(*[_Block(width) for _ in range(config.num_blocks)],
                                  nn.Conv2d(width, width, 3, padding=1))
        stages: list[nn.Module] = []
        for _ in range({2: 1, 4: 2}[config.scale]):
            stages += [nn.Conv2d(width, 4 * width, 3, padding=1), nn.PixelShuffle(2)]
        self.upsample = nn.Sequential(*stages)
        self.tail = nn.Conv2d(width, config.channels, 3, padding=1)

    @property
    def receptive_field(self) -> int:
        """Width in input pixels of the window that one output pixel depends on (rounded up).

        Head, body end, two per block and the first upsampling convolution work at the input's
        resolution (2 pixels each); the x4 net's second upsampling convolution works at twice it
        (1 pixel) and the tail at the output's (2 / scale); plus 1 for the sub-pixel phase.
        """
        convs = 3 + 2 * self.config.num_blocks
        width = 1 + 2 * convs + (1 if self.scale == 4 else 0) + 2 / self.scale + 1
        return math.ceil(width) | 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        features = features + self.body(features)
        out = self.tail(self.upsample(features))
        base = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return base + out
