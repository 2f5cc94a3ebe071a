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


def mask_tokens(tokens: torch.Tensor, mask_id: int, special_ids: torch.Tensor, vocab_size: int, rate: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's dynamic masking: each non-special token is chosen with probability `rate`; a chosen
    token becomes the mask id (80%), a random non-special token (10%) or stays (10%). Returns the
    inputs and the targets (the original id where chosen, -100 elsewhere, which cross-entropy skips)."""
    draws = torch.rand(tokens.shape, generator=generator).to(tokens.device)
    action = torch.rand(tokens.shape, generator=generator).to(tokens.device)
    random_ids = torch.randint(0, vocab_size, tokens.shape, generator=generator).to(tokens.device)
    random_ids = torch.where(torch.isin(random_ids, special_ids), tokens, random_ids)
    chosen = (draws < rate) & ~torch.isin(tokens, special_ids)
    inputs = torch.where(chosen & (action < 0.8), mask_id, tokens)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, torch.where(chosen, tokens, -100)


def masked_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the masked positions only (the head runs on those alone), and the
    number of them predicted right."""
    chosen = targets != -100
    with autocast(device):
        logits = model(inputs, chosen)
    labels = targets[chosen]
    loss = F.cross_entropy(logits.float(), labels)
    return loss, (logits.argmax(-1) == labels).sum()


def masking_generator(*keys: int) -> torch.Generator:
    """A generator seeded by integer keys (seed, rank, step, ...): masks that a resumed run redraws."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


@torch.no_grad()
def masked_eval(model: nn.Module, windows: np.ndarray, batch_size: int, device: torch.device, mask_id: int,
                special_ids: torch.Tensor, rate: float, seed: int) -> tuple[float, float]:
    """Masked-token loss (nats) and accuracy over fixed windows (B, T + 1; the last column unused),
    with masks drawn from `seed`, so every validation of a run scores the same masked positions."""
    model.eval()
    generator = masking_generator(seed)
    total, right, count = 0.0, 0, 0
    for i in range(0, len(windows), batch_size):
        tokens = torch.from_numpy(windows[i : i + batch_size, :-1])
        inputs, targets = mask_tokens(tokens, mask_id, special_ids, model.cfg.vocab_size, rate, generator)
        chosen = int((targets != -100).sum())
        if chosen:
            loss, correct = masked_loss(model, inputs.to(device), targets.to(device), device)
            total, right, count = total + loss.item() * chosen, right + int(correct), count + chosen
    model.train()
    return total / max(count, 1), right / max(count, 1)


@torch.no_grad()
def pseudo_log_likelihood(model: nn.Module, windows: np.ndarray, mask_id: int, special_ids: torch.Tensor,
                          device: torch.device, batch_size: int = 64) -> tuple[float, int]:
    """Summed log-probability (nats) of every non-special token of each window with that token alone
    masked (Salazar et al. 2020), and the number of tokens scored: exp(-sum / count) is the
    pseudo-perplexity. A window of T tokens costs T forward passes."""
    model.eval()
    total, count = 0.0, 0
    for window in torch.from_numpy(windows[:, :-1]):
        positions = torch.nonzero(~torch.isin(window, special_ids)).flatten()
        for start in range(0, len(positions), batch_size):
            chosen = positions[start : start + batch_size]
            inputs = window.repeat(len(chosen), 1)
            inputs[torch.arange(len(chosen)), chosen] = mask_id
            only = torch.zeros_like(inputs, dtype=torch.bool)
            only[torch.arange(len(chosen)), chosen] = True
            with autocast(device):
                logits = model(inputs.to(device), only.to(device)).float()
            total += logits.log_softmax(-1).gather(1, window[chosen].to(device)[:, None]).sum().item()
            count += len(chosen)
    model.train()
    return total, count
