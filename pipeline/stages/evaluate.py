"""Evaluate stage: the language model, the classifier and the embeddings on held-out data, next to
baselines computed in the same run, and a self-contained HTML report.

- Language model: test loss, perplexity and bits per byte (tokenizer-independent), beside an add-one
  unigram and an add-k bigram model of the train split (`pipeline/ngram.py`).
- Classifier: accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix on the
  labeled **test** split, beside TF-IDF (word 1-2 grams) + logistic regression trained on the same
  train split (scikit-learn).
- Word vectors: the glove, skipgram and cbow stages' benchmark scores and nearest neighbours
  (`metrics/{glove,skipgram,cbow}.json`), side by side.
- Sentence models: the autoencode stage's scores and examples (`metrics/autoencode.json`,
  `paths.autoencode/examples.json`), when it ran.
- Generation: samples from `evaluate.samples` prompts with a fixed seed.

Outputs: `metrics/evaluate.json`, `metrics/plots/confusion.csv` (actual,predicted per test example,
for `dvc plots`), `paths.reports/report.html` (plots embedded as PNG, no external resources).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from pipeline import ngram
from pipeline.checkpoint import load_model, read_config
from pipeline.classify import Classifier, read_examples, read_labels
from pipeline.config import Config, Evaluate, project_root
from pipeline.files import InputError, atomic_path, write_json
from pipeline.generate import generate
from pipeline.report import confusion_plot, curve_plot, render_report
from pipeline.shards import TokenShards, read_manifest
from pipeline.stagecli import stage_main
from pipeline.training import masked_eval, mean_loss, pseudo_log_likelihood

LABELED_FILE = "labeled.parquet"


# ---------------------------------------------------------------- language model


def language_model_metrics(lm_dir: Path, tokens_dir: Path, e: Evaluate) -> dict[str, Any]:
    """A causal LM: test loss, perplexity and bits per byte beside unigram and add-k bigram models of
    the train split. An encoder (mlm) does not predict text left to right, so it gets no bits per byte:
    masked-token loss and accuracy, and the pseudo-perplexity of a few test windows."""
    manifest = read_manifest(tokens_dir)
    model, config = load_model(lm_dir)
    train, test = TokenShards(tokens_dir, "train"), TokenShards(tokens_dir, "test")
    windows = np.concatenate(list(test.sequential_windows(config["model"]["context"], 32)))
    cpu = torch.device("cpu")
    if not config["model"].get("causal", True):
        specials = torch.tensor([manifest[k] for k in ("eot_id", "pad_id", "mask_id")])
        loss, accuracy = masked_eval(model, windows, 32, cpu, manifest["mask_id"], specials, 0.15, seed=0)
        total, count = pseudo_log_likelihood(model, windows[: e.pseudo_perplexity_windows],
                                             manifest["mask_id"], specials, cpu)
        return {"objective": "mlm", "test_mlm_loss": round(loss, 4), "test_mlm_accuracy": round(accuracy, 4),
                "test_pseudo_perplexity": round(math.exp(-total / count), 2)}
    loss = mean_loss(model, windows, 32, cpu)
    totals = manifest["totals"]["test"]
    bits_to_bpb = totals["tokens"] / totals["text_bytes"]  # bits per token -> bits per byte
    vocab = manifest["vocab_size"]
    bigram = ngram.bigram_bits_per_token(train, test, vocab, e.bigram_k) * bits_to_bpb
    bits_per_byte = loss / math.log(2) * bits_to_bpb
    extra: dict[str, Any] = {}
    corpus_tokens = manifest["totals"]["train"].get("corpus_tokens", len(train))
    if corpus_tokens < len(train):  # labeled texts in the train shards: a bigram of the corpus alone too
        extra["bigram_corpus_only_bits_per_byte"] = round(
            ngram.bigram_bits_per_token(train, test, vocab, e.bigram_k, corpus_tokens) * bits_to_bpb, 4)
    strongest = min([bigram, *extra.values()])
    return {
        "objective": "clm",
        "test_loss": round(loss, 4),
        "test_perplexity": round(math.exp(loss), 2),
        "test_bits_per_byte": round(bits_per_byte, 4),
        "unigram_bits_per_byte": round(ngram.unigram_bits_per_token(train, test, vocab) * bits_to_bpb, 4),
        "bigram_bits_per_byte": round(bigram, 4),
        **extra,
        "ratio_to_bigram": round(bits_per_byte / strongest, 4),  # against the stronger bigram
    }


def generates(lm_dir: Path) -> bool:
    return bool(read_config(lm_dir)["model"].get("causal", True))


# ---------------------------------------------------------------- classifier


def classification_metrics(actual: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows: actual, columns: predicted, in label-index order)."""
    classes = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=classes, zero_division=0
    )
    return {
        "accuracy": round(float(accuracy_score(actual, predicted)), 4),
        "macro_f1": round(
            float(f1_score(actual, predicted, labels=classes, average="macro", zero_division=0)), 4
        ),
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4),
                "f1": round(float(f1[i]), 4),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion": confusion_matrix(actual, predicted, labels=classes).tolist(),
    }


