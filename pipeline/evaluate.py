"""Evaluate stage: the language model, the classifier and the embeddings on held-out data, next to
baselines computed in the same run, and a self-contained HTML report.

- Language model: test loss, perplexity and bits per byte (tokenizer-independent), beside an add-one
  unigram and an add-k bigram model of the train split (`pipeline/ngram.py`).
- Classifier: accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix on the
  labeled **test** split, beside TF-IDF (word 1-2 grams) + logistic regression trained on the same
  train split (scikit-learn).
- Embeddings: the glove stage's benchmark scores and nearest neighbours (`metrics/glove.json`).
- Generation: samples from `evaluate.samples` prompts with a fixed seed.

Outputs: `metrics/evaluate.json`, `metrics/plots/confusion.csv` (actual,predicted per test example,
for `dvc plots`), `paths.reports/report.html` (plots embedded as PNG, no external resources).
"""

from __future__ import annotations

import base64
import html
import io
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
from pipeline.checkpoint import load_model
from pipeline.classify import Classifier, predict_proba, read_examples, read_labels
from pipeline.config import PROJECT_ROOT, Config
from pipeline.files import InputError, atomic_path, write_json
from pipeline.generate import generate
from pipeline.shards import TokenShards, read_manifest
from pipeline.stagecli import stage_main
from pipeline.training import mean_loss

LABELED_FILE = "labeled.parquet"


# ---------------------------------------------------------------- language model


def language_model_metrics(lm_dir: Path, tokens_dir: Path, k: float) -> dict[str, Any]:
    manifest = read_manifest(tokens_dir)
    model, config = load_model(lm_dir)
    train, test = TokenShards(tokens_dir, "train"), TokenShards(tokens_dir, "test")
    windows = np.concatenate(list(test.sequential_windows(config["model"]["context"], 32)))
    loss = mean_loss(model, windows, 32, torch.device("cpu"))
    totals = manifest["totals"]["test"]
    bits_to_bpb = totals["tokens"] / totals["text_bytes"]  # bits per token -> bits per byte
    vocab = manifest["vocab_size"]
    return {
        "test_loss": round(loss, 4),
        "test_perplexity": round(math.exp(loss), 2),
        "test_bits_per_byte": round(loss / math.log(2) * bits_to_bpb, 4),
        "unigram_bits_per_byte": round(ngram.unigram_bits_per_token(train, test, vocab) * bits_to_bpb, 4),
        "bigram_bits_per_byte": round(ngram.bigram_bits_per_token(train, test, vocab, k) * bits_to_bpb, 4),
    }


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


def tfidf_baseline(
    labeled: Path, mapping: dict[str, int], max_features: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF (word 1-2 grams) + logistic regression trained on the train split; (actual, predicted)
    on the test split."""
    if not labeled.exists():
        raise InputError(f"{labeled}: clean labeled set not found (run the clean stage)")
    table = pq.read_table(labeled, columns=["text", "label", "split"]).to_pydict()
    rows = {s: [i for i, split in enumerate(table["split"]) if split == s] for s in ("train", "test")}
    texts = {s: [table["text"][i] for i in rows[s]] for s in rows}
    labels = {s: np.array([mapping[table["label"][i]] for i in rows[s]]) for s in rows}
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=max_features)
    features = vectorizer.fit_transform(texts["train"])
    model = LogisticRegression(max_iter=2000, random_state=seed).fit(features, labels["train"])
    return labels["test"], model.predict(vectorizer.transform(texts["test"]))


def classifier_metrics(classifier_dir: Path, tokens_dir: Path, labels: list[str]) -> tuple[dict, np.ndarray]:
    classifier = Classifier.load(classifier_dir)
    test = read_examples(tokens_dir / "labeled", "test").truncated(classifier.max_length)
    probs = predict_proba(classifier.model, test.ids, classifier.pad_id, 64, torch.device("cpu"))
    predicted = probs.argmax(1)
    return classification_metrics(test.labels, predicted, labels), np.stack([test.labels, predicted], 1)


# ---------------------------------------------------------------- report


def figure_png(draw: Any) -> str:
    """A matplotlib figure drawn by `draw(axes)`, as a base64 PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(5.0, 3.3), dpi=100)  # two side by side in the page width
    draw(axes)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def read_curve(path: Path) -> tuple[list[float], list[float]]:
    if not path.exists():
        return [], []
    rows = [line.split(",") for line in path.read_text().splitlines()[1:] if line]
    return [float(r[0]) for r in rows], [float(r[1]) for r in rows]


