"""Autoencode stage: sentence autoencoders, a sentence VAE, a latent-space GAN and a denoising
seq2seq with attention, each measured on the test split beside a GRU language model of the same size.

Sentences: the labeled set's texts whole and the corpus pages cut after `.`, `!` or `?` and at line
breaks, encoded with the project's tokenizer, kept when `min_tokens`..`max_tokens` long; train
sentences train, `eval_sentences` test sentences (a fixed draw) are scored.

Models (`autoencode.models`, GRUs of `pipeline.models.sentence`): `lm`; `ae`, the code on the unit
sphere; `dae`, trained on BART's noise (masking, deletion, span infilling), scored from test text
with `eval_mask_rate` of its tokens masked; `vae`, with KL annealing, word dropout and free bits;
`arae`, a WGAN-GP generator and critic on the trained ae's codes. Each trains `steps` batches drawn
from (seed, model, step) with AdamW, warmup and cosine decay, checkpointed every `checkpoint_every`
steps under `paths.autoencode_checkpoints/<model>/`, so a killed run resumes to the same weights.

Metrics (`metrics/autoencode.json`, `<model>.<metric>`): `nll` (nats per sentence) and `ppl` (per
token, the end included) of lm and vae (the vae's by importance sampling with `iwae_samples`), the
vae's `elbo`, `kl`, `mutual_information` and `active_units`; `token_accuracy`, `rouge_l` and `bleu` of
greedy reconstructions (ae, vae from the posterior mean, dae from masked text); `forward_ppl` and
`reverse_ppl` of `samples` generated sentences (lm sampled; vae from the prior, ae from a Gaussian
fitted to its train codes, arae from its generator, all decoded greedily) under an add-k bigram;
`probe_f1`: test macro-F1 of a logistic regression of the labels on ae codes or vae means, and
(`glove.probe_f1`) on the labeled texts' mean GloVe word vector (`paths.glove`, when present).
Outputs (`paths.autoencode/`): `<model>/` (safetensors + config.json), `examples.json`
(reconstructions, samples, an interpolation between two test sentences).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer

from pipeline.autoencoding import (
    active_units,
    corrupt,
    decode_tokens,
    free_bits_kl,
    gaussian_kl,
    gradient_penalty,
    iwae_nll,
    log_importance_weights,
    make_batch,
    mutual_information,
    reparameterized,
    sentence_nll,
)
from pipeline.checkpoint import restore, save_model, write_checkpoint
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
from pipeline.ngram import sentence_bigram_perplexity
from pipeline.progress import Progress
from pipeline.stagecli import stage_main
from pipeline.training import decay_groups, masking_generator, warmup_cosine
from pipeline.vectors import read_text_vectors

SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
EVAL_ONLY = {"models", "eval_sentences", "iwae_samples", "samples", "ngram_k", "eval_mask_rate", "resume",
             "checkpoint_every"}
Sentences = list[np.ndarray]
LossOf = Callable[[SentenceNet, Sentences, np.random.Generator, int], tuple[torch.Tensor, dict[str, float]]]


# ---------------------------------------------------------------- data


class Text:
    """The tokenizer with the special ids the models use."""

    def __init__(self, tokenizer_dir: Path, cfg: Config) -> None:
        path = tokenizer_dir / "tokenizer.json"
        if not path.exists():
            raise InputError(f"{path}: tokenizer not found (run the tokenize stage)")
        self.tokenizer = Tokenizer.from_file(str(path))
        ids = [self.tokenizer.token_to_id(t) for t in (cfg.tokenize.eot_token, cfg.tokenize.pad_token,
                                                         cfg.tokenize.mask_token)]
        if None in ids:
            raise InputError(f"{path}: lacks the end-of-text, padding or mask token (tokenize.*_token)")
        self.eot_id, self.pad_id, self.mask_id = (int(i) for i in ids)  # type: ignore[arg-type]
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str]) -> Sentences:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, sentence: np.ndarray) -> str:
        return self.tokenizer.decode(sentence.tolist())


def split_rows(table: Path, split: str, columns: list[str]) -> dict[str, list[Any]]:
    if not table.exists():
        raise InputError(f"{table}: clean output not found (run the clean stages)")
    rows = pq.read_table(table, columns=[*columns, "split"]).to_pydict()
    keep = [i for i, s in enumerate(rows["split"]) if s == split]
    return {c: [rows[c][i] for i in keep] for c in columns}


def split_sentences(clean_dir: Path, split: str, text: Text, cfg: Autoencode) -> Sentences:
    pages = split_rows(clean_dir / "corpus.parquet", split, ["text"])["text"]
    texts = [s for page in pages for s in SENTENCE_BREAK.split(page) if s.strip()]
    texts += split_rows(clean_dir / "labeled.parquet", split, ["text"])["text"]
    return [s for s in text.encode(texts) if cfg.min_tokens <= len(s) <= cfg.max_tokens]


# ---------------------------------------------------------------- training


def model_of(kind: str, cfg: Autoencode, vocab_size: int) -> SentenceNet:
    size = cfg.code if kind == "ae" else cfg.latent
    shape = SentenceConfig(kind, vocab_size, cfg.n_embd, cfg.n_hidden, size, cfg.dropout,  # type: ignore[arg-type]
                           cfg.n_layer, cfg.n_head, cfg.max_tokens)
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
            if kind == "lm":
                features = model.decode(batch.inputs)[0]
            elif kind == "ae":
                features = model.decode(batch.inputs, latent=model.code(batch.ids, batch.lengths))[0]
            else:
                states, _ = model.encode_states(batch.ids, batch.lengths)
                features = model.decode(batch.inputs, memory=(states, batch.ids == text.pad_id))[0]
            return sentence_nll(model, features, batch.targets).sum() / tokens, {}
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


def fingerprint(cfg: Autoencode, name: str, data_digest: str) -> str:
    params = cfg.model_dump(exclude=EVAL_ONLY)
    return hashlib.sha256(json.dumps([params, name, data_digest], sort_keys=True).encode()).hexdigest()


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


# ---------------------------------------------------------------- evaluation (pipeline.sentence_eval)


def batches(sentences: Sentences, text: Text, size: int = 256) -> list[Any]:
    return [make_batch(sentences[i : i + size], text.eot_id, text.pad_id)
            for i in range(0, len(sentences), size)]


@torch.no_grad()
def encoded(encode: Callable[..., Any], sentences: Sentences, text: Text) -> torch.Tensor:
    """The ae codes (or vae means) of sentences, in batches."""
    outs = [encode(b.ids, b.lengths) for b in batches(sentences, text)]
    return torch.cat([o[0] if isinstance(o, tuple) else o for o in outs])


def reconstruction_scores(references: Sentences, outputs: Sentences, text: Text) -> dict[str, float]:
    """Position-wise token accuracy, ROUGE-L F1 (rouge-score) and corpus BLEU (sacrebleu) of outputs."""
    import sacrebleu
    from rouge_score import rouge_scorer

    right = sum(int((o[: len(r)] == r[: len(o)]).sum()) for r, o in zip(references, outputs, strict=True))
    total = sum(len(r) for r in references)
    refs, hyps = [text.decode(r) for r in references], [text.decode(o) for o in outputs]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = np.mean([scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps, strict=True)])
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score / 100
    return {"token_accuracy": round(right / total, 4), "rouge_l": round(float(rouge), 4),
            "bleu": round(float(bleu), 4)}


def decoded(model: SentenceModel, latent: torch.Tensor, cfg: Autoencode, text: Text) -> Sentences:
    return [s for i in range(0, len(latent), 256)
            for s in decode_tokens(model, len(latent[i : i + 256]), cfg.max_tokens, text.eot_id,
                                   latent=latent[i : i + 256])]


@torch.no_grad()
def score_models(models: dict[str, SentenceNet], gan: LatentGan | None, train_sentences: Sentences,
                 test: Sentences, text: Text, cfg: Autoencode) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics of every trained model on the test sentences, and the report's examples."""
    metrics: dict[str, Any] = {"sentences": {"train": len(train_sentences), "test_scored": len(test)}}
    examples: dict[str, Any] = {"test": [text.decode(s) for s in test[:5]]}
    tokens = sum(len(s) + 1 for s in test)  # the end of each sentence is predicted too
    generator = masking_generator(cfg.seed, 7)
    samples: dict[str, Sentences] = {}
    if "lm" in models:
        nll = sum(float(sentence_nll(models["lm"], models["lm"].decode(b.inputs)[0], b.targets).sum())
                  for b in batches(test, text))
        metrics["lm"] = {"nll": round(nll / len(test), 4), "ppl": round(float(np.exp(nll / tokens)), 3)}
        samples["lm"] = decode_tokens(models["lm"], cfg.samples, cfg.max_tokens, text.eot_id,
                                      generator=generator)
    if "ae" in models:
        codes = encoded(models["ae"].code, test, text)
        outputs = decoded(models["ae"], codes, cfg, text)
        metrics["ae"] = reconstruction_scores(test, outputs, text)
        examples["ae"] = [text.decode(s) for s in outputs[:5]]
        train_codes = encoded(models["ae"].code, train_sentences[:20000], text)
        spread = torch.linalg.cholesky(torch.cov(train_codes.T) + 1e-5 * torch.eye(train_codes.shape[1]))
        noise = torch.randn(cfg.samples, train_codes.shape[1], generator=generator)
        fitted = train_codes.mean(0) + noise @ spread.T
        samples["ae"] = decoded(models["ae"], torch.nn.functional.normalize(fitted, dim=-1), cfg, text)
        if gan is not None:
            samples["arae"] = decoded(models["ae"], gan.generate(torch.randn(cfg.samples, cfg.noise,
                                                                             generator=generator)), cfg, text)
            metrics["arae"] = {}
        examples["ae_interpolation"] = interpolation(models["ae"], codes[:2], cfg, text, on_sphere=True)
    if "dae" in models:
        rng = np.random.default_rng([cfg.seed, 11])
        noisy = [corrupt(s, rng, text.mask_id, cfg.eval_mask_rate, 0.0, 0.0) for s in test]
        outputs = []
        for i in range(0, len(test), 256):
            batch = make_batch(test[i : i + 256], text.eot_id, text.pad_id, noisy[i : i + 256])
            states, _ = models["dae"].encode_states(batch.ids, batch.lengths)
            outputs += decode_tokens(models["dae"], len(states), cfg.max_tokens, text.eot_id,
                                     memory=(states, batch.ids == text.pad_id))
        metrics["dae"] = reconstruction_scores(test, outputs, text)
        examples["dae"] = [{"input": text.decode(n), "output": text.decode(o)}
                           for n, o in zip(noisy[:5], outputs[:5], strict=True)]
    if "vae" in models:
        metrics["vae"], examples["vae"] = vae_scores(models["vae"], test, tokens, text, cfg, generator)
        prior = torch.randn(cfg.samples, cfg.latent, generator=generator)
        samples["vae"] = decoded(models["vae"], prior, cfg, text)
        means = encoded(models["vae"].posterior, test[:2], text)
        examples["vae_interpolation"] = interpolation(models["vae"], means, cfg, text, on_sphere=False)
    for name, generated in samples.items():
        metrics[name]["forward_ppl"] = round(sentence_bigram_perplexity(
            train_sentences, generated, text.vocab_size, cfg.ngram_k, text.eot_id), 2)
        metrics[name]["reverse_ppl"] = round(sentence_bigram_perplexity(
            generated, test, text.vocab_size, cfg.ngram_k, text.eot_id), 2)
        examples.setdefault("samples", {})[name] = [text.decode(s) for s in generated[:5]]
    return metrics, examples


