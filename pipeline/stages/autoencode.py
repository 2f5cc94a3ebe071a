"""Autoencode stage: sentence autoencoders, a sentence VAE, a latent-space GAN and a denoising
seq2seq with attention, each measured on the test split beside a GRU language model of the same size.

Sentences: the labeled set's texts whole and the corpus pages cut after `.`, `!` or `?` and at line
breaks, encoded with the project's tokenizer, kept when `min_tokens`..`max_tokens` long; train
sentences train, `eval_sentences` test sentences (a fixed draw) are scored.

Models (`autoencode.models`, `pipeline.models.sentence`): GRUs `lm`, `ae` (the code on the unit
sphere) and `vae` (KL annealing, free bits, optional word dropout); `dae`, a Transformer with a
pointer-generator output, trained on BART's noise (masking, deletion, span infilling) and scored from
test text with `eval_mask_rate` of its tokens masked; `arae`, a WGAN-GP generator and critic on the
trained ae's codes. Each trains `steps` batches drawn from (seed, model, step) with AdamW, warmup and
cosine decay, checkpointed every `checkpoint_every` steps under
`paths.autoencode_checkpoints/<model>/`, so a killed run resumes to the same weights.

Metrics (`metrics/autoencode.json`, `<model>.<metric>`): `nll` (nats per sentence) and `ppl` (per
token, the end included) of lm and vae (the vae's by importance sampling with `iwae_samples`), the
vae's `elbo`, `kl`, `mutual_information` and `active_units`; `token_accuracy`, `rouge_l` and `bleu` of
greedy reconstructions (ae, vae from the posterior mean, dae from masked text), beside the dae's
baseline `input_rouge_l` (the masked text itself, masks left out); `forward_ppl` and
`reverse_ppl` of `samples` generated sentences (lm sampled; vae from the prior, ae from a Gaussian
fitted to its train codes, arae from its generator, all decoded greedily) under an add-k bigram;
`probe_f1`: test macro-F1 of a logistic regression of the labels on ae codes or vae means, and
(`glove.probe_f1`) on the labeled texts' mean GloVe word vector (`paths.glove`, when present).
Outputs (`paths.autoencode/`): `<model>/` (safetensors + config.json), `examples.json`
(reconstructions, samples, an interpolation between two test sentences).
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.autoencoding import (
    corrupt,
    free_bits_kl,
    gaussian_kl,
    gradient_penalty,
    make_batch,
    reparameterized,
    sentence_nll,
)
from pipeline.checkpoint import Fingerprint, fingerprint_of, restore, save_model, write_checkpoint
from pipeline.config import Config, project_root
from pipeline.configfamilies import Autoencode
from pipeline.files import InputError, atomic_dir, write_json
from pipeline.models.sentence import (
    Denoiser,
    GanConfig,
    LatentGan,
    SentenceConfig,
    SentenceModel,
    SentenceNet,
)
from pipeline.progress import Progress
from pipeline.sentence_eval import Sentences, Text, encoded, probe, score_models, split_rows
from pipeline.sourcecode import code_digest
from pipeline.stagecli import stage_main
from pipeline.training import decay_groups, masking_generator, warmup_cosine

SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
EVAL_ONLY = {"models", "eval_sentences", "iwae_samples", "samples", "ngram_k", "eval_mask_rate", "resume",
             "checkpoint_every"}
LossOf = Callable[[SentenceNet, Sentences, np.random.Generator, int], tuple[torch.Tensor, dict[str, float]]]


# ---------------------------------------------------------------- data


def split_sentences(clean_dir: Path, split: str, text: Text, cfg: Autoencode) -> Sentences:
    pages = split_rows(clean_dir / "corpus.parquet", split, ["text"])["text"]
    texts = [s for page in pages for s in SENTENCE_BREAK.split(page) if s.strip()]
    texts += split_rows(clean_dir / "labeled.parquet", split, ["text"])["text"]
    return [s for s in text.encode(texts) if cfg.min_tokens <= len(s) <= cfg.max_tokens]


# ---------------------------------------------------------------- training


def model_of(kind: str, cfg: Autoencode, vocab_size: int) -> SentenceNet:
    size = cfg.code if kind == "ae" else cfg.latent
    shape = SentenceConfig(kind, vocab_size, cfg.n_embd, cfg.n_hidden, size, cfg.dropout,  # type: ignore[arg-type]
                           cfg.n_layer, cfg.n_head, cfg.max_tokens, cfg.pointer)
    return Denoiser(shape) if kind == "dae" else SentenceModel(shape)


def loss_function(kind: str, cfg: Autoencode, text: Text) -> LossOf:
    """The training loss of one batch (per target token) and the figures the progress line shows."""
    def loss_of(model: SentenceNet, sentences: Sentences, rng: np.random.Generator,
                step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if kind == "dae":
            noisy = [corrupt(s, rng, text.mask_id, cfg.mask_rate, cfg.delete_rate, cfg.infill_rate)
                     for s in sentences]
            batch = make_batch(sentences, text.eot_id, text.pad_id, noisy)
        else:
            batch = make_batch(sentences, text.eot_id, text.pad_id)
        tokens = int((batch.targets != -100).sum())
        if kind != "vae":
            memory = model.memory(batch.ids, batch.lengths) if isinstance(model, Denoiser) else None
            if kind == "lm":
                features = model.decode(batch.inputs)[0]
            elif kind == "ae":
                features = model.decode(batch.inputs, latent=model.code(batch.ids, batch.lengths))[0]
            else:
                features = model.decode(batch.inputs, memory=memory)[0]
            return sentence_nll(model, features, batch.targets, memory).sum() / tokens, {}
        mean, log_var = model.posterior(batch.ids, batch.lengths)
        z = reparameterized(mean, log_var, masking_generator(cfg.seed, step))
        dropped = torch.from_numpy(rng.random(batch.inputs.shape) < cfg.word_dropout)
        dropped[:, 0] = False  # the start token stays
        inputs = batch.inputs.masked_fill(dropped, text.mask_id)
        reconstruction = sentence_nll(model, model.decode(inputs, latent=z)[0], batch.targets).sum()
        kl = gaussian_kl(mean, log_var)
        weight = min(1.0, step / cfg.kl_anneal_steps) if cfg.kl_anneal_steps else 1.0
        loss = (reconstruction + weight * len(sentences) * free_bits_kl(kl, cfg.free_bits)) / tokens
        return loss, {"kl": float(kl.detach().sum(1).mean())}
    return loss_of


def fingerprint(cfg: Autoencode, name: str, data_digest: str) -> Fingerprint:
    """What a checkpoint must match to be resumed: the params that train (and the model's name), the
    data and the code."""
    return fingerprint_of(params=[cfg.model_dump(exclude=EVAL_ONLY), name], data=data_digest,
                          code=code_digest("pipeline.stages.autoencode"))


def train(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int,
          one_step: Callable[[int], tuple[float, dict[str, float]]], cfg: Autoencode, checkpoints: Path,
          data_digest: str) -> dict[str, Any]:
    """`steps` calls of `one_step(step)` (which updates the model), checkpointed for exact resume."""
    fresh: dict[str, Any] = {"step": 0, "curve": []}
    run_fingerprint = fingerprint(cfg, name, data_digest)
    progress = restore(checkpoints, run_fingerprint, model, optimizer, fresh, f"autoencode {name}") \
        if cfg.resume == "auto" else fresh
    with Progress(f"autoencode {name}", steps, "step", progress["step"]) as bar:
        while progress["step"] < steps:
            loss, figures = one_step(progress["step"])
            progress["step"] += 1
            progress["curve"].append((progress["step"], loss))
            bar.update(1, loss=loss, **figures)
            if progress["step"] % cfg.checkpoint_every == 0 or progress["step"] == steps:
                write_checkpoint(checkpoints, model, optimizer, progress, run_fingerprint)
    return progress


def train_sentence_model(kind: str, index: int, sentences: Sentences, text: Text, cfg: Autoencode,
                         checkpoints: Path, data_digest: str) -> SentenceNet:
    torch.manual_seed(cfg.seed + index)
    model = model_of(kind, cfg, text.vocab_size)
    optimizer = torch.optim.AdamW(decay_groups(model.named_parameters(), cfg.weight_decay, ("wte.",)),
                                  lr=cfg.learning_rate)
    loss_of = loss_function(kind, cfg, text)

    def one_step(step: int) -> tuple[float, dict[str, float]]:
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.learning_rate,
                                        cfg.learning_rate * cfg.min_lr_ratio)
        rng = np.random.default_rng([cfg.seed, index, step])
        batch = [sentences[i] for i in rng.integers(0, len(sentences), cfg.batch_size)]
        loss, figures = loss_of(model, batch, rng, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        return loss.item(), figures

    train(kind, model, optimizer, cfg.steps, one_step, cfg, checkpoints / kind, data_digest)
    return model.eval()


def train_gan(codes: torch.Tensor, cfg: Autoencode, checkpoints: Path, data_digest: str) -> LatentGan:
    """ARAE's latent GAN: `critic_steps` WGAN-GP critic updates per generator update, on the codes."""
    torch.manual_seed(cfg.seed)
    gan = LatentGan(GanConfig(codes.shape[1], cfg.noise, cfg.n_hidden))
    # one Adam: a module whose gradients are None in a phase is left alone by that phase's step
    optimizer = torch.optim.Adam(gan.parameters(), lr=cfg.gan_learning_rate, betas=(0.5, 0.9))

    def one_step(step: int) -> tuple[float, dict[str, float]]:
        generator = masking_generator(cfg.seed, 99, step)
        for _ in range(cfg.critic_steps):
            real = codes[torch.randint(0, len(codes), (cfg.batch_size,), generator=generator)]
            fake = gan.generate(torch.randn(cfg.batch_size, cfg.noise, generator=generator)).detach()
            critic_loss = gan.score(fake).mean() - gan.score(real).mean()
            penalty = gradient_penalty(gan.critic, real, fake, generator)
            optimizer.zero_grad(set_to_none=True)
            (critic_loss + cfg.gradient_penalty * penalty).backward()
            optimizer.step()
        noise = torch.randn(cfg.batch_size, cfg.noise, generator=generator)
        generator_loss = -gan.score(gan.generate(noise)).mean()
        optimizer.zero_grad(set_to_none=True)
        generator_loss.backward()
        for p in gan.critic.parameters():
            p.grad = None
        optimizer.step()
        return -critic_loss.item(), {"penalty": penalty.item()}

    train("arae", gan, optimizer, cfg.gan_steps, one_step, cfg, checkpoints / "arae", data_digest)
    return gan.eval()


# ---------------------------------------------------------------- the stage


def run(cfg: Config, clean_dir: Path, tokenizer_dir: Path, glove_path: Path, out_dir: Path, checkpoints: Path,
        metrics_path: Path) -> dict[str, Any]:
    a = cfg.autoencode
    torch.set_num_threads(torch.get_num_threads())
    text = Text(tokenizer_dir, cfg)
    train_sentences = split_sentences(clean_dir, "train", text, a)
    test_sentences = split_sentences(clean_dir, "test", text, a)
    if not train_sentences or not test_sentences:
        raise InputError(f"{clean_dir}: no train or test sentence of {a.min_tokens}..{a.max_tokens} tokens")
    chosen = np.random.default_rng(a.seed).permutation(len(test_sentences))[: a.eval_sentences]
    test = [test_sentences[i] for i in chosen]
    data_digest = hashlib.sha256(np.concatenate(train_sentences).tobytes()).hexdigest()
    models = {kind: train_sentence_model(kind, index, train_sentences, text, a, checkpoints, data_digest)
              for index, kind in enumerate(("lm", "ae", "dae", "vae")) if kind in a.models}
    gan = None
    if "arae" in a.models:
        gan = train_gan(encoded(models["ae"].code, train_sentences, text), a, checkpoints, data_digest)
    metrics, examples = score_models(models, gan, train_sentences, test, text, a)
    for kind, f1 in probe(models, clean_dir, glove_path, cfg.words.pattern, text, a).items():
        metrics.setdefault(kind, {})["probe_f1"] = f1
    with atomic_dir(out_dir) as tmp:
        for kind, model in models.items():
            save_model(tmp / kind, model)
        if gan is not None:
            save_model(tmp / "arae", gan)
        write_json(tmp / "examples.json", examples)
    write_json(metrics_path, metrics)
    return metrics


def execute(cfg: Config) -> str:
    from pipeline import tracking

    root = project_root()
    clean_dir, tokenizer_dir = root / cfg.paths.clean, root / cfg.paths.tokenizer
    glove_path, out_dir = root / cfg.paths.glove / "vectors.txt", root / cfg.paths.autoencode
    inputs = {"clean": clean_dir, "tokenizer": tokenizer_dir, "glove": glove_path}
    with tracking.stage_run("autoencode", cfg.tracking, cfg.autoencode.model_dump(), inputs,
                            {"autoencode": out_dir}) as run_log:
        metrics = run(cfg, clean_dir, tokenizer_dir, glove_path, out_dir,
                      root / cfg.paths.autoencode_checkpoints, root / cfg.paths.metrics / "autoencode.json")
        run_log.log_metrics(tracking.numeric_leaves(metrics))
    shown = {"vae kl": ("vae", "kl"), "dae rouge-l": ("dae", "rouge_l"),
             "arae reverse ppl": ("arae", "reverse_ppl")}
    figures = [f"{label} {metrics[m][k]}" for label, (m, k) in shown.items() if k in metrics.get(m, {})]
    return f"autoencode: {', '.join(cfg.autoencode.models)}; {', '.join(figures)} -> {out_dir}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("autoencode", __doc__, execute, argv)


if __name__ == "__main__":
    sys.exit(main())
