"""The language models: causal, trainable, rebuildable from their config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import build_model, model_config

TINY = {"vocab_size": 300, "context": 32, "n_layer": 2, "n_embd": 32}
ARCHS = [
    {"arch": "gpt", "n_head": 4, "positions": "learned", **TINY},
    {"arch": "gpt", "n_head": 4, "positions": "rotary", **TINY},
    {"arch": "lstm", **TINY},
    {"arch": "gru", **TINY},
]


@pytest.mark.parametrize("config", ARCHS, ids=lambda c: f"{c['arch']}-{c.get('positions', '')}")
def test_future_tokens_never_change_past_logits(config: dict) -> None:
    torch.manual_seed(0)
    model = build_model(config).eval()
    x = torch.randint(0, 300, (2, 32))
    y = x.clone()
    y[:, 20:] = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :20], model(y)[:, :20], atol=1e-5)
        assert not torch.allclose(model(x)[:, 20:], model(y)[:, 20:])


@pytest.mark.parametrize("config", ARCHS, ids=lambda c: f"{c['arch']}-{c.get('positions', '')}")
def test_one_step_decreases_loss_on_a_fixed_batch(config: dict) -> None:
    torch.manual_seed(0)
    model = build_model(config)
    batch = torch.randint(0, 300, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    before = loss()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()


@pytest.mark.parametrize("config", ARCHS, ids=lambda c: f"{c['arch']}-{c.get('positions', '')}")
def test_config_round_trip_and_tied_head(config: dict) -> None:
    model = build_model(config)
    assert model_config(model) == {**model_config(build_model(model_config(model)))}
    assert model.head.weight is model.wte.weight
    assert model.flops_per_token() > 0


def test_unknown_arch_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown model arch 'transformer'"):
        build_model({"arch": "transformer", **TINY})