def vae_scores(model: SentenceModel, test: Sentences, tokens: int, text: Text, cfg: Autoencode,
               generator: torch.Generator) -> tuple[dict[str, Any], list[str]]:
    means, log_vars, weights, elbo = [], [], [], 0.0
    for batch in batches(test, text, max(1, 256 // cfg.iwae_samples) * 8):
        mean, log_var = model.posterior(batch.ids, batch.lengths)
        means.append(mean)
        log_vars.append(log_var)
        weights.append(log_importance_weights(model, batch, cfg.iwae_samples, generator))
        z = reparameterized(mean, log_var, generator)
        reconstruction = sentence_nll(model, model.decode(batch.inputs, latent=z)[0], batch.targets)
        elbo += float((reconstruction + gaussian_kl(mean, log_var).sum(1)).sum())
    mean, log_var = torch.cat(means), torch.cat(log_vars)
    nll = float(iwae_nll(torch.cat(weights)).sum())
    outputs = decoded(model, mean, cfg, text)
    metrics = {
        "nll": round(nll / len(test), 4), "ppl": round(float(np.exp(nll / tokens)), 3),
        "elbo": round(-elbo / len(test), 4), "kl": round(float(gaussian_kl(mean, log_var).sum(1).mean()), 4),
        "mutual_information": round(mutual_information(mean, log_var, generator), 4),
        "active_units": active_units(mean), **reconstruction_scores(test, outputs, text),
    }
    return metrics, [text.decode(s) for s in outputs[:5]]


def interpolation(model: SentenceModel, ends: torch.Tensor, cfg: Autoencode, text: Text, on_sphere: bool,
                  points: int = 5) -> list[str]:
    """Greedy decodings along the straight line between two codes (renormalised on the sphere)."""
    shares = torch.linspace(0, 1, points)[:, None]
    line = (1 - shares) * ends[0] + shares * ends[1]
    return [text.decode(s) for s in decoded(model, torch.nn.functional.normalize(line, dim=-1) if on_sphere
                                            else line, cfg, text)]


def glove_features(texts: list[str], glove_path: Path, pattern: str) -> np.ndarray:
    """Each text's mean GloVe vector over its known words (lowercased `words.pattern` matches)."""
    units, vectors = read_text_vectors(glove_path)
    index, word = {u: i for i, u in enumerate(units)}, re.compile(pattern)
    features = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
    for row, t in enumerate(texts):
        known = [index[w] for w in word.findall(t.lower()) if w in index]
        if known:
            features[row] = vectors[known].mean(0)
    return features


def probe(models: dict[str, SentenceNet], clean_dir: Path, glove_path: Path, pattern: str, text: Text,
          cfg: Autoencode) -> dict[str, float]:
    """Test macro-F1 of a logistic regression of the labels on ae codes, vae posterior means and,
    the reference, mean-pooled GloVe word vectors."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    train_rows = split_rows(clean_dir / "labeled.parquet", "train", ["text", "label"])
    test_rows = split_rows(clean_dir / "labeled.parquet", "test", ["text", "label"])
    train_y, test_y = [str(v) for v in train_rows["label"]], [str(v) for v in test_rows["label"]]
    features = {}
    for kind, encode in (("ae", "code"), ("vae", "posterior")):
        if kind in models:
            features[kind] = [encoded(getattr(models[kind], encode),
                                      [s[: cfg.max_tokens] for s in text.encode(rows["text"])], text).numpy()
                              for rows in (train_rows, test_rows)]
    if glove_path.exists():
        features["glove"] = [glove_features(rows["text"], glove_path, pattern)
                             for rows in (train_rows, test_rows)]
    scores = {}
    for kind, (train_x, test_x) in features.items():
        classifier = LogisticRegression(max_iter=2000, random_state=cfg.seed).fit(train_x, train_y)
        scores[kind] = round(float(f1_score(test_y, classifier.predict(test_x), average="macro")), 4)
    return scores


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