def tfidf_baseline(labeled: Path, mapping: dict[str, int], e: Evaluate, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """TF-IDF (word 1-2 grams) + logistic regression trained on the train split, its C and class
    weighting chosen by validation macro-F1 (so the comparison is fair); (actual, predicted) on the
    test split and the chosen settings."""
    if not labeled.exists():
        raise InputError(f"{labeled}: clean labeled set not found (run the clean stage)")
    table = pq.read_table(labeled, columns=["text", "label", "split"]).to_pydict()
    rows = {s: [i for i, split in enumerate(table["split"]) if split == s] for s in ("train", "val", "test")}
    texts = {s: [table["text"][i] for i in rows[s]] for s in rows}
    labels = {s: np.array([mapping[table["label"][i]] for i in rows[s]]) for s in rows}
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=e.tfidf_max_features)
    features = vectorizer.fit_transform(texts["train"])
    val_features = vectorizer.transform(texts["val"])
    best: tuple[float, Any, dict[str, Any]] = (-1.0, None, {})
    for c in e.tfidf_c:
        for weighting in (None, "balanced"):
            model = LogisticRegression(C=c, class_weight=weighting, max_iter=2000, random_state=seed)
            model.fit(features, labels["train"])
            score = float(f1_score(labels["val"], model.predict(val_features), average="macro"))
            if score > best[0]:
                best = (score, model, {"C": c, "class_weight": weighting or "none",
                                       "val_macro_f1": round(score, 4)})
    return labels["test"], best[1].predict(vectorizer.transform(texts["test"])), best[2]


def classifier_metrics(classifier_dir: Path, tokens_dir: Path, labels: list[str]) -> tuple[dict, np.ndarray]:
    classifier = Classifier.load(classifier_dir)
    test = read_examples(tokens_dir / "labeled", "test")
    predicted = classifier.predict(test.texts)[1].argmax(1)
    return classification_metrics(test.labels, predicted, labels), np.stack([test.labels, predicted], 1)


# ---------------------------------------------------------------- the stage


