"""Semantic segmentation: UPerNet or semantic-FPN decoders over any backbone, plus an auxiliary FCN head.

What comes from where:

* backbone: :class:`visionzoo.tasks.backbone.PyramidBackbone` (timm ``features_only``; the simple
  feature pyramid for plain models), strides 4, 8, 16, 32;
* decoders: segmentation_models_pytorch's ``UPerNetDecoder`` (PPM on stride 32 + FPN fused at stride
  4, Xiao et al. 2018) and ``FPNDecoder`` (Kirillov et al.'s panoptic-FPN semantic branch). smp's
  decoders index features as ``[stride 1, stride 2, stride 4, ...]``; the two high-resolution
  slots are filled with placeholders they never read;
* written here (no maintained library ships them as standalone modules): the 1x1 classifier on the
  decoder output and the auxiliary FCN head the UPerNet papers train with (mmseg's ``FCNHead``:
  3x3 conv-BN-ReLU, dropout, 1x1 classifier on the stride-16 map, loss weight 0.4), used in training
  only.

Loss: cross-entropy with ``ignore_index`` on logits upsampled (bilinear) to the label size, plus
``aux_weight`` times the same on the auxiliary logits.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import PyramidBackbone

__all__ = ["DECODERS", "Segmenter", "FCNHead"]

DECODERS = ("upernet", "fpn")


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv-BN-ReLU, Dropout2d, 1x1 classifier. (B, C, h, w) -> (B, classes, h, w)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class Segmenter(nn.Module):
    """Backbone + UPerNet / FPN decoder + classifier (+ auxiliary FCN head in training).

    Args:
        model: backbone name.
        num_classes: output classes (background included where the data set has one).
        decoder: ``'upernet'`` or ``'fpn'``.
        decoder_channels: decoder width (UPerNet papers: 512; smp's default 256).
        aux_head: add the auxiliary FCN head on the stride-16 map.
        aux_weight: its loss weight.
        ignore_index: label value excluded from the loss and the metrics.
        dropout: dropout before the classifier.
        backbone_kwargs: passed to ``timm.create_model``.
    Forward:
        (B, 3, H, W) -> logits (B, num_classes, H, W); in training with ``aux_head`` a dict
        ``{"out": logits, "aux": aux logits (B, num_classes, H, W)}``.
    """

    def __init__(
        self,
        model: str,
        num_classes: int,
        decoder: str = "upernet",
        pretrained: bool = False,
        decoder_channels: int = 256,
        aux_head: bool = True,
        aux_weight: float = 0.4,
        aux_channels: Optional[int] = None,
        ignore_index: int = 255,
        dropout: float = 0.1,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        # smp pulls in a lot at import time; only segmentation needs it
        from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        if decoder not in DECODERS:
            raise ValueError(f"Segmenter: decoder must be one of {DECODERS}, got {decoder!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.backbone = PyramidBackbone(model, pretrained, out_strides=(4, 8, 16, 32), **(backbone_kwargs or {}))
        chs = list(self.backbone.out_channels)
        smp_channels = [3, 0] + chs  # smp layout: strides 1, 2 (placeholders), then 4, 8, 16, 32
        if decoder == "upernet":
            self.decoder = UPerNetDecoder(encoder_channels=smp_channels, encoder_depth=5,
                                          decoder_channels=decoder_channels)
            dec_out = decoder_channels
        else:
            self.decoder = FPNDecoder(encoder_channels=smp_channels, encoder_depth=5,
                                      pyramid_channels=decoder_channels, segmentation_channels=decoder_channels,
                                      dropout=0.0, merge_policy="add")
            dec_out = self.decoder.out_channels
        self.head_drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dec_out, num_classes, 1)
        self.aux_head = FCNHead(chs[2], aux_channels or decoder_channels, num_classes) if aux_head else None

    @property
    def timm_model(self) -> nn.Module:
        return self.backbone.timm_model

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        feats = self.backbone(x)  # 4 maps, strides 4..32
        y = self.decoder([x, x] + list(feats))  # (B, D, H/4, W/4); the two leading slots are unused
        logits = F.interpolate(self.classifier(self.head_drop(y)), size=size, mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            aux = F.interpolate(self.aux_head(feats[2]), size=size, mode="bilinear", align_corners=False)
            return {"out": logits, "aux": aux}
        return logits

    def loss(self, output, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Cross-entropy of ``forward``'s output against (B, H, W) labels; returns named losses."""
        if isinstance(output, dict):
            losses = {"loss_seg": F.cross_entropy(output["out"], target, ignore_index=self.ignore_index)}
            losses["loss_aux"] = self.aux_weight * F.cross_entropy(output["aux"], target, ignore_index=self.ignore_index)
            return losses
        return {"loss_seg": F.cross_entropy(output, target, ignore_index=self.ignore_index)}