def curve_plot(series: dict[str, Path], xlabel: str, ylabel: str) -> str:
    def draw(ax: Any) -> None:
        for name, path in series.items():
            x, y = read_curve(path)
            ax.plot(x, y, label=name, marker="o" if len(x) < 30 else None, markersize=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()

    return figure_png(draw)


def confusion_plot(matrix: list[list[int]], labels: list[str], title: str) -> str:
    def draw(ax: Any) -> None:
        values = np.array(matrix)
        ax.imshow(values, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title)
        for (i, j), v in np.ndenumerate(values):
            ax.text(
                j, i, str(v), ha="center", va="center", color="white" if v > values.max() / 2 else "black"
            )

    return figure_png(draw)


def table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2rem auto;
  padding:0 1rem;color:#1f2933;background:#fafbfc}
h1{font-size:1.7rem;margin-bottom:.2rem}
h2{font-size:1.2rem;border-bottom:2px solid #d9e2ec;padding-bottom:.3rem;margin-top:2.2rem}
.sub{color:#627d98;margin-top:0}
.cards{display:flex;gap:1rem;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d9e2ec;border-radius:8px;padding:.8rem 1.1rem;min-width:150px}
.card b{display:block;font-size:1.5rem}
.card span{color:#627d98;font-size:.85rem}
table{border-collapse:collapse;background:#fff;margin:.6rem 0;font-size:.9rem}
td,th{border:1px solid #d9e2ec;padding:.35rem .7rem;text-align:left}
th{background:#f0f4f8}
.plots{display:flex;gap:1rem;flex-wrap:wrap}
.plots img{border:1px solid #d9e2ec;border-radius:6px;background:#fff}
pre{background:#fff;border:1px solid #d9e2ec;border-radius:6px;padding:.7rem;white-space:pre-wrap;
  font-size:.85rem}
.sample{background:#fff;border-left:4px solid #4098d7;padding:.5rem .8rem;margin:.5rem 0}
"""


def render_report(
    metrics: dict[str, Any],
    labels: list[str],
    plots: dict[str, str],
    params: dict[str, Any],
    hashes: dict[str, str],
) -> str:
    lm, ours, base = metrics["language_model"], metrics["classifier"], metrics["baseline"]
    cards = [
        (lm["test_bits_per_byte"], "LM test bits/byte"),
        (lm["test_perplexity"], "LM test perplexity"),
        (ours["macro_f1"], "classifier macro-F1"),
        (base["macro_f1"], "TF-IDF + LR macro-F1"),
    ]
    emb = metrics.get("embeddings") or {}
    if "wordsim353" in emb:
        cards.append((emb["wordsim353"]["spearman"], "GloVe WordSim353 ρ"))
    parts = [
        f"<h1>Pipeline report</h1><p class='sub'>git {html.escape(hashes.get('git', '-'))}</p>",
        "<div class='cards'>"
        + "".join(f"<div class='card'><b>{v}</b><span>{html.escape(t)}</span></div>" for v, t in cards)
        + "</div>",
    ]
    parts.append("<h2>Language model (test split)</h2>")
    parts.append(
        table(
            [
                ["pretrained model", lm["test_bits_per_byte"], lm["test_perplexity"]],
                ["add-k bigram (train)", lm["bigram_bits_per_byte"], "-"],
                ["add-one unigram (train)", lm["unigram_bits_per_byte"], "-"],
            ],
            ["model", "bits per byte", "perplexity"],
        )
    )
    parts.append(
        f"<div class='plots'><img src='{plots['pretrain']}' alt='pretraining loss'>"
        f"<img src='{plots['finetune']}' alt='fine-tuning curves'></div>"
    )
    parts.append("<h2>Sentiment classifier (test split)</h2>")
    parts.append(
        table(
            [
                ["fine-tuned model", ours["accuracy"], ours["macro_f1"]],
                ["TF-IDF 1-2 grams + logistic regression", base["accuracy"], base["macro_f1"]],
            ],
            ["model", "accuracy", "macro-F1"],
        )
    )
    parts.append(
        table(
            [
                [
                    name,
                    *(ours["per_class"][name][k] for k in ("precision", "recall", "f1")),
                    base["per_class"][name]["f1"],
                    ours["per_class"][name]["support"],
                ]
                for name in labels
            ],
            ["class", "precision", "recall", "F1", "baseline F1", "support"],
        )
    )
    parts.append(
        f"<div class='plots'><img src='{plots['confusion']}' alt='confusion matrix'>"
        f"<img src='{plots['baseline_confusion']}' alt='baseline confusion matrix'></div>"
    )
    parts.append("<h2>Embeddings (GloVe)</h2>")
    if emb:
        scores = [
            [name, emb[name].get("spearman", emb[name].get("accuracy")), emb[name]["coverage"]]
            for name in ("wordsim353", "simlex999", "analogy")
            if name in emb
        ]
        parts.append(table(scores, ["benchmark", "Spearman ρ / accuracy", "coverage"]) if scores else "")
        parts.append(
            table(
                [[w, ", ".join(n)] for w, n in emb.get("neighbours", {}).items()],
                ["probe", "nearest neighbours"],
            )
        )
        if "glove" in plots:
            parts.append(f"<div class='plots'><img src='{plots['glove']}' alt='GloVe loss'></div>")
    else:
        parts.append("<p>No GloVe metrics found.</p>")
    parts.append("<h2>Samples</h2>")
    parts += [
        f"<div class='sample'><b>{html.escape(s['prompt'])}</b>{html.escape(s['text'][len(s['prompt']) :])}"
        "</div>"
        for s in metrics["samples"]
    ]
    parts.append("<h2>Built from</h2>")
    parts.append(table([[k, v] for k, v in hashes.items()], ["input", "md5 (as dvc.lock records it)"]))
    parts.append(f"<pre>{html.escape(json.dumps(params, indent=2, sort_keys=True))}</pre>")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Pipeline report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )


# ---------------------------------------------------------------- the stage


def run(
    cfg: Config,
    lm_dir: Path,
    tokens_dir: Path,
    classifier_dir: Path,
    clean_dir: Path,
    metrics_dir: Path,
    report_path: Path,
) -> dict[str, Any]:
    """Compute every metric, write metrics/evaluate.json, the confusion plot data and the report."""
    from pipeline.tracking import git_state, path_md5

    e = cfg.evaluate
    mapping = read_labels(tokens_dir / "labeled" / "labels.json")
    labels = [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]
    ours, pairs = classifier_metrics(classifier_dir, tokens_dir, labels)
    actual, predicted = tfidf_baseline(clean_dir / LABELED_FILE, mapping, e.tfidf_max_features, cfg.seed)
    glove_path = metrics_dir / "glove.json"
    embeddings = json.loads(glove_path.read_text()) if glove_path.exists() else None
    metrics: dict[str, Any] = {
        "language_model": language_model_metrics(lm_dir, tokens_dir, e.bigram_k),
        "classifier": ours,
        "baseline": classification_metrics(actual, predicted, labels),
        "embeddings": embeddings,
        "samples": [
            {
                "prompt": p,
                "text": generate(lm_dir, p, e.sample_tokens, e.temperature, e.top_k, None, e.sample_seed),
            }
            for p in e.samples
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
    hashes.update(
        {
            str(p.relative_to(PROJECT_ROOT)) if p.is_relative_to(PROJECT_ROOT) else str(p): path_md5(p)
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
        name: PROJECT_ROOT / getattr(cfg.paths, name)
        for name in ("lm", "tokens", "classifier", "clean", "metrics", "reports")
    }
    report = paths["reports"] / "report.html"
    inputs = {name: paths[name] for name in ("lm", "tokens", "classifier", "clean")}
    with tracking.stage_run(
        "evaluate", cfg.tracking, cfg.evaluate.model_dump(), inputs, {"report": report}
    ) as run_log:
        metrics = run(
            cfg, paths["lm"], paths["tokens"], paths["classifier"], paths["clean"], paths["metrics"], report
        )
        numeric = {k: v for k, v in metrics.items() if k in ("language_model", "classifier", "baseline")}
        run_log.log_metrics(tracking.numeric_leaves(numeric))
        run_log.log_artifact(report, "report")
        test_scores = {f"test_{k}": metrics["classifier"][k] for k in ("macro_f1", "accuracy")}
        tracking.tag_model_version(run_log, cfg.tracking.classifier_model, paths["classifier"], test_scores)
    lm, ours, base = metrics["language_model"], metrics["classifier"], metrics["baseline"]
    return (
        f"evaluate: LM {lm['test_bits_per_byte']} bits/byte (bigram {lm['bigram_bits_per_byte']}), "
        f"classifier macro-F1 {ours['macro_f1']} (TF-IDF+LR {base['macro_f1']}) -> {report}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", __doc__, execute, argv)


if __name__ == "__main__":
    sys.exit(main())
