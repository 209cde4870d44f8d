"""P-CAM: the slice classifier whose class activation maps start the pipeline.

Backbone from MONAI's ResNet family (2D, one input channel), output stride 16 (or 8): the last
stage(s) keep resolution with dilated convolutions instead of striding. Head = global average
pooling + 1x1 convolution without bias (D -> K), so CAM_k = ReLU(sum_d w_{k,d} F_d) needs one
forward pass for all classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks import nets

from ccam.errors import UserError

BACKBONES = {"resnet10": nets.resnet10, "resnet18": nets.resnet18, "resnet34": nets.resnet34, "resnet50": nets.resnet50}


def _keep_resolution(layer: nn.Sequential, dilation: int) -> None:
    """Turn a strided ResNet stage into a dilated one with stride 1 (same receptive field growth)."""
    for i, block in enumerate(layer):
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                if m.stride != (1, 1):
                    m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    d = dilation if i > 0 else max(1, dilation // 2)
                    m.dilation, m.padding = (d, d), (d, d)


class Backbone(nn.Module):
    """MONAI ResNet trunk without its pooling/fc: (B, 1, S, S) -> F (B, D, S/os, S/os)."""

    def __init__(self, name: str = "resnet18", output_stride: int = 16, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
        # width scales every stage's channels (MONAI's widen_factor): 0.5 costs ~1/4 of the FLOPs
        net = BACKBONES[name](spatial_dims=2, n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, num_classes=1,
                              widen_factor=width)
        if output_stride == 16:
            _keep_resolution(net.layer4, 2)
        elif output_stride == 8:
            _keep_resolution(net.layer3, 2)
            _keep_resolution(net.layer4, 4)
        else:
            raise ValueError("output_stride must be 8 or 16")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = net.fc.in_features
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class PCAM(nn.Module):
    """Multi-label slice classifier; ``forward`` gives logits (B, K).

    ``cam_features(x) -> (B, D, h, w)`` and ``classifier`` (1x1 conv D -> K, no bias) are the
    interface `ccam.cam` uses for every CAM-producing model (C-CAM adds M_c to the features).
    ``cam_layer`` names the module whose output is F (hooked by the gradient CAM baselines).
    """

    cam_layer = "backbone"

    def __init__(self, num_classes: int, backbone: str = "resnet18", output_stride: int = 16, in_channels: int = 1,
                 width: float = 1.0):
        super().__init__()
        self.backbone = Backbone(backbone, output_stride, in_channels, width)
        self.feature_dim = self.backbone.out_channels
        self.classifier = nn.Conv2d(self.feature_dim, num_classes, kernel_size=1, bias=False)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """F: (B, 1, S, S) -> (B, D, S/os, S/os)."""
        return self.backbone(x)

    def cam_features(self, x: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        f = self.cam_features(x, **extra)
        return self.classifier(F.adaptive_avg_pool2d(f, 1)).flatten(1)

    @classmethod
    def from_config(cls, pcam_cfg, num_classes: int) -> "PCAM":
        """The P-CAM that the ``pcam`` config section describes (weights freshly initialised)."""
        return cls(num_classes, pcam_cfg.backbone, pcam_cfg.output_stride, width=pcam_cfg.width)

    def load_pretrained(self, path: str | Path) -> int:
        """Load local backbone weights (a ccam checkpoint or a plain state dict); returns tensors loaded.

        Keys may carry a ``backbone.`` or ``model.`` prefix; tensors whose name or shape does not
        fit (e.g. another class count's head) are skipped. Raises UserError when nothing fits.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError("pretrained weights file not found", path=str(path), fix="set pcam.pretrained to a local .pt file or null")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, truncated files, non-tensor objects
            raise UserError(f"cannot read pretrained weights ({type(e).__name__})", path=str(path),
                            fix="give a state dict saved with torch.save (weights only)")
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        own = self.backbone.state_dict()
        take = {}
        for key, value in (state.items() if isinstance(state, dict) else []):
            name = key[len("model."):] if key.startswith("model.") else key
            name = name[len("backbone."):] if name.startswith("backbone.") else name
            if name in own and torch.is_tensor(value) and value.shape == own[name].shape:
                take[name] = value
        if not take:
            raise UserError(f"no tensor of the pretrained file fits the {type(self).__name__} backbone", path=str(path),
                            fix="use weights of the same MONAI ResNet (pcam.backbone) with one input channel")
        own.update(take)
        self.backbone.load_state_dict(own)
        return len(take)

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Backbone at ``lr``, head at ``lr * head_lr_mult`` (the paper's 10x)."""
        return [{"params": self.backbone.parameters(), "lr": lr},
                {"params": self.classifier.parameters(), "lr": lr * head_lr_mult}]
