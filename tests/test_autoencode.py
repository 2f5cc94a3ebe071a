"""The autoencode stage: the VAE's terms against closed forms, the IWAE bound, the WGAN-GP penalty,
BART noise, exact resume on the tiny real project, and bad params."""

from __future__ import annotations

import copy
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import sentence_eval
from pipeline.autoencoding import (
    active_units,
    corrupt,
    gaussian_kl,
    gradient_penalty,
    iwae_nll,
    log_importance_weights,
    make_batch,
    reparameterized,
    sentence_nll,
)
from pipeline.config import ConfigError, parse_config
from pipeline.models.sentence import Denoiser, SentenceConfig, SentenceModel
from pipeline.report import sentence_models_section
from pipeline.stages import autoencode


class Interrupted(Exception):
    pass


def tiny_vae() -> tuple[SentenceModel, Any]:
    torch.manual_seed(0)
    model = SentenceModel(SentenceConfig("vae", 40, n_embd=8, n_hidden=12, latent=3)).eval()
    sentences = [np.array([5, 6, 7, 8]), np.array([9, 10]), np.array([11, 12, 13])]
    return model, make_batch(sentences, eot_id=0, pad_id=1)


def test_kl_term_equals_the_closed_form_on_a_fixed_input():
    mean = torch.tensor([[0.0, 1.0, -2.0]])
    log_var = torch.tensor([[0.0, 0.0, math.log(4.0)]])
    # 0.5 (mu^2 + sigma^2 - log sigma^2 - 1) per dimension, by hand
    expected = [0.0, 0.5, 0.5 * (4 + 4 - math.log(4) - 1)]
    assert gaussian_kl(mean, log_var)[0].tolist() == pytest.approx(expected, abs=1e-6)
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    assert torch.allclose(gaussian_kl(mean, log_var), torch.distributions.kl_divergence(q, p))


def test_iwae_with_one_sample_is_that_sample_s_elbo_and_more_samples_only_tighten_it():
    model, batch = tiny_vae()
    with torch.no_grad():
        weights = log_importance_weights(model, batch, 1, torch.Generator().manual_seed(3))
        mean, log_var = model.posterior(batch.ids, batch.lengths)
        z = reparameterized(mean, log_var, torch.Generator().manual_seed(3))  # the same draw
        log_probs = model.logits(model.decode(batch.inputs, latent=z)[0].flatten(0, 1)).log_softmax(-1)
        real = batch.targets.flatten() != -100
        picked = log_probs[real].gather(1, batch.targets.flatten()[real][:, None])[:, 0]
        rows = torch.arange(len(batch.targets)).repeat_interleave(batch.targets.shape[1])[real]
        log_likelihood = torch.zeros(3).index_add(0, rows, picked)
        q = torch.distributions.Normal(mean, (0.5 * log_var).exp()).log_prob(z).sum(-1)
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        elbo = log_likelihood - (q - prior)  # the single-sample ELBO
        assert torch.allclose(iwae_nll(weights), -elbo, atol=1e-5)
        many = log_importance_weights(model, batch, 64, torch.Generator().manual_seed(4))
    # log-mean-exp >= mean (Jensen), for the very same samples
    assert (iwae_nll(many) <= -many.mean(1) + 1e-6).all()
    assert (iwae_nll(many) < -many.mean(1)).any()


def test_the_pointer_generator_is_a_distribution_that_can_copy_and_its_training_loss_matches_it():
    torch.manual_seed(0)
    shape = SentenceConfig("dae", 40, n_embd=8, n_hidden=16, n_layer=1, n_head=2, pointer=True)
    model = Denoiser(shape).eval()
    sentences = [np.array([5, 6, 7, 8]), np.array([9, 10]), np.array([11, 12, 13])]
    noisy = [np.array([5, 3, 7, 8]), np.array([9, 10, 9]), np.array([3])]  # 3: the mask
    batch = make_batch(sentences, eot_id=0, pad_id=1, encoder_input=noisy)
    with torch.no_grad():
        memory = model.memory(batch.ids, batch.lengths)
        features = model.decode(batch.inputs, memory=memory)[0]
        log_probs = model.logits(features, memory)
        assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, batch.inputs.shape[1]), atol=1e-5)
        real = batch.targets != -100
        dense = -log_probs[real].gather(1, batch.targets[real][:, None])[:, 0]
        rows = real.nonzero()[:, 0]
        by_sentence = torch.zeros(3).index_add(0, rows, dense)
        assert torch.allclose(sentence_nll(model, features, batch.targets, memory), by_sentence, atol=1e-5)
        # a gate shut on generation leaves only the source's tokens, padding never among them
        model.copy_gate.bias.fill_(-50.0)
        only_copies = model.logits(features, memory).exp()
    sources = [{5, 3, 7, 8}, {9, 10}, {3}]
    for row, allowed in enumerate(sources):
        mass = only_copies[row][:, sorted(allowed)].sum(-1)
        assert torch.allclose(mass, torch.ones_like(mass), atol=1e-4)
        assert only_copies[row][:, 1].max() < 1e-6  # the pad id sits at the source's padding


def test_active_units_count_dimensions_whose_posterior_mean_varies():
    means = torch.zeros(100, 4)
    means[:, 1] = torch.linspace(-1, 1, 100)  # variance ~0.34
    means[:, 2] = torch.linspace(-0.1, 0.1, 100)  # variance ~0.003
    assert active_units(means) == 1


