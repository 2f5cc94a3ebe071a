"""The evaluate stage's HTML report: one self-contained page, plots embedded as PNG data URIs, no
external resources. Pure rendering: it reads the metrics it is given and the curve CSVs it is pointed at."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np


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


EMBEDDINGS = {"glove": "GloVe", "skipgram": "skip-gram", "cbow": "CBOW"}


def embedding_tables(emb: dict[str, dict[str, Any]]) -> str:
    """One row per method (scores, coverage, training seconds), then the probe words' neighbours side
    by side."""
    def seconds(m: dict[str, Any]) -> float:
        return m["train_seconds"] if "train_seconds" in m else round(m["seconds_per_epoch"] * m["epochs"], 1)

    rows = [[EMBEDDINGS[name], m["dim"], m["vocab_size"], m["wordsim353"]["spearman"],
             m["simlex999"]["spearman"], m["analogy"]["accuracy"], m["wordsim353"]["coverage"],
             m["analogy"]["coverage"], seconds(m)]
            for name, m in emb.items()]
    scores = table(rows, ["method", "dim", "words", "WordSim353 ρ", "SimLex-999 ρ", "analogy accuracy",
                          "pair coverage", "analogy coverage", "train seconds"])
    probes = list(dict.fromkeys(w for m in emb.values() for w in m.get("neighbours", {})))
    neighbours = table([[w, *(", ".join(m.get("neighbours", {}).get(w, [])) for m in emb.values())]
                        for w in probes], ["probe", *(EMBEDDINGS[name] for name in emb)])
    note = ("<p class='sub'>GloVe's seconds are its epochs alone (the cooccur stage counts first); "
            "Word2Vec's include reading the words.</p>")
    return scores + note + neighbours


SENTENCE_MODELS = {"lm": "GRU language model", "ae": "autoencoder", "dae": "denoiser (seq2seq + attention)",
                   "dae_input": "the masked input, copied (the denoiser's baseline)",
                   "vae": "sentence VAE", "arae": "ARAE (latent WGAN-GP on the ae codes)",
                   "glove": "mean GloVe word vector (probe only)"}
SENTENCE_METRICS = ("nll", "ppl", "elbo", "kl", "mutual_information", "active_units", "token_accuracy",
                    "rouge_l", "bleu", "forward_ppl", "reverse_ppl", "probe_f1")


def sentence_models_section(found: dict[str, Any]) -> str:
    """The autoencode stage's scores (one row per model), then its examples: reconstructions,
    samples and interpolations."""
    scores, examples = found["metrics"], found["examples"]
    if "input_rouge_l" in scores.get("dae", {}):
        scores = {**scores, "dae_input": {"rouge_l": scores["dae"]["input_rouge_l"]}}
    rows = [[SENTENCE_MODELS[name], *(scores[name].get(k, "-") for k in SENTENCE_METRICS)]
            for name in SENTENCE_MODELS if name in scores]
    parts = [table(rows, ["model", "NLL (nats/sentence)", "perplexity", "ELBO", "KL", "mutual information",
                          "active units", "token accuracy", "ROUGE-L", "BLEU", "forward ppl", "reverse ppl",
                          "sentiment probe macro-F1"])]
    parts.append(f"<p class='sub'>{scores['sentences']['test_scored']} test sentences scored; the VAE's NLL "
                 "is its importance-sampled bound; forward/reverse perplexity: an add-k bigram of real train "
                 "text scoring generated sentences / of generated sentences scoring real test text.</p>")
    columns = [k for k in ("ae", "vae") if k in examples]
    if columns:
        parts.append(table([[t, *(examples[k][i] for k in columns)] for i, t in enumerate(examples["test"])],
                           ["test sentence", *(f"{k} reconstruction" for k in columns)]))
    if "dae" in examples:
        parts.append(table([[e["input"], e["output"]] for e in examples["dae"]],
                           ["masked input", "denoiser output"]))
    samples = examples.get("samples", {})
    if samples:
        parts.append(table([[SENTENCE_MODELS[k] if i == 0 else "", s] for k, v in samples.items()
                            for i, s in enumerate(v)], ["samples from", "sentence"]))
    for key in ("ae_interpolation", "vae_interpolation"):
        if key in examples:
            parts.append(table([[i, s] for i, s in enumerate(examples[key])],
                               [f"{key.split('_')[0]} interpolation step", "sentence"]))
    return "".join(parts)


def render_report(
    metrics: dict[str, Any],
    labels: list[str],
    plots: dict[str, str],
    params: dict[str, Any],
    hashes: dict[str, str],
) -> str:
    lm, ours, base = metrics["language_model"], metrics["classifier"], metrics["baseline"]
    causal = lm["objective"] == "clm"
    cards = [
        (lm["test_bits_per_byte"], "LM test bits/byte") if causal else
        (lm["test_mlm_accuracy"], "encoder masked-token accuracy"),
        (round(lm["ratio_to_bigram"], 3), "LM bits/byte ÷ bigram's") if causal else
        (lm["test_pseudo_perplexity"], "encoder pseudo-perplexity"),
        (ours["macro_f1"], "classifier macro-F1"),
        (base["macro_f1"], "TF-IDF + LR macro-F1"),
    ]
    emb = metrics.get("embeddings") or {}
    for method in ("skipgram", "glove"):
        if "wordsim353" in emb.get(method, {}):
            cards.append((emb[method]["wordsim353"]["spearman"], f"{EMBEDDINGS[method]} WordSim353 ρ"))
    parts = [
        f"<h1>Pipeline report</h1><p class='sub'>git {html.escape(hashes.get('git', '-'))}</p>",
        "<div class='cards'>"
        + "".join(f"<div class='card'><b>{v}</b><span>{html.escape(t)}</span></div>" for v, t in cards)
        + "</div>",
    ]
    parts.append("<h2>Language model (test split)</h2>")
    if causal:
        rows = [["pretrained model (clm)", lm["test_bits_per_byte"], lm["test_perplexity"]],
                ["add-k bigram (train)", lm["bigram_bits_per_byte"], "-"]]
        if "bigram_corpus_only_bits_per_byte" in lm:
            rows.append(["add-k bigram (corpus part of train)", lm["bigram_corpus_only_bits_per_byte"], "-"])
        rows.append(["add-one unigram (train)", lm["unigram_bits_per_byte"], "-"])
        parts.append(table(rows, ["model", "bits per byte", "perplexity"]))
    else:
        parts.append(table([["masked-token loss (nats)", lm["test_mlm_loss"]],
                            ["masked-token accuracy", lm["test_mlm_accuracy"]],
                            ["pseudo-perplexity", lm["test_pseudo_perplexity"]]],
                           ["encoder (mlm): no bits per byte, it does not read left to right", "value"]))
    parts.append(
        f"<div class='plots'><img src='{plots['pretrain']}' alt='pretraining loss'>"
        f"<img src='{plots['finetune']}' alt='fine-tuning curves'></div>"
    )
    parts.append("<h2>Sentiment classifier (test split)</h2>")
    tuned = base["tuned_on_val"]
    parts.append(
        table(
            [
                ["fine-tuned model", ours["accuracy"], ours["macro_f1"]],
                [f"TF-IDF 1-2 grams + logistic regression (C {tuned['C']}, class weights "
                 f"{tuned['class_weight']}: the best on val)", base["accuracy"], base["macro_f1"]],
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
    backbones = metrics.get("backbones")
    if backbones:
        seconds = f"{backbones['seconds']:.0f} s"
        parts.append(f"<h2>Backbones at equal wall-clock ({seconds} of pretraining each)</h2>")
        parts.append(table(
            [[name, row["objective"], row["steps"], row["parameters"], row.get("val_bits_per_byte", "-"),
              row.get("val_mlm_accuracy", "-"), row["val_macro_f1"], row["test_macro_f1"]]
             for name, row in backbones["backbones"].items()],
            ["backbone", "objective", "steps", "parameters", "val bits/byte", "val masked-token accuracy",
             "classifier val macro-F1", "test macro-F1"]))
        examples = backbones.get("finetune_examples") or "all"
        parts.append("<p class='sub'>From <code>python benchmarks/backbones.py</code>; each fine-tuned for "
                     f"{backbones['finetune_epochs']} epochs on {examples} train examples with the same "
                     "finetune params.</p>")
    parts.append("<h2>Word vectors</h2>")
    if emb:
        parts.append(embedding_tables(emb))
        if "glove" in plots:
            parts.append(f"<div class='plots'><img src='{plots['glove']}' alt='GloVe loss'></div>")
    else:
        parts.append("<p>No word-vector metrics found.</p>")
    if metrics.get("sentence_models"):
        parts.append("<h2>Sentence autoencoders, VAE and latent GAN (test split)</h2>")
        parts.append(sentence_models_section(metrics["sentence_models"]))
    parts.append("<h2>Samples</h2>" if metrics["samples"] else "")
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
