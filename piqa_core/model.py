"""The DN-PIQA dual-branch network (Sun et al., CVPRW 2024)."""

from __future__ import annotations

import timm
import torch
from torch import nn

from .config import ModelConfig


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """A headless timm backbone returning pooled features (timm 1.x: num_classes=0, head untouched)."""
    return timm.create_model(cfg.backbone, pretrained=False, num_classes=0, **cfg.backbone_kwargs)


class DualBranchPIQA(nn.Module):
    """Score = MLP(backbone(whole) ‖ backbone_face(face) ‖ aux).

    Inputs are normalised float batches (B, 3, H, W); ``aux`` is (B, aux_dim) or None when aux_dim is 0.
    Returns one score per row, shape (B,). The official module returns (B, 1); the values are the same.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.backbone_face = build_backbone(cfg)
        self.num_features = self.backbone.num_features
        in_dim = 2 * self.num_features + cfg.aux_dim
        self.head = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden_dim),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden_dim, 1),
        )

    def forward_features(
        self, whole: torch.Tensor, face: torch.Tensor, aux: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Concatenated (whole, face, aux) features in the head's dtype, shape (B, 2F + aux_dim)."""
        parts = [self.backbone(whole), self.backbone_face(face)]
        if self.cfg.aux_dim:
            if aux is None or aux.shape[-1] != self.cfg.aux_dim:
                got = None if aux is None else tuple(aux.shape)
                raise ValueError(f"aux features of width {self.cfg.aux_dim} required, got {got}")
            parts.append(aux)
        elif aux is not None and aux.numel():
            raise ValueError("this model takes no auxiliary features (aux_dim=0)")
        dtype = self.head[0].weight.dtype
        return torch.cat([p.to(dtype) for p in parts], dim=1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The MLP in its own dtype, also under autocast (bf16 would round LIQE features of 16-32 to
        steps of 0.125 and scores near 3 to 1/64; the head costs a few thousand FLOPs)."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.to(self.head[0].weight.dtype)
            if pre_logits:
                return self.head[:-1](features)
            return self.head(features).squeeze(-1)

    def forward(self, whole: torch.Tensor, face: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(whole, face, aux))

    def score_crops(self, whole: torch.Tensor, face: torch.Tensor, aux: torch.Tensor | None = None,
                    chunk: int | None = None) -> torch.Tensor:
        """Crops (B, K, 3, H, W) → (B,) mean over K, the official five-crop test protocol.

        The same aux row serves all K crops of an image (the official code tiles it, which is only
        right at batch 1; here each image keeps its own). ``chunk`` runs at most that many crops per
        backbone pass (same result: every layer is per-sample in eval mode); on CPUs small passes
        stay in cache and run faster per crop.
        """
        b, k = whole.shape[:2]
        whole, face = whole.flatten(0, 1), face.flatten(0, 1)
        flat_aux = None if aux is None else aux.repeat_interleave(k, dim=0)
        step = chunk or b * k
        feats = torch.cat([
            self.forward_features(whole[i:i + step], face[i:i + step],
                                  None if flat_aux is None else flat_aux[i:i + step])
            for i in range(0, b * k, step)
        ])
        return self.forward_head(feats).view(b, k).float().mean(dim=1)
