"""Count-based baselines for the language model: add-one unigram and add-k bigram of the train split."""

from __future__ import annotations

import numpy as np

from pipeline.shards import TokenShards


def token_counts(shards: TokenShards, vocab_size: int) -> np.ndarray:
    return sum(np.bincount(a, minlength=vocab_size) for a in shards.arrays).astype(np.float64)


def unigram_bits_per_token(train: TokenShards, heldout: TokenShards, vocab_size: int) -> float:
    """Cross-entropy (bits per token) of the held-out tokens under add-one unigram counts of train."""
    counts = token_counts(train, vocab_size) + 1
    log_p = np.log2(counts / counts.sum())
    heldout_counts = token_counts(heldout, vocab_size)
    return float(-(heldout_counts * log_p).sum() / heldout_counts.sum())


def pair_keys(shards: TokenShards, vocab_size: int, first: int | None = None) -> np.ndarray:
    """previous * V + next for every adjacent pair of the split (across shard boundaries too), or of
    its `first` tokens only."""
    tokens = np.concatenate([a.astype(np.int64) for a in shards.arrays])[:first]
    return tokens[:-1] * vocab_size + tokens[1:]


def bigram_bits_per_token(train: TokenShards, heldout: TokenShards, vocab_size: int, k: float,
                          train_tokens: int | None = None) -> float:
    """Cross-entropy (bits per predicted token) of held-out pairs under add-k bigram counts of train
    (of its first `train_tokens` tokens, when given):
    p(next | prev) = (c(prev, next) + k) / (c(prev) + k V)."""
    train_keys = pair_keys(train, vocab_size, train_tokens)
    return float(-np.log2(add_k_bigram(train_keys, pair_keys(heldout, vocab_size), vocab_size, k)).mean())


def add_k_bigram(train_keys: np.ndarray, queries: np.ndarray, vocab_size: int, k: float) -> np.ndarray:
    """p(next | prev) = (c(prev, next) + k) / (c(prev) + k V) of each query pair (prev * V + next),
    counted over the train pairs."""
    keys, counts = np.unique(train_keys, return_counts=True)
    context_counts = np.bincount(keys // vocab_size, weights=counts, minlength=vocab_size)
    found = np.minimum(np.searchsorted(keys, queries), max(len(keys) - 1, 0))
    pair_count = np.where(keys[found] == queries, counts[found], 0) if len(keys) else np.zeros(len(queries))
    return (pair_count + k) / (context_counts[queries // vocab_size] + k * vocab_size)


def sentence_bigram_perplexity(train: list[np.ndarray], heldout: list[np.ndarray], vocab_size: int,
                               k: float, boundary: int) -> float:
    """Perplexity per predicted token of held-out sentences under an add-k bigram of train sentences,
    each sentence framed by `boundary` (its first token and its end are predicted too): the n-gram
    LM behind forward perplexity (real text scoring samples) and reverse (samples scoring real text)."""
    def keys(sentences: list[np.ndarray]) -> np.ndarray:
        framed = [np.concatenate([[boundary], s, [boundary]]).astype(np.int64) for s in sentences]
        pairs = [f[:-1] * vocab_size + f[1:] for f in framed]
        return np.concatenate(pairs) if pairs else np.empty(0, np.int64)

    return float(np.exp(-np.log(add_k_bigram(keys(train), keys(heldout), vocab_size, k)).mean()))