def test_the_gradient_penalty_is_taken_at_interpolates_of_real_and_fake():
    real, fake = torch.randn(16, 5), torch.randn(16, 5)

    class HalfSquare(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * x.pow(2).sum(-1, keepdim=True)  # its gradient at x is x

    penalty = gradient_penalty(HalfSquare(), real, fake, torch.Generator().manual_seed(7))
    share = torch.rand(16, 1, generator=torch.Generator().manual_seed(7))
    interpolates = share * real + (1 - share) * fake
    assert torch.allclose(penalty, (interpolates.norm(dim=-1) - 1).pow(2).mean())
    assert not torch.allclose(penalty, (real.norm(dim=-1) - 1).pow(2).mean())


def test_bart_noise_masks_at_the_rate_asked_and_never_empties_a_sentence():
    rng = np.random.default_rng(0)
    sentence = np.arange(10, 30)
    masked = [corrupt(sentence, rng, 99, 0.15, 0.0, 0.0) for _ in range(2000)]
    assert all(len(m) == 20 for m in masked)  # masking alone keeps every position
    assert np.mean([m == 99 for m in masked]) == pytest.approx(0.15, abs=0.01)
    assert all(len(corrupt(np.array([4]), rng, 99, 0.0, 1.0, 0.0)) == 1 for _ in range(20))
    spans = [corrupt(sentence, rng, 99, 0.0, 0.0, 0.2) for _ in range(500)]
    assert np.mean([len(s) for s in spans]) < 20  # spans of several tokens collapse into one mask


def stage_params(params: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    params = copy.deepcopy(params)
    params["autoencode"].update(dict(
        n_embd=8, n_hidden=16, code=6, latent=4, steps=6, gan_steps=4, critic_steps=2, batch_size=8,
        checkpoint_every=2, warmup_steps=2, kl_anneal_steps=3, eval_sentences=20, iwae_samples=3,
        samples=10, max_tokens=16, dropout=0.1), **overrides)
    return params


def run_stage(root: Path, params: dict[str, Any], out: Path) -> dict[str, Any]:
    glove = root / "glove" / "vectors.txt"  # absent: no GloVe probe
    return autoencode.run(parse_config(params), root / "clean", root / "tokenizer", glove, out / "models",
                          out / "checkpoints", out / "autoencode.json")


def test_a_killed_run_resumes_to_the_same_models_and_metrics(tiny_project, tmp_path, monkeypatch):
    root, params = tiny_project
    params = stage_params(params)
    unbroken = run_stage(root, params, tmp_path / "unbroken")
    assert set(unbroken) >= {"lm", "ae", "dae", "vae", "arae"}
    assert unbroken["vae"]["active_units"] >= 0 and unbroken["dae"]["rouge_l"] >= 0
    write_checkpoint = autoencode.write_checkpoint
    stops = {("vae", 4), ("arae", 2)}  # killed twice: mid-vae, then mid-gan

    def dying(checkpoints: Path, model: Any, optimizer: Any, progress: dict[str, Any], *rest: Any) -> None:
        write_checkpoint(checkpoints, model, optimizer, progress, *rest)
        if (checkpoints.name, progress["step"]) in stops:
            stops.discard((checkpoints.name, progress["step"]))
            raise Interrupted

    monkeypatch.setattr(autoencode, "write_checkpoint", dying)
    for _ in range(2):
        with pytest.raises(Interrupted):
            run_stage(root, params, tmp_path / "resumed")
    resumed = run_stage(root, params, tmp_path / "resumed")
    assert resumed == unbroken
    for kind in ("lm", "ae", "dae", "vae", "arae"):
        first = load_file(tmp_path / "unbroken" / "models" / kind / "model.safetensors")
        second = load_file(tmp_path / "resumed" / "models" / kind / "model.safetensors")
        assert all(torch.equal(first[k], second[k]) for k in first)
    examples = json.loads((tmp_path / "resumed" / "models" / "examples.json").read_text())
    section = sentence_models_section({"metrics": resumed, "examples": examples})
    assert 0 < resumed["dae"]["input_rouge_l"] <= 1
    for shown in ("sentence VAE", "ARAE", "denoiser output", "vae interpolation step", *examples["test"][:1],
                  "the masked input, copied (the denoiser's baseline)"):
        assert html.escape(shown) in section


@pytest.mark.parametrize(("key", "value", "named"), [
    ("latent", 0, "autoencode.latent"), ("models", ["lm", "gan"], "autoencode.models"),
    ("models", ["arae"], "autoencode"), ("min_tokens", 40, "autoencode"), ("n_head", 3, "autoencode"),
])
def test_bad_params_are_refused_in_one_line_naming_the_key(tiny_project, key, value, named):
    _, params = tiny_project
    params = copy.deepcopy(params)
    params["autoencode"][key] = value
    with pytest.raises(ConfigError) as error:
        parse_config(params)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_the_glove_probe_features_are_each_text_s_mean_known_word_vector(tmp_path):
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("good 1 0\nbad 0 1\n")
    texts = ["Good, good BAD!", "nothing known", "bad"]
    features = sentence_eval.glove_features(texts, vectors, r"[^\W\d_]+")
    assert np.allclose(features, [[2 / 3, 1 / 3], [0, 0], [0, 1]])