def run(
    cfg: Config,
    lm_dir: Path,
    tokens_dir: Path,
    classifier_dir: Path,
    clean_dir: Path,
    metrics_dir: Path,
    report_path: Path,
    autoencode_dir: Path | None = None,
) -> dict[str, Any]:
    """Compute every metric, write metrics/evaluate.json, the confusion plot data and the report."""
    from pipeline.tracking import git_state, path_md5

    e = cfg.evaluate
    autoencode_dir = autoencode_dir or project_root() / cfg.paths.autoencode
    mapping = read_labels(tokens_dir / "labeled" / "labels.json")
    labels = [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]
    ours, pairs = classifier_metrics(classifier_dir, tokens_dir, labels)
    actual, predicted, chosen = tfidf_baseline(clean_dir / LABELED_FILE, mapping, e, cfg.seed)
    backbones_path = metrics_dir / "backbones.json"
    sentence_paths = {"metrics": metrics_dir / "autoencode.json",
                      "examples": autoencode_dir / "examples.json"}
    embeddings = {name: json.loads((metrics_dir / f"{name}.json").read_text())
                  for name in ("glove", "skipgram", "cbow") if (metrics_dir / f"{name}.json").exists()}
    metrics: dict[str, Any] = {
        "language_model": language_model_metrics(lm_dir, tokens_dir, e),
        "classifier": ours,
        "baseline": {**classification_metrics(actual, predicted, labels), "tuned_on_val": chosen},
        "embeddings": embeddings or None,
        "backbones": json.loads(backbones_path.read_text()) if backbones_path.exists() else None,
        "sentence_models": {k: json.loads(p.read_text()) for k, p in sentence_paths.items()}
        if all(p.exists() for p in sentence_paths.values()) else None,
        "samples": [
            {
                "prompt": p,
                "text": generate(lm_dir, p, e.sample_tokens, e.temperature, e.top_k, None, e.sample_seed),
            }
            for p in (e.samples if generates(lm_dir) else [])
        ],
    }
    write_json(metrics_dir / "evaluate.json", metrics)
    confusion_csv = metrics_dir / "plots" / "confusion.csv"
    confusion_csv.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(confusion_csv) as tmp:
        tmp.write_text("actual,predicted\n" + "".join(f"{labels[a]},{labels[p]}\n" for a, p in pairs))
    plots_dir = metrics_dir / "plots"
    plots = {
        "pretrain": curve_plot(
            {"train": plots_dir / "pretrain_train.csv", "val": plots_dir / "pretrain_val.csv"},
            "step",
            "loss (nats/token)",
        ),
        "finetune": curve_plot(
            {"train loss": plots_dir / "finetune_train.csv", "val macro-F1": plots_dir / "finetune_val.csv"},
            "step",
            "fine-tuning",
        ),
        "confusion": confusion_plot(ours["confusion"], labels, "fine-tuned model"),
        "baseline_confusion": confusion_plot(metrics["baseline"]["confusion"], labels, "TF-IDF + LR"),
    }
    if (plots_dir / "glove_loss.csv").exists():
        plots["glove"] = curve_plot({"GloVe": plots_dir / "glove_loss.csv"}, "epoch", "weighted loss")
    hashes = {"git": git_state().get("git.commit", "-")}
    root = project_root()
    hashes.update(
        {
            str(p.relative_to(root)) if p.is_relative_to(root) else str(p): path_md5(p)
            for p in (lm_dir, classifier_dir, tokens_dir, clean_dir)
            if p.exists()
        }
    )
    report_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(report_path) as tmp:
        tmp.write_text(
            render_report(metrics, labels, plots, cfg.model_dump(mode="json"), hashes), encoding="utf-8"
        )
    return metrics


def execute(cfg: Config) -> str:
    from pipeline import tracking

    paths = {
        name: project_root() / getattr(cfg.paths, name)
        for name in ("lm", "tokens", "classifier", "clean", "metrics", "reports", "autoencode")
    }
    report = paths["reports"] / "report.html"
    inputs = {name: paths[name] for name in ("lm", "tokens", "classifier", "clean")}
    with tracking.stage_run(
        "evaluate", cfg.tracking, cfg.evaluate.model_dump(), inputs, {"report": report}
    ) as run_log:
        metrics = run(
            cfg, paths["lm"], paths["tokens"], paths["classifier"], paths["clean"], paths["metrics"], report,
            paths["autoencode"],
        )
        numeric = {k: v for k, v in metrics.items() if k in ("language_model", "classifier", "baseline")}
        run_log.log_metrics(tracking.numeric_leaves(numeric))
        run_log.log_artifact(report, "report")
        test_scores = {f"test_{k}": metrics["classifier"][k] for k in ("macro_f1", "accuracy")}
        tracking.tag_model_version(run_log, cfg.tracking.classifier_model, paths["classifier"], test_scores)
    lm, ours, base = metrics["language_model"], metrics["classifier"], metrics["baseline"]
    quality = (f"LM {lm['test_bits_per_byte']} bits/byte (bigram {lm['bigram_bits_per_byte']})"
               if lm["objective"] == "clm" else f"encoder masked-token accuracy {lm['test_mlm_accuracy']}")
    return (
        f"evaluate: {quality}, "
        f"classifier macro-F1 {ours['macro_f1']} (TF-IDF+LR {base['macro_f1']}) -> {report}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", __doc__, execute, argv)


if __name__ == "__main__":
    sys.exit(main())
