"""What the training loops share: the learning-rate schedule, weight-decay groups and precision."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def warmup_cosine(step: int, warmup: int, total: int, peak: float, floor: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from `peak` to `floor` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def decay_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 exempt_prefixes: tuple[str, ...], **group: Any) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; vectors (biases, norms) and `exempt_prefixes` (embeddings) do not."""
    decay, exempt = [], []
    for name, p in named:
        if p.requires_grad:
            (decay if p.dim() >= 2 and not name.startswith(exempt_prefixes) else exempt).append(p)
    return [{"params": decay, "weight_decay": weight_decay, **group},
            {"params": exempt, "weight_decay": 0.0, **group}]


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # bf16 on CPU is ~100x slower than fp32 here


def batch_loss(model: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean next-token cross-entropy of windows (B, T + 1): inputs [:, :-1], targets [:, 1:]."""
    with autocast(device):
        logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def mean_loss(model: nn.Module, windows: np.ndarray, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss (nats) over fixed windows; every target counted once."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[i : i + batch_size]).to(device)
        total += batch_loss(model, batch, device).item() * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    model.train()
    return total / count
