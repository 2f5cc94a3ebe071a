"""A GPT decoder, or with `causal=False` a BERT-style encoder: token embedding, learned or rotary
positions, pre-norm blocks with self-attention (`scaled_dot_product_attention`, flash kernels on
CUDA), MLP, final norm and an output head tied to the embedding. The decoder attends left only; the
encoder attends both ways, to every real (non-padding) position. No training logic here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = False
    positions: Literal["learned", "rotary"] = "learned"
    rope_base: float = 10_000.0
    causal: bool = True  # False: a bidirectional encoder (masked-language modelling)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no `bias=False` before 2.1 on all paths)."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def rotary_tables(head_dim: int, context: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotate each (even, odd) pair of a head's channels by a position-dependent angle.
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[: x.size(-2)], sin[: x.size(-2)]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.causal = cfg.causal
        self.rotary = cfg.positions == "rotary"
        if self.rotary:
            cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.context, cfg.rope_base)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """`allowed`: (B, 1, 1, T) bool, the keys each sequence may attend to (encoder padding)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rotary:
            q, k = apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, allowed, dropout, is_causal=self.causal)
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = SelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.context, cfg.n_embd) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, n_embd): what a classification head reads. `lengths` of
        right-padded rows keep an encoder from attending to padding (a decoder never looks right)."""
        T = idx.size(1)
        assert self.cfg.context >= T, f"sequence of {T} tokens exceeds the context {self.cfg.context}"
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        allowed = None
        if lengths is not None and not self.cfg.causal:
            allowed = (torch.arange(T, device=idx.device)[None, :] < lengths[:, None])[:, None, None, :]
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, only: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for every position, or (N, vocab) for the N positions where the bool
        mask `only` is set (masked-language modelling scores the masked positions alone)."""
        hidden = self.hidden_states(idx)
        return self.head(hidden if only is None else hidden[only])

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus attention's 12·L·d·T (PaLM appendix B)."""
        n = sum(p.numel() for p in self.parameters())
        if self.wpe is not None:
            n -= self.wpe.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * self.cfg.context
