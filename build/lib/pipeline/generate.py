"""Sampling from a trained language model: temperature, top-k and top-p, deterministic for a seed."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from pipeline.checkpoint import load_model
from pipeline.files import InputError


@torch.no_grad()
def sample(model: torch.nn.Module, ids: list[int], max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0,
           stop_id: int | None = None) -> list[int]:
    """Continue `ids` one token at a time; greedy when temperature is 0."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    context = model.cfg.context  # type: ignore[union-attr]
    out = list(ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([out[-context:]]))[0, -1].float()
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = -float("inf")
            probs = torch.softmax(logits, dim=-1)
            if top_p is not None and top_p < 1:
                # nucleus: keep the smallest set of tokens whose probability reaches top_p
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        if next_id == stop_id:
            break
        out.append(next_id)
    return out


def generate(checkpoint: Path, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = None, seed: int = 0) -> str:
    """Text continuing `prompt`, from a model directory holding its tokenizer.json."""
    tokenizer_file = checkpoint / "tokenizer.json"
    if not tokenizer_file.exists():
        raise InputError(f"{checkpoint}: no tokenizer.json beside the model")
    model, config = load_model(checkpoint)
    if not config["model"].get("causal", True):
        raise InputError(f"{checkpoint}: a masked-language model (encoder) does not generate text; "
                         "give a causal one (pretrain.objective: clm)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eot = config["eot_id"]
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eot]
    ids = sample(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_id=eot)
    return tokenizer.decode(ids)
