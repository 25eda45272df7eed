"""U-Net (Ronneberger et al. 2015) for restoration: max pooling down, transposed convolutions up,
skip connections by concatenation, and a residual output ``x - body(x)`` as DnCNN.

Input and output are float32 ``[0, 1]`` NCHW with ``channels`` planes. Any height and width
work: the input is padded to a multiple of ``alignment`` on the bottom and right with its
mirror image (:func:`restorer.image.tiling.pad_reflect`, which works down to 1x1), and the output
cropped back. Pooling makes the net translation-equivariant only in steps
of ``alignment`` pixels, so the tiler starts tiles on multiples of it.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from restorer.image.tiling import pad_reflect


@dataclass(frozen=True)
class UNetConfig:
    channels: int = 1  # 1 for gray nets, 3 for color nets
    num_features: tuple[int, ...] = (32, 64, 128, 256)  # width per level, full resolution first
    num_blocks: int = 2  # 3x3 convolutions (each + ReLU) per level on each side
    residual: bool = True  # return x - body(x); False returns body(x)
    # extra input planes concatenated to the image (a noise map); forward(x, guide) takes them
    guide_channels: int = 0
    # left out of a net's spec at 0, so that the specs of U-Nets without guide planes (the zoo's
    # files, their fingerprints) read as they did before the field existed
    omitted_at_default: ClassVar[tuple[str, ...]] = ("guide_channels",)

    def __post_init__(self):
        object.__setattr__(self, "num_features", tuple(int(f) for f in self.num_features))
        if len(self.num_features) < 2 or min(self.num_features) < 1:
            raise ValueError(f"U-Net needs at least two levels of positive width, got "
                             f"num_features={self.num_features}")
        if self.num_blocks < 1:
            raise ValueError(f"U-Net needs num_blocks >= 1, got {self.num_blocks}")
        if self.guide_channels < 0:
            raise ValueError(f"U-Net needs guide_channels >= 0, got {self.guide_channels}")


def _stage(width_in: int, width: int, blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(blocks):
        layers += [nn.Conv2d(width_in if index == 0 else width, width, 3, padding=1),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    config_class = UNetConfig
    scale = 1
    runs_per_pixel = 1

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.channels = config.channels
        widths = config.num_features
        self.alignment = 2 ** (len(widths) - 1)
        self.down = nn.ModuleList([_stage(config.channels + config.guide_channels, widths[0],
                                          config.num_blocks)])
        self.down.extend(_stage(widths[i - 1], widths[i], config.num_blocks)
                         for i in range(1, len(widths)))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                for i in range(len(widths) - 1))
        self.merge = nn.ModuleList(_stage(2 * widths[i], widths[i], config.num_blocks)
                                   for i in range(len(widths) - 1))
        self.tail = nn.Conv2d(widths[0], config.channels, 3, padding=1)

    @property
    def receptive_field(self) -> int:
        """Width in input pixels of the widest window one output pixel can depend on.

        Along the deepest path: each 3x3 convolution adds 2 pixels at its level's stride, each
        2x2 max pool adds 1 pixel at the stride before it, and each 2x2 transposed convolution
        can add one pixel at its output stride (where the pooling grid falls). The window
        depends on where the pixel sits in the pooling grid; this is its largest width.
        """
        levels, blocks = len(self.config.num_features), self.config.num_blocks
        width = 1 + 2  # the tail convolution
        for level in range(levels - 1):
            stride = 2 ** level
            width += 2 * blocks * stride * 2  # the convolutions down and back up at this level
            width += stride  # the pool down from this level
            width += stride  # the transposed convolution back up to this level
        width += 2 * blocks * 2 ** (levels - 1)  # the bottom level
        return width

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """Restore ``x`` (N, channels, H, W); a net with ``guide_channels`` also takes
        ``guide`` (N, guide_channels, H, W), planes it sees beside the image (a noise map)."""
        if (guide is None) != (self.config.guide_channels == 0):
            raise ValueError(f"this U-Net takes {self.config.guide_channels} guide plane(s); "
                             f"got {'none' if guide is None else guide.shape[1]}")
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.alignment, -width % self.alignment
        y = x if guide is None else torch.cat([x, guide.to(x.dtype)], 1)
        y = pad_reflect(y, pad_h, pad_w)
        skips = []
        for index, stage in enumerate(self.down):
            if index:
                y = self.pool(y)
            y = stage(y)
            skips.append(y)
        skips.pop()
        for index in reversed(range(len(self.up))):
            y = self.merge[index](torch.cat([skips[index], self.up[index](y)], 1))
        y = self.tail(y)[..., :height, :width]
        return x - y if self.config.residual else y
