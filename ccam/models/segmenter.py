"""The 2D segmenter trained on the (refined) pseudo-masks: a MONAI U-Net on S x S slices.

`Segmenter` wraps MONAI's ``UNet`` (residual units) or ``BasicUNet`` and pads the input to a
multiple of the network's total stride (then crops the logits back), so any slice size S works.
Its architecture is described by a small dict (`spec`) stored beside the checkpoint, so
`predict` rebuilds exactly the trained network whatever the config says later.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks import nets


def segmenter_spec(network: str, channels, num_classes: int, dropout: float = 0.0) -> dict:
    """Architecture record: ``num_classes`` is C = K + 1 (background included)."""
    return {"network": network, "channels": [int(c) for c in channels], "num_classes": int(num_classes),
            "dropout": float(dropout)}


class Segmenter(nn.Module):
    """(B, 1, H, W) normalised slices -> logits (B, C, H, W), C = K + 1."""

    def __init__(self, network: str = "unet", channels=(16, 32, 64, 128, 256), num_classes: int = 2, dropout: float = 0.0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError("the segmenter needs at least two channel levels")
        if network == "unet":
            # instance norm (as nnU-Net): no batch statistics, so training, validation and
            # prediction normalise alike, whatever the batch size
            self.net = nets.UNet(spatial_dims=2, in_channels=1, out_channels=num_classes, channels=channels,
                                 strides=(2,) * (len(channels) - 1), num_res_units=2, norm=("instance", {"affine": True}),
                                 dropout=dropout)
            self.stride = 2 ** (len(channels) - 1)
        elif network == "basicunet":
            if len(channels) != 6:
                raise ValueError("basicunet takes exactly six feature sizes (five encoder levels + the last decoder)")
            self.net = nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=num_classes, features=channels,
                                      dropout=dropout)
            self.stride = 16
        else:
            raise ValueError(f"unknown segmenter network {network!r}; choose unet or basicunet")
        self.num_classes = num_classes

    @classmethod
    def from_spec(cls, spec: dict) -> "Segmenter":
        return cls(spec["network"], spec["channels"], spec["num_classes"], spec.get("dropout", 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:  # strided encoders need sizes divisible by their total stride
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.net(x)[..., :h, :w]
