"""Sentence models (architectures only, no training logic), all GRUs over the project's tokens:
- `lm`: a language model (the baseline of the others' likelihoods);
- `ae`: an autoencoder, the sentence squeezed into a code on the unit sphere (as in ARAE);
- `vae`: a sentence VAE (Bowman et al. 2016), a diagonal Gaussian posterior, the sample fed to the
  decoder's first state and to every step;
- `dae` (`Denoiser`): a denoising sequence-to-sequence Transformer (Vaswani et al. 2017), its
  decoder's cross-attention over the encoder's states of the corrupted text (a GRU with Luong
  attention learnt to copy 10x slower here: ROUGE-L 0.27 after 500 batches), and optionally a
  pointer-generator output (See et al. 2017) that copies source tokens;
- `gan`: ARAE's generator and WGAN critic (Zhao et al. 2018), MLPs on the autoencoder's codes.

A sentence decodes from `bos` to `eos` (both the end-of-text id); padding is `pad_id`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SentenceKind = Literal["lm", "ae", "vae", "dae"]


@dataclass(frozen=True)
class SentenceConfig:
    kind: SentenceKind
    vocab_size: int
    n_embd: int = 128
    n_hidden: int = 256
    latent: int = 32  # the ae's code, the vae's z
    dropout: float = 0.0
    n_layer: int = 2  # dae: Transformer layers on each side, n_head heads, feed-forward n_hidden wide
    n_head: int = 4
    max_tokens: int = 64  # dae: positions
    pointer: bool = False  # dae: mix a copy distribution over the source tokens into the output


class Memory(NamedTuple):
    """What the denoiser's decoder reads: the encoder's states (B, S, n_embd), the source's padding
    (B, S, True at padding) and its token ids (B, S), the support of the copy distribution."""

    states: torch.Tensor
    padding: torch.Tensor
    ids: torch.Tensor


@dataclass(frozen=True)
class GanConfig:
    code: int  # the autoencoder's code size
    noise: int = 32
    n_hidden: int = 256


class SentenceModel(nn.Module):
    def __init__(self, cfg: SentenceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        latent_input = cfg.latent if cfg.kind == "vae" else 0
        self.decoder = nn.GRU(cfg.n_embd + latent_input, cfg.n_hidden, batch_first=True)
        self.out = nn.Linear(cfg.n_hidden, cfg.n_embd)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.kind != "lm":
            self.encoder = nn.GRU(cfg.n_embd, cfg.n_hidden, batch_first=True, bidirectional=True)
        if cfg.kind == "ae":
            self.to_code = nn.Linear(2 * cfg.n_hidden, cfg.latent)
        if cfg.kind == "vae":
            self.to_posterior = nn.Linear(2 * cfg.n_hidden, 2 * cfg.latent)
        if cfg.kind in ("ae", "vae"):
            self.to_state = nn.Linear(cfg.latent, cfg.n_hidden)
        nn.init.normal_(self.wte.weight, std=0.02)

    # ------------------------------------------------------------ encoder

    def encode_states(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position's state (B, S, 2H) and the final states of both directions (B, 2H)."""
        packed = nn.utils.rnn.pack_padded_sequence(self.drop(self.wte(ids)), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        states, final = self.encoder(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True, total_length=ids.shape[1])
        return states, torch.cat([final[0], final[1]], dim=-1)

    def code(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ae: the code on the unit sphere (the space ARAE's critic works in)."""
        return F.normalize(self.to_code(self.encode_states(ids, lengths)[1]), dim=-1)

    def posterior(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vae: mean and log-variance of q(z | x)."""
        mean, log_var = self.to_posterior(self.encode_states(ids, lengths)[1]).chunk(2, dim=-1)
        return mean, log_var

    # ------------------------------------------------------------ decoder

    def initial_state(self, latent: torch.Tensor | None, batch: int) -> torch.Tensor:
        if latent is None:
            return torch.zeros(1, batch, self.cfg.n_hidden, device=self.wte.weight.device)
        return torch.tanh(self.to_state(latent))[None]

    def decode(self, inputs: torch.Tensor, latent: torch.Tensor | None = None,
               memory: Memory | None = None,
               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Output features (B, T, n_embd; `logits` scores them) for inputs (B, T), and
        the last state; `latent` is the ae code or the vae z (`memory` is the Denoiser's)."""
        embedded = self.drop(self.wte(inputs))
        if self.cfg.kind == "vae":
            assert latent is not None
            embedded = torch.cat([embedded, latent[:, None].expand(-1, inputs.shape[1], -1)], dim=-1)
        if state is None:
            state = self.initial_state(latent, inputs.shape[0])
        hidden, state = self.decoder(embedded, state)
        return self.out(self.drop(hidden)), state

    def logits(self, features: torch.Tensor, memory: Memory | None = None) -> torch.Tensor:
        """Scores over the vocabulary: the output layer is the token embedding (tied, Press & Wolf 2017);
        `memory` is the denoiser's, unused here. (An adaptive softmax was 2x faster here but kept the
        denoiser from learning to copy.)"""
        return F.linear(features, self.wte.weight, self.out_bias)


class Denoiser(nn.Module):
    """dae: a Transformer encoder over the corrupted text, a causal decoder cross-attending to it; token
    and learned position embeddings, the output layer tied to the token embedding. Its `decode` takes
    and returns the inputs so far as its `state`, so it decodes token by token like the GRUs. With
    `pointer` its output is a pointer-generator's (See et al. 2017): log p(w) = log(g p_vocab(w) + (1 - g)
    sum of the attention on the source positions holding w), one attention head and the gate g read the
    decoder's features."""

    def __init__(self, cfg: SentenceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(2 * cfg.max_tokens + 2, cfg.n_embd)  # noise may insert masks; bos, eos
        layer = {"d_model": cfg.n_embd, "nhead": cfg.n_head, "dim_feedforward": cfg.n_hidden,
                 "dropout": cfg.dropout, "batch_first": True, "norm_first": True}
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), cfg.n_layer,
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), cfg.n_layer)
        self.norm = nn.LayerNorm(cfg.n_embd)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.pointer:
            self.copy_query = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
            self.copy_gate = nn.Linear(2 * cfg.n_embd, 1)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)

    def embedded(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))

    def encode_states(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position's state (B, S, n_embd), and their mean over the real positions (B, n_embd)."""
        padding = torch.arange(ids.shape[1], device=ids.device)[None] >= lengths.to(ids.device)[:, None]
        states = self.encoder(self.embedded(ids), src_key_padding_mask=padding)
        pooled = states.masked_fill(padding[..., None], 0).sum(1) / lengths.to(ids.device)[:, None]
        return states, pooled

    def memory(self, ids: torch.Tensor, lengths: torch.Tensor) -> Memory:
        """The encoded source (B, S), padded after `lengths`, as the decoder reads it."""
        padding = torch.arange(ids.shape[1], device=ids.device)[None] >= lengths.to(ids.device)[:, None]
        return Memory(self.encode_states(ids, lengths)[0], padding, ids)

    def decode(self, inputs: torch.Tensor, latent: torch.Tensor | None = None,
               memory: Memory | None = None,
               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of `inputs`' positions given `memory`; `state`, the inputs decoded before these, is
        prepended (recomputed: sentences are short)."""
        assert memory is not None
        everything = inputs if state is None else torch.cat([state, inputs], dim=1)
        causal = nn.Transformer.generate_square_subsequent_mask(everything.shape[1], device=inputs.device)
        hidden = self.decoder(self.embedded(everything), memory.states, tgt_mask=causal, tgt_is_causal=True,
                              memory_key_padding_mask=memory.padding)
        return self.norm(hidden[:, -inputs.shape[1]:]), everything

    def pointing(self, features: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        """The copy attention over the source positions (B, T, S) and the gate's logit (B, T)."""
        scores = self.copy_query(features) @ memory.states.transpose(1, 2) / math.sqrt(self.cfg.n_embd)
        attention = scores.masked_fill(memory.padding[:, None], float("-inf")).softmax(-1)
        gate = self.copy_gate(torch.cat([features, attention @ memory.states], dim=-1)).squeeze(-1)
        return attention, gate

    def logits(self, features: torch.Tensor, memory: Memory | None = None) -> torch.Tensor:
        """Scores over the vocabulary (B, T, vocab), their log_softmax log p: the tied output layer's;
        with `pointer`, log p itself, the generated and the copied mixed."""
        vocabulary = F.linear(features, self.wte.weight, self.out_bias)
        if not self.cfg.pointer:
            return vocabulary
        assert memory is not None
        attention, gate = self.pointing(features, memory)
        sources = memory.ids[:, None].expand(-1, features.shape[1], -1)
        copies = torch.zeros_like(vocabulary).scatter_add_(-1, sources, attention)
        return torch.logaddexp(F.logsigmoid(gate)[..., None] + vocabulary.log_softmax(-1),
                               F.logsigmoid(-gate)[..., None] + copies.clamp_min(1e-30).log())

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor, memory: Memory) -> torch.Tensor:
        """log p(target) at the real positions (targets != -100): (N,). With `pointer` only the targets'
        copy mass is summed, not the whole (B, T, vocab) mixture (3x faster to train)."""
        real = targets != -100
        vocabulary = -F.cross_entropy(F.linear(features[real], self.wte.weight, self.out_bias), targets[real],
                                      reduction="none")
        if not self.cfg.pointer:
            return vocabulary
        attention, gate = self.pointing(features, memory)
        copied = (attention * (memory.ids[:, None] == targets[..., None])).sum(-1)[real]
        return torch.logaddexp(F.logsigmoid(gate[real]) + vocabulary,
                               F.logsigmoid(-gate[real]) + copied.clamp_min(1e-30).log())


SentenceNet = SentenceModel | Denoiser


class LatentGan(nn.Module):
    """ARAE's generator (noise to a code on the unit sphere) and WGAN critic (code to a score)."""

    def __init__(self, cfg: GanConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.generator = nn.Sequential(
            nn.Linear(cfg.noise, cfg.n_hidden), nn.ReLU(), nn.Linear(cfg.n_hidden, cfg.n_hidden), nn.ReLU(),
            nn.Linear(cfg.n_hidden, cfg.code))
        self.critic = nn.Sequential(
            nn.Linear(cfg.code, cfg.n_hidden), nn.LeakyReLU(0.2), nn.Linear(cfg.n_hidden, cfg.n_hidden),
            nn.LeakyReLU(0.2), nn.Linear(cfg.n_hidden, 1))

    def generate(self, noise: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.generator(noise), dim=-1)

    def score(self, codes: torch.Tensor) -> torch.Tensor:
        return self.critic(codes).squeeze(-1)
