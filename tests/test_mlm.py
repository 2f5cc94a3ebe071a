"""Masked-language modelling: the masking rule, the encoder's attention both ways, and the scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, parse_config
from pipeline.models import SequenceClassifier, build_model
from pipeline.training import (
    mask_tokens,
    masked_eval,
    masking_generator,
    pseudo_log_likelihood,
)

ENCODER = {"arch": "gpt", "vocab_size": 300, "context": 32, "n_layer": 2, "n_head": 4, "n_embd": 32,
           "causal": False}
EOT, PAD, MASK = 0, 1, 2
SPECIALS = torch.tensor([EOT, PAD, MASK])


def test_masking_rates_follow_80_10_10_and_spare_specials() -> None:
    tokens = torch.randint(3, 300, (400, 250))
    tokens[:, ::10] = EOT  # document ends and padding must never be chosen
    tokens[:, 5::10] = PAD
    inputs, targets = mask_tokens(tokens, MASK, SPECIALS, 300, 0.15, masking_generator(7))
    chosen = targets != -100
    ordinary = ~torch.isin(tokens, SPECIALS)
    assert not chosen[~ordinary].any()
    assert torch.equal(inputs[~ordinary], tokens[~ordinary])
    assert chosen[ordinary].float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert torch.equal(targets[chosen], tokens[chosen])
    masked = (inputs == MASK) & chosen
    kept = (inputs == tokens) & chosen
    replaced = chosen & ~masked & ~kept
    n = chosen.sum().item()
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.01)
    # a random replacement can draw the same token (1 in 297): "kept" is slightly above 10%
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / 297, abs=0.01)
    assert replaced.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert not torch.isin(inputs[replaced], SPECIALS).any()
    assert not (inputs[~chosen] == MASK).any()


def test_masks_are_a_function_of_the_keys() -> None:
    tokens = torch.randint(3, 300, (8, 64))
    first = mask_tokens(tokens, MASK, SPECIALS, 300, 0.15, masking_generator(1, 0, 5, 0))
    again = mask_tokens(tokens, MASK, SPECIALS, 300, 0.15, masking_generator(1, 0, 5, 0))
    other = mask_tokens(tokens, MASK, SPECIALS, 300, 0.15, masking_generator(1, 0, 6, 0))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])


def test_encoder_attends_both_ways() -> None:
    torch.manual_seed(0)
    model = build_model(ENCODER).eval()
    x = torch.randint(3, 300, (2, 32))
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % 297 + 3
    with torch.no_grad():
        before, after = model.hidden_states(x), model.hidden_states(y)
    # a token's representation changes when a later token changes
    assert not torch.allclose(before[:, :20], after[:, :20], atol=1e-4)


def test_encoder_ignores_padding_when_told_the_lengths() -> None:
    torch.manual_seed(0)
    classifier = SequenceClassifier(build_model(ENCODER), 3, "mean").eval()
    ids = torch.randint(3, 300, (2, 20))
    lengths = torch.tensor([12, 20])
    padded = ids.clone()
    padded[0, 12:] = PAD
    other_padding = padded.clone()
    other_padding[0, 12:] = 7  # whatever stands past the length must not matter
    with torch.no_grad():
        assert torch.allclose(classifier(padded, lengths), classifier(other_padding, lengths), atol=1e-6)
        alone = classifier(ids[:1, :12], torch.tensor([12]))
        assert torch.allclose(classifier(padded, lengths)[:1], alone, atol=1e-5)


def test_masked_scores_of_an_untrained_encoder_are_near_chance() -> None:
    torch.manual_seed(0)
    model = build_model(ENCODER)
    windows = np.random.default_rng(0).integers(3, 300, (16, 33))
    loss, accuracy = masked_eval(model, windows, 8, torch.device("cpu"), MASK, SPECIALS, 0.15, seed=1)
    assert loss == pytest.approx(math.log(300), rel=0.1)
    assert accuracy < 0.15  # tied embeddings echo the 10% of chosen tokens left in place
    again = masked_eval(model, windows, 8, torch.device("cpu"), MASK, SPECIALS, 0.15, seed=1)
    assert again == (loss, accuracy)
    total, count = pseudo_log_likelihood(model, windows[:2], MASK, SPECIALS, torch.device("cpu"), 16)
    assert count == 64
    assert math.exp(-total / count) == pytest.approx(300, rel=0.25)


def test_mlm_with_a_recurrent_model_is_refused(tiny_project) -> None:
    _, params = tiny_project
    bad = {**params, "pretrain": {"objective": "mlm", "model": {"arch": "lstm"}}}
    with pytest.raises(ConfigError, match=r"objective mlm needs model\.arch gpt, not lstm"):
        parse_config(bad)
