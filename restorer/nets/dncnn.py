"""DnCNN (Zhang et al., IEEE TIP 2017): a plain stack of 3x3 convolutions that predicts the noise.

The net returns the restored image ``x - noise``, not the residual. Input and output are float32
``[0, 1]`` NCHW with ``channels`` planes; any height and width work (zero padding per layer).
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DnCNNConfig:
    channels: int = 1  # 1 for gray nets, 3 for color nets
    num_features: int = 64  # width of every hidden layer
    num_layers: int = 17  # convolutions in all, first and last included (17 in the paper)
    batch_norm: bool = True  # BatchNorm in the middle layers, as in the paper
    batch_norm_eps: float = 1e-5  # BatchNorm's eps (torch's default; the authors' nets use 1e-4)
    last_bias: bool = True  # bias on the last convolution (the authors' nets have none)


class DnCNN(nn.Module):
    config_class = DnCNNConfig
    scale = 1
    alignment = 1
    runs_per_pixel = 1

    def __init__(self, config: DnCNNConfig):
        super().__init__()
        if config.num_layers < 2:
            raise ValueError(f"DnCNN needs num_layers >= 2, got {config.num_layers}")
        self.config = config
        self.channels = config.channels
        width = config.num_features
        layers: list[nn.Module] = [
            nn.Conv2d(config.channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
        ]
        for _ in range(config.num_layers - 2):
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not config.batch_norm))
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(width, eps=config.batch_norm_eps))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(width, config.channels, 3, padding=1, bias=config.last_bias))
        self.body = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        """Width in input pixels of the window that one output pixel depends on."""
        return 2 * self.config.num_layers + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = self.body(x)
        return x - noise
