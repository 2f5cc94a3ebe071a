"""What the training loops share: the learning-rate schedule, weight-decay groups and precision."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
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
