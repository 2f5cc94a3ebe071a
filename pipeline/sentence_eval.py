"""Scoring the trained sentence models (the autoencode stage's evaluation): reconstructions (token
accuracy, ROUGE-L, BLEU), the VAE's likelihood bound and latent statistics, samples' forward and
reverse perplexity under an add-k bigram, interpolations, and linear sentiment probes on the codes.
Sentences are int64 arrays of token ids, without specials (`pipeline.autoencoding`)."""

from __future__ import annotations

import re
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
    gaussian_kl,
    iwae_nll,
    log_importance_weights,
    make_batch,
    mutual_information,
    reparameterized,
    sentence_nll,
)
from pipeline.config import Config
from pipeline.configfamilies import Autoencode
from pipeline.files import InputError
from pipeline.models.sentence import LatentGan, SentenceModel, SentenceNet
from pipeline.ngram import sentence_bigram_perplexity
from pipeline.training import masking_generator
from pipeline.vectors import read_text_vectors

Sentences = list[np.ndarray]


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
            outputs += decode_tokens(models["dae"], len(batch.ids), cfg.max_tokens, text.eot_id,
                                     memory=models["dae"].memory(batch.ids, batch.lengths))
        metrics["dae"] = reconstruction_scores(test, outputs, text)
        # the baseline a denoiser must beat: the corrupted input itself, its masks left out
        unmasked = [n[n != text.mask_id] for n in noisy]
        metrics["dae"]["input_rouge_l"] = reconstruction_scores(test, unmasked, text)["rouge_l"]
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
