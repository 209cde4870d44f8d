"""P-CAM: the slice classifier whose class activation maps start the pipeline.

Backbone from MONAI's ResNet family (2D, one input channel), output stride 16 (or 8): the last
stage(s) keep resolution with dilated convolutions instead of striding. Head = 1x1 convolution
without bias (D -> K) and a pooling of the class score maps to one logit per class: global
average pooling (the paper) or top-k pooling; either way CAM_k = ReLU(sum_d w_{k,d} F_d) needs
one forward pass for all classes.

``backbone: local`` is a small-receptive-field fully convolutional trunk (`LocalTrunk`, issue 13):
trained from scratch on a few hundred slices, a deep GAP ResNet answers "is the kidney in this
slice?" from the slice's height in the body (spine, liver size, lungs) and its CAMs spread over
the whole body; a trunk that sees 20-30 pixels around each position, pooled by the mean of the k
highest scores (a size prior: the class must fill about k pixels, not one landmark spot), with
the classes competing per pixel (``exclusive_topk``), smooth position maps (``positional``) and
left/right twins kept on their side (``sides``), answers from what lies at the organ (see the
README's localisation table).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks import nets

from ccam.data.cohort import left_right_pairs
from ccam.errors import UserError

BACKBONES = {"resnet10": nets.resnet10, "resnet18": nets.resnet18, "resnet34": nets.resnet34, "resnet50": nets.resnet50}
POOLINGS = ("gap", "topk", "exclusive_topk")


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LocalTrunk(nn.Module):
    """Six 3x3 conv-BN-ReLU layers, one or two stride-2 steps: (B, 1, S, S) -> F (B, 4w, S/os, S/os).

    Receptive field 19 pixels at output stride 2, 27 at 4 (6.5 / 9.5 cm at S = 96 over a 34 cm
    field of view): enough to see an organ's texture and edge, too little to read the slice's
    height from the spine, lungs and body outline together. ``width`` w = base channels
    (64 x ``pcam.width``).
    """

    def __init__(self, width: int = 16, in_channels: int = 1, output_stride: int = 2):
        super().__init__()
        if output_stride not in (2, 4):
            raise ValueError("the local trunk has output stride 2 or 4")
        w = max(4, int(width))
        second = 2 if output_stride == 4 else 1
        self.layers = nn.Sequential(_conv_bn_relu(in_channels, w), _conv_bn_relu(w, w), _conv_bn_relu(w, 2 * w, 2),
                                    _conv_bn_relu(2 * w, 2 * w, second), _conv_bn_relu(2 * w, 4 * w), _conv_bn_relu(4 * w, 4 * w))
        self.out_channels = 4 * w
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PositionalChannels(nn.Module):
    """A trunk's features plus 5 smooth position maps x, y, x^2, y^2, xy (each in [-1, 1] over the slice).

    (B, 1, S, S) -> (B, D + 5, h, w). The 1x1 head weighs them per class, so a CAM gains an additive,
    low-order preference for where its class lies (the liver on the patient's right, a left kidney
    left of the spine) without the trunk being able to fire on position alone: the same position
    maps appear on tagged and untagged slices, so only the image features can explain a tag.
    """

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.out_channels = trunk.out_channels + 5
        self.output_stride = trunk.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        b, _, h, w = f.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, device=f.device, dtype=f.dtype),
                                torch.linspace(-1, 1, w, device=f.device, dtype=f.dtype), indexing="ij")
        pos = torch.stack([xx, yy, xx * xx, yy * yy, xx * yy])[None].expand(b, 5, h, w)
        return torch.cat([f, pos], dim=1)


def class_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) of a CAM model (``classifier``, ``pooling``, ``restrict``) from its features (B, D, h, w)."""
    if model.pooling == "gap" and not bool(model.sides.any()):
        return model.classifier(F.adaptive_avg_pool2d(features, 1)).flatten(1)  # pool first: K x cheaper
    if model.pooling == "gap":
        return model.restrict(model.classifier(features), 0.0).mean(dim=(2, 3))
    return pool_scores(model.restrict(model.classifier(features), -1e4), model.pooling, model.topk_fraction)


