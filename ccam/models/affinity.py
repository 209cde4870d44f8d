"""AffinityNet (Ahn & Kwak 2018): a stride-8 feature map f whose distances give pixel affinities.

Trunk: MONAI's ResNet (2D, one input channel) at output stride 8, layers 3 and 4 dilated as in
`ccam.models.pcam.Backbone`; depth and width are configurable (``widen_factor``), because at
stride 8 the last stages run on a 4x larger grid than P-CAM's and dominate the cost.
As in the original, features of three depths (layers 2, 3, 4, all at stride 8) are each reduced
by a 1x1 convolution, concatenated and mixed by a last 1x1 convolution; the affinity of two grid
cells is a_ij = exp(-mean_d |f_d(i) - f_d(j)|) (`ccam.affinity.pair_affinities`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from monai.networks import nets

from ccam.affinity import half_disk_offsets, pair_affinities
from ccam.models.pcam import _keep_resolution

# MONAI ResNet family: (block, blocks per stage)
TRUNKS = {"resnet10": ("basic", (1, 1, 1, 1)), "resnet18": ("basic", (2, 2, 2, 2)),
          "resnet34": ("basic", (3, 4, 6, 3)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


class Trunk(nn.Module):
    """MONAI ResNet without pooling/fc at output stride 8: (B, 1, S, S) -> layers 2, 3, 4 outputs."""

    def __init__(self, name: str = "resnet10", width: float = 1.0, in_channels: int = 1):
        super().__init__()
        if name not in TRUNKS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(TRUNKS)}")
        block, layers = TRUNKS[name]
        net = nets.ResNet(block, list(layers), [64, 128, 256, 512], spatial_dims=2, n_input_channels=in_channels,
                          conv1_t_size=7, conv1_t_stride=2, widen_factor=width, num_classes=1)
        _keep_resolution(net.layer3, 2)
        _keep_resolution(net.layer4, 4)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x2 = self.layer2(self.layer1(self.stem(x)))
        x3 = self.layer3(x2)
        return x2, x3, self.layer4(x3)


def _out_channels(layer: nn.Module) -> int:
    """Channels a ResNet stage puts out: the width of its last BatchNorm."""
    return [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def _reduce(cin: int, cout: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: the batches of affinity training are small
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(min(32, cout // 4), cout), nn.ReLU(inplace=True))


class AffinityNet(nn.Module):
    """(B, 1, S, S) -> f (B, D, S/8, S/8); ``affinities`` gives a(p, p + o) for the half disk."""

    def __init__(self, backbone: str = "resnet10", width: float = 1.0, in_channels: int = 1,
                 widths: tuple[int, int, int] = (64, 128, 256)):
        super().__init__()
        self.backbone = Trunk(backbone, width, in_channels)
        b = self.backbone
        self.reduce2 = _reduce(_out_channels(b.layer2), widths[0])
        self.reduce3 = _reduce(_out_channels(b.layer3), widths[1])
        self.reduce4 = _reduce(_out_channels(b.layer4), widths[2])
        self.feature_dim = sum(widths)
        self.mix = nn.Conv2d(self.feature_dim, self.feature_dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """f: (B, 1, S, S) -> (B, D, ceil(S/8), ceil(S/8)), D = sum(widths)."""
        x2, x3, x4 = self.backbone(x)
        return self.mix(torch.cat([self.reduce2(x2), self.reduce3(x3), self.reduce4(x4)], 1))

    def affinities(self, x: torch.Tensor, radius: int) -> torch.Tensor:
        """(B, 1, S, S) -> a(p, p + o) (B, P, h, w) for the P half-disk offsets of ``radius``."""
        return pair_affinities(self(x), half_disk_offsets(radius))

    def param_groups(self, lr: float, head_lr_mult: float = 10.0) -> list[dict]:
        """Trunk at ``lr``, the new 1x1 layers at ``lr * head_lr_mult`` (the original's 10x)."""
        head = [p for m in (self.reduce2, self.reduce3, self.reduce4, self.mix) for p in m.parameters()]
        return [{"params": self.backbone.parameters(), "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]
