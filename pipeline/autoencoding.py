"""What the sentence models' training and evaluation share: batches, BART-style corruption, the VAE's
terms (closed-form KL, free bits, the IWAE bound, mutual information, active units), the WGAN-GP
penalty and greedy or sampled decoding. Sentences are int64 arrays of token ids, without specials."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.sentence import Denoiser, Memory, SentenceNet


@dataclass(frozen=True)
class Batch:
    """Sentences padded for the encoder (`ids`, `lengths`), and the decoder's inputs (`bos` + text)
    and targets (text + `eos`, -100 at padding)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor


def padded(sentences: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([max(len(s), 1) for s in sentences])
    ids = torch.full((len(sentences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, sentence in enumerate(sentences):
        ids[row, : len(sentence)] = torch.from_numpy(sentence)
    return ids, lengths


def make_batch(sentences: list[np.ndarray], eot_id: int, pad_id: int,
               encoder_input: list[np.ndarray] | None = None) -> Batch:
    """`encoder_input` (a corrupted copy, for the denoiser) replaces the sentences on the encoder side."""
    ids, lengths = padded(encoder_input if encoder_input is not None else sentences, pad_id)
    framed, _ = padded([np.concatenate([[eot_id], s, [eot_id]]) for s in sentences], pad_id)
    targets = framed[:, 1:].clone()
    real = torch.arange(targets.shape[1])[None] <= torch.tensor([len(s) for s in sentences])[:, None]
    return Batch(ids, lengths, framed[:, :-1], targets.masked_fill(~real, -100))


def corrupt(sentence: np.ndarray, rng: np.random.Generator, mask_id: int, mask_rate: float,
            delete_rate: float, infill_rate: float, span_mean: float = 3.0) -> np.ndarray:
    """BART's noise, token by token: a span of Poisson(`span_mean`) tokens replaced by one mask
    (`infill_rate`, a zero-length span inserts a mask), the token deleted (`delete_rate`) or masked
    (`mask_rate`). Never empty."""
    out: list[int] = []
    i = 0
    while i < len(sentence):
        draw = rng.random()
        if draw < infill_rate:
            out.append(mask_id)
            span = int(rng.poisson(span_mean))
            if span == 0:
                out.append(int(sentence[i]))
            i += max(span, 1)
        elif draw < infill_rate + delete_rate:
            i += 1
        elif draw < infill_rate + delete_rate + mask_rate:
            out.append(mask_id)
            i += 1
        else:
            out.append(int(sentence[i]))
            i += 1
    return np.array(out or [mask_id], dtype=np.int64)


def sentence_nll(model: SentenceNet, features: torch.Tensor, targets: torch.Tensor,
                 memory: Memory | None = None) -> torch.Tensor:
    """Negative log-likelihood (nats) of each sentence's targets: (B,); `memory` is the denoiser's. The
    output layer, most of the cost, runs on the real positions only, not the padding."""
    real = targets != -100
    if isinstance(model, Denoiser):
        assert memory is not None
        losses = -model.target_log_probs(features, targets, memory)
    else:
        losses = F.cross_entropy(model.logits(features[real]), targets[real], reduction="none")
    return torch.zeros(len(targets), device=losses.device).index_add(0, real.nonzero()[:, 0], losses)


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) per dimension, in closed form: (B, D)."""
    return 0.5 * (mean.pow(2) + log_var.exp() - log_var - 1)


def free_bits_kl(kl: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Kingma et al. 2016: each dimension's batch-mean KL counts at least `free_bits` nats, so the
    optimiser gains nothing by pushing a dimension below it (collapsing it)."""
    return kl.mean(0).clamp(min=free_bits).sum()


def log_normal(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_var)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean).pow(2) / log_var.exp()).sum(-1)


def reparameterized(mean: torch.Tensor, log_var: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    return mean + (0.5 * log_var).exp() * noise


@torch.no_grad()
def log_importance_weights(model: SentenceNet, batch: Batch, samples: int,
                           generator: torch.Generator) -> torch.Tensor:
    """log p(x | z_k) + log p(z_k) - log q(z_k | x) for z_k ~ q(z | x): (B, samples)."""
    mean, log_var = model.posterior(batch.ids, batch.lengths)
    weights = []
    for _ in range(samples):
        z = reparameterized(mean, log_var, generator)
        log_likelihood = -sentence_nll(model, model.decode(batch.inputs, latent=z)[0], batch.targets)
        prior = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        weights.append(log_likelihood + prior - log_normal(z, mean, log_var))
    return torch.stack(weights, dim=1)


def iwae_nll(log_weights: torch.Tensor) -> torch.Tensor:
    """-log p(x) by importance sampling (Burda et al. 2016): -(logsumexp_k w_k - log K), an upper bound
    that tightens with K; with K = 1 it is the negative ELBO of that sample."""
    return -(log_weights.logsumexp(1) - math.log(log_weights.shape[1]))


def mutual_information(mean: torch.Tensor, log_var: torch.Tensor, generator: torch.Generator) -> float:
    """I(x; z) under q (He et al. 2019): E_x E_q(z|x) log q(z|x) - E log q(z), the aggregate
    posterior q(z) estimated as the mean of q(z | x_j) over the given sentences, one z per sentence."""
    count, dims = mean.shape
    negative_entropy = (-0.5 * dims * math.log(2 * math.pi) - 0.5 * (1 + log_var).sum(-1)).mean()
    z = reparameterized(mean, log_var, generator)
    density = log_normal(z[:, None], mean[None], log_var[None])  # (each z, each x_j)
    log_aggregate = density.logsumexp(1) - math.log(count)
    return float(negative_entropy - log_aggregate.mean())


def active_units(mean: torch.Tensor, threshold: float = 0.01) -> int:
    """Dimensions whose posterior mean varies over the sentences: Cov_x E[z | x] > `threshold`."""
    return int((mean.var(0) > threshold).sum())


def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): (||grad critic(x)|| - 1)^2 at random interpolates x of real
    and generated codes."""
    share = torch.rand(len(real), 1, generator=generator).to(real.device)
    mixed = (share * real + (1 - share) * fake).requires_grad_(True)
    grads = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)[0]
    return (grads.norm(dim=-1) - 1).pow(2).mean()


@torch.no_grad()
def decode_tokens(model: SentenceNet, count: int, max_tokens: int, eot_id: int,
                  latent: torch.Tensor | None = None, memory: Memory | None = None,
                  generator: torch.Generator | None = None) -> list[np.ndarray]:
    """Sentences decoded one token at a time from `bos` until `eos` or `max_tokens`: greedy, or
    sampled at temperature 1 when a `generator` is given."""
    device = model.wte.weight.device
    inputs = torch.full((count, 1), eot_id, dtype=torch.long, device=device)
    state, tokens = None, []
    for _ in range(max_tokens + 1):
        features, state = model.decode(inputs, latent, memory, state)
        if generator is None:
            chosen = model.logits(features[:, -1:], memory)[:, 0].argmax(-1)
        else:
            probabilities = model.logits(features[:, -1:], memory)[:, 0].softmax(-1).cpu()
            chosen = torch.multinomial(probabilities, 1, generator=generator)[:, 0].to(device)
        tokens.append(chosen)
        inputs = chosen[:, None]
    out = torch.stack(tokens, 1).cpu().numpy()
    sentences = []
    for row in out:
        ends = np.flatnonzero(row == eot_id)
        sentences.append(row[: ends[0] if len(ends) else max_tokens].astype(np.int64))
    return sentences
