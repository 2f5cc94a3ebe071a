"""LSTM and GRU language models: the same interface as the GPT (ids in, logits out), as baselines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class RecurrentConfig:
    vocab_size: int
    cell: Literal["lstm", "gru"] = "lstm"
    context: int = 256
    n_layer: int = 2
    n_embd: int = 256
    dropout: float = 0.0


class RecurrentLM(nn.Module):
    def __init__(self, cfg: RecurrentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        rnn = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        self.rnn = rnn(cfg.n_embd, cfg.n_embd, cfg.n_layer, batch_first=True,
                       dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # weight tying, as in the GPT
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self.rnn(self.drop(self.wte(idx)))
        return self.drop(out)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_states(idx))

    def flops_per_token(self) -> float:
        """Training FLOPs per token, 6 per weight (each recurrent weight is used once per token)."""
        return 6.0 * sum(p.numel() for p in self.parameters())