class CAMHead(nn.Module):
    """What P-CAM and C-CAM share after the features: pooling settings and the laterality prior.

    ``sides`` (K,) and ``side_margin`` are buffers, so a checkpoint carries them to every later stage.
    """

    def _init_head(self, num_classes: int, pooling: str, topk_fraction: float, sides: list[float] | None = None,
                   side_margin: float = 0.1) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.pooling, self.topk_fraction = pooling, topk_fraction
        self.register_buffer("sides", torch.tensor(sides if sides is not None else [0.0] * num_classes, dtype=torch.float32))
        self.register_buffer("side_margin", torch.tensor(float(side_margin)))

    def restrict(self, maps: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Class maps (B, K, h, w) with ``fill`` on the side where the class may not lie."""
        return restrict_to_side(maps, self.sides, float(self.side_margin), fill)


def build_trunk(name: str, output_stride: int, in_channels: int = 1, width: float = 1.0, positional: bool = False) -> nn.Module:
    """A P-CAM trunk with ``out_channels`` and ``output_stride``: a MONAI ResNet or ``local``,
    optionally with `PositionalChannels`."""
    trunk = LocalTrunk(round(64 * width), in_channels, output_stride) if name == "local" else \
        Backbone(name, output_stride, in_channels, width)
    return PositionalChannels(trunk) if positional else trunk


def restrict_to_side(maps: torch.Tensor, sides: torch.Tensor, margin: float, fill: float) -> torch.Tensor:
    """Class maps (B, K, h, w) with ``fill`` where a class may not lie; sides (K,): +1, -1 or 0.

    The slices are in the canonical view (columns run from the patient's right to left), so a
    class with side +1 (the left twin of a pair, e.g. left_kidney) is kept on columns
    x >= -margin (x in [-1, 1] over the slice: its left half plus a margin for a patient off
    centre), -1 (right twin) on x <= margin, 0 everywhere: a 1/0 positional indicator from
    anatomy, given by the class names rather than learned (twins look alike, so nothing in the
    image tells which is which; only the side does).
    """
    if not bool(sides.any()):
        return maps
    x = torch.linspace(-1, 1, maps.shape[-1], device=maps.device, dtype=maps.dtype)
    allowed = x[None, :] * sides.to(maps.dtype)[:, None] >= -margin  # (K, w)
    return torch.where(allowed[None, :, None, :], maps, torch.full_like(maps, fill))


def class_sides(classes: list[str]) -> list[float]:
    """+1 for the left twin, -1 for the right twin of every left/right pair, 0 for other classes."""
    sides = [0.0] * len(classes)
    for left, right in left_right_pairs(classes):
        sides[left - 1], sides[right - 1] = 1.0, -1.0
    return sides


def pool_scores(maps: torch.Tensor, pooling: str = "gap", topk_fraction: float = 0.01) -> torch.Tensor:
    """Class score maps (B, K, h, w) -> logits (B, K).

    ``gap``: the mean (the paper; equal to the 1x1 head applied to GAP(F), the head being linear).
    ``topk``: the mean of the ``topk_fraction`` x h x w highest scores of each map (at least one):
    a class counts as present when some region of about that size scores high, so one small
    landmark cannot carry the decision and the whole body cannot either.
    ``exclusive_topk``: the classes compete per pixel (softmax over [background score 0, K scores]:
    organs do not overlap, so one kidney's pixels cannot also explain the other kidney's tag), the
    top-k mean of each class probability q_k is the slice probability; returns logit(q_k).
    """
    if pooling == "gap":
        return maps.mean(dim=(2, 3))
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    flat = maps.flatten(2)
    k = max(1, min(flat.shape[-1], int(round(topk_fraction * flat.shape[-1]))))
    if pooling == "topk":
        return flat.topk(k, dim=-1).values.mean(-1)
    probs = torch.softmax(torch.cat([torch.zeros_like(flat[:, :1]), flat], dim=1), dim=1)[:, 1:]
    q = probs.topk(k, dim=-1).values.mean(-1).clamp(1e-6, 1 - 1e-6)
    return torch.log(q) - torch.log1p(-q)


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


class PCAM(CAMHead):
    """Multi-label slice classifier; ``forward`` gives logits (B, K) (`pool_scores` of the CAM scores).

    ``cam_features(x) -> (B, D, h, w)`` and ``classifier`` (1x1 conv D -> K, no bias) are the
    interface `ccam.cam` uses for every CAM-producing model (C-CAM adds M_c to the features).
    ``cam_layer`` names the module whose output is F (hooked by the gradient CAM baselines).
    """

    cam_layer = "backbone"

    def __init__(self, num_classes: int, backbone: str = "resnet18", output_stride: int = 16, in_channels: int = 1,
                 width: float = 1.0, pooling: str = "gap", topk_fraction: float = 0.01, positional: bool = False,
                 sides: list[float] | None = None, side_margin: float = 0.1):
        super().__init__()
        self._init_head(num_classes, pooling, topk_fraction, sides, side_margin)
        self.backbone = build_trunk(backbone, output_stride, in_channels, width, positional)
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
        return class_logits(self, f)

    @classmethod
    def from_config(cls, pcam_cfg, num_classes: int, classes: list[str] | None = None) -> "PCAM":
        """The P-CAM that the ``pcam`` config section describes (weights freshly initialised).

        ``classes`` (names) set the laterality prior when ``pcam.laterality`` is auto; loaders may
        omit them, the prior then comes with the checkpoint's buffers.
        """
        sides = class_sides(classes) if classes is not None and pcam_cfg.laterality == "auto" else None
        return cls(num_classes, pcam_cfg.backbone, pcam_cfg.stride, width=pcam_cfg.width,
                   pooling=pcam_cfg.pooling, topk_fraction=pcam_cfg.topk_fraction, positional=pcam_cfg.positional,
                   sides=sides, side_margin=pcam_cfg.laterality_margin)

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
