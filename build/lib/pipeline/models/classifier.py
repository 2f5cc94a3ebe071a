"""A sequence classifier: a pretrained language model's hidden states, pooled, then a linear head."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, n_classes: int, pooling: Literal["last", "mean"]) -> None:
        super().__init__()
        self.backbone, self.n_classes, self.pooling = backbone, n_classes, pooling
        width = backbone.wte.embedding_dim
        self.classifier = nn.Linear(width, n_classes)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled hidden states (B, width) of right-padded `ids`: the last real position (which has
        seen the whole text: causal models never look right, so padding changes nothing) or the mean
        over real positions (an encoder is told the lengths, so it never attends to padding)."""
        hidden = self.backbone.hidden_states(ids, lengths)
        if self.pooling == "last":
            return hidden[torch.arange(len(ids), device=ids.device), lengths - 1]
        mask = (torch.arange(ids.size(1), device=ids.device)[None, :] < lengths[:, None]).to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(ids, lengths))
