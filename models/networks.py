"""The pix2pix networks (Isola et al. 2017): a U-Net generator and a PatchGAN discriminator.

Read top-down: the down and up blocks, the recursive U-Net level built from them, the
generator, then the discriminator. Layer choices follow the reference implementation so that
the parameter counts match it exactly: convolutions followed by BatchNorm carry no bias
(BatchNorm's shift makes it redundant), the outermost up-convolution and the first and last
discriminator convolutions keep theirs.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import DiscriminatorConfig, GeneratorConfig

_KERNEL = 4  # 4×4 kernels, stride 2, padding 1: exact halving and doubling of the size


def _down_conv(in_channels: int, out_channels: int, *, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, _KERNEL, stride=2, padding=1, bias=bias)


def _up_conv(in_channels: int, out_channels: int, *, bias: bool) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_channels, out_channels, _KERNEL, stride=2, padding=1, bias=bias)


class UNetLevel(nn.Module):
    """One level of the U-Net: down block, the inner levels, up block, and the skip connection.

    The outermost level has no activation or norm before its down conv (it sees the image) and
    ends in tanh; the innermost has no norm after its down conv (1×1 feature map at 256² with
    depth 8, where BatchNorm over a single pixel per channel would be degenerate in batch 1).
    """

    def __init__(
        self,
        outer_channels: int,
        inner_channels: int,
        *,
        in_channels: int | None = None,
        inner: UNetLevel | None = None,
        outermost: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        in_channels = outer_channels if in_channels is None else in_channels
        innermost = inner is None
        down_conv = _down_conv(in_channels, inner_channels, bias=False)
        # The up block sees its inner level's output concatenated with the skip, except at
        # the innermost level, which has no inner level to concatenate.
        up_in = inner_channels if innermost else inner_channels * 2

        down: list[nn.Module] = [down_conv]
        if not outermost:
            down.insert(0, nn.LeakyReLU(0.2))
            if not innermost:
                down.append(nn.BatchNorm2d(inner_channels))
        up: list[nn.Module] = [nn.ReLU()]
        if outermost:
            up += [_up_conv(up_in, outer_channels, bias=True), nn.Tanh()]
        else:
            up += [_up_conv(up_in, outer_channels, bias=False), nn.BatchNorm2d(outer_channels)]
            if dropout > 0:
                up.append(nn.Dropout(dropout))
        self.down = nn.Sequential(*down)
        self.inner = inner if inner is not None else nn.Identity()
        self.up = nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.inner(self.down(x)))
        if self.outermost:
            return y
        return torch.cat((x, y), dim=1)  # skip connection: (B, 2·C_outer, H, W)


class UNetGenerator(nn.Module):
    """L (B, in_channels, S, S) in [-1, 1] -> ab (B, out_channels, S, S) in [-1, 1]."""

    def __init__(self, config: GeneratorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or GeneratorConfig()
        # Channels per level from the outside in: width, 2w, 4w, then 8w for every deeper level.
        channels = [config.width * min(2**i, 8) for i in range(config.depth)]
        level: UNetLevel | None = None
        for index in range(config.depth - 1, 0, -1):
            inner_count = config.depth - 1 - index  # 0 for the innermost level
            # Dropout in the dropout_blocks levels just outside the innermost one (pix2pix:
            # the three 8w up blocks after the bottleneck).
            has_dropout = 1 <= inner_count <= config.dropout_blocks
            level = UNetLevel(
                channels[index - 1],
                channels[index],
                inner=level,
                dropout=config.dropout if has_dropout else 0.0,
            )
        self.net = UNetLevel(
            config.out_channels,
            channels[0],
            in_channels=config.in_channels,
            inner=level,
            outermost=True,
        )

    def forward(self, l_norm: torch.Tensor) -> torch.Tensor:
        return self.net(l_norm)  # (B, out_channels, S, S), tanh


class PatchDiscriminator(nn.Module):
    """(L, ab) pairs (B, in_channels, S, S) -> real/fake logits per 70×70 patch (B, 1, S', S')."""

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DiscriminatorConfig()
        width = config.width
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, width, _KERNEL, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        channels = width
        for n in range(1, config.layers + 1):
            # The last of these keeps stride 1: it widens the receptive field to 70×70
            # without halving the 31×31 map again.
            stride = 2 if n < config.layers else 1
            out_channels = width * min(2**n, 8)
            layers += [
                nn.Conv2d(channels, out_channels, _KERNEL, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, _KERNEL, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, l_norm: torch.Tensor, ab_norm: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat((l_norm, ab_norm), dim=1))  # (B, 1, 30, 30) at 256²


def init_weights(module: nn.Module, *, std: float = 0.02) -> None:
    """pix2pix initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
