"""Fine-tune, evaluate and classify on a tiny real slice: a tiny pretrained model, a classifier head
trained on a few hundred sentiment texts, metrics against scikit-learn, the report, bad inputs."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import NO_INPUT, Interrupt, StopAt, tokenize_all  # StopAt: a fine-tune killed mid-run
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from typer.testing import CliRunner

from pipeline import ngram
from pipeline.classify import Classifier, read_examples
from pipeline.cli import app
from pipeline.config import parse_config
from pipeline.files import InputError
from pipeline.shards import TokenShards
from pipeline.stages import evaluate, finetune, pretrain

TINY_MODEL = {"arch": "gpt", "context": 64, "n_layer": 2, "n_head": 2, "n_embd": 64}


def finetune_params(params: dict[str, Any], out: Path, **overrides: Any) -> dict[str, Any]:
    params = copy.deepcopy(params)
    params["paths"].update(classifier=str(out / "classifier"), finetune_checkpoints=str(out / "ckpt"))
    # 64 examples, 10 epochs: few enough to be learned by heart, so the train loss must fall
    params["finetune"] = {"max_examples": 64, "epochs": 10, "batch_size": 16, "eval_every": 5,
                          "checkpoint_every": 4, "warmup_steps": 2, "patience": 10, "learning_rate": 0.003,
                          **overrides}
    return params


def run_finetune(root: Path, params: dict[str, Any], out: Path, tracked: Any = None) -> dict[str, Any]:
    return finetune.run(parse_config(params), root / "lm", root / "tokens", out / "classifier", out / "ckpt",
                        out / "metrics", tracked)


@pytest.fixture(scope="module")
def tiny_lm(tiny_project, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The tiny project with a tiny pretrained GPT in root/lm (30 steps)."""
    root, params = tiny_project
    params = copy.deepcopy(params)
    params["pretrain"] = {"model": TINY_MODEL, "batch_size": 8, "max_steps": 30, "warmup_steps": 3,
                          "eval_every": 10, "eval_windows": 8, "checkpoint_every": 30,
                          "init_embeddings": NO_INPUT}
    out = tmp_path_factory.mktemp("lm")
    pretrain.run(parse_config(params), root / "tokens", root / "tokenizer", root / "lm", out / "ckpt", out)
    return root, params


@pytest.fixture(scope="module")
def trained(tiny_lm, tmp_path_factory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    root, params = tiny_lm
    out = tmp_path_factory.mktemp("finetune")
    metrics = run_finetune(root, finetune_params(params, out), out)
    return out, params, metrics


def test_the_head_learns_on_a_real_slice(trained):
    out, _, metrics = trained
    rows = (out / "metrics" / "plots" / "finetune_train.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert len(losses) == metrics["steps"] == 10 * 4
    assert np.mean(losses[-8:]) < np.mean(losses[:8])  # the loss falls
    val_curve = [float(r.split(",")[1]) for r in
                 (out / "metrics" / "plots" / "finetune_val.csv").read_text().splitlines()[1:]]
    assert metrics["val_macro_f1"] == pytest.approx(max(val_curve), abs=1e-4)  # the best is what is kept
    classifier = Classifier.load(out / "classifier")
    labels, probs = classifier.predict(["I love this airline, great crew", "Worst delay ever, lost my bag"])
    assert set(labels) <= {"negative", "neutral", "positive"}
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_frozen_mode_leaves_the_backbone_untouched(tiny_lm, tmp_path):
    root, params = tiny_lm
    run_finetune(root, finetune_params(params, tmp_path, mode="frozen", epochs=1), tmp_path)
    lm = load_file(root / "lm" / "model.safetensors")
    tuned = load_file(tmp_path / "classifier" / "model.safetensors")
    assert all(torch.equal(lm[k], tuned[f"backbone.{k}"]) for k in lm)
    assert not torch.equal(tuned["classifier.weight"], torch.zeros_like(tuned["classifier.weight"]))


def test_an_interrupted_run_resumes_to_identical_weights(tiny_lm, trained, tmp_path):
    root, params = tiny_lm
    whole, _, _ = trained
    with pytest.raises(Interrupt):
        run_finetune(root, finetune_params(params, tmp_path), tmp_path, StopAt(11))  # checkpoint at step 8
    run_finetune(root, finetune_params(params, tmp_path), tmp_path)
    assert (whole / "classifier" / "model.safetensors").read_bytes() == \
        (tmp_path / "classifier" / "model.safetensors").read_bytes()


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    actual, predicted = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    predicted[:60] = actual[:60]
    metrics = evaluate.classification_metrics(actual, predicted, ["negative", "neutral", "positive"])
    assert metrics["accuracy"] == round(accuracy_score(actual, predicted), 4)
    assert metrics["macro_f1"] == round(f1_score(actual, predicted, average="macro"), 4)
    precision, recall, f1, support = precision_recall_fscore_support(actual, predicted)
    for i, name in enumerate(["negative", "neutral", "positive"]):
        expected = {"precision": round(precision[i], 4), "recall": round(recall[i], 4), "f1": round(f1[i], 4),
                    "support": support[i]}
        assert metrics["per_class"][name] == expected
    assert metrics["confusion"] == confusion_matrix(actual, predicted).tolist()


def test_bigram_baseline_matches_a_direct_count(tiny_project):
    root, _ = tiny_project
    train, test = TokenShards(root / "tokens", "train"), TokenShards(root / "tokens", "test")
    vocab, k = 512, 0.5
    bits = ngram.bigram_bits_per_token(train, test, vocab, k)
    tokens = np.concatenate(train.arrays).astype(np.int64)
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (tokens[:-1], tokens[1:]), 1)
    held = np.concatenate(test.arrays).astype(np.int64)
    p = (counts[held[:-1], held[1:]] + k) / (counts[held[:-1]].sum(1) + k * vocab)
    assert bits == pytest.approx(-np.log2(p).mean(), rel=1e-9)


def test_evaluate_writes_metrics_plots_and_a_self_contained_report(tiny_lm, trained, tmp_path):
    root, params = tiny_lm
    out, _, _ = trained
    metrics_dir = tmp_path / "metrics"
    (metrics_dir / "plots").mkdir(parents=True)
    for name in ("finetune_train.csv", "finetune_val.csv"):
        (metrics_dir / "plots" / name).write_bytes((out / "metrics" / "plots" / name).read_bytes())
    metrics = evaluate.run(parse_config(params), root / "lm", root / "tokens", out / "classifier",
                           root / "clean", metrics_dir, tmp_path / "reports" / "report.html")
    lm = metrics["language_model"]
    assert lm["bigram_bits_per_byte"] < lm["unigram_bits_per_byte"]
    test = read_examples(root / "tokens" / "labeled", "test")
    assert sum(sum(row) for row in metrics["classifier"]["confusion"]) == len(test)
    assert 0.5 < metrics["baseline"]["accuracy"] <= 1  # TF-IDF + LR beats chance (3 classes) on real text
    rows = (metrics_dir / "plots" / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == len(test) + 1
    assert json.loads((metrics_dir / "evaluate.json").read_text())["classifier"] == metrics["classifier"]
    tuned = metrics["baseline"]["tuned_on_val"]  # the baseline's C is the best of the grid on val
    assert tuned["C"] in params["evaluate"]["tfidf_c"] and tuned["class_weight"] in ("none", "balanced")
    assert lm["objective"] == "clm" and lm["ratio_to_bigram"] == pytest.approx(
        lm["test_bits_per_byte"] / lm["bigram_bits_per_byte"], abs=2e-3)
    report = (tmp_path / "reports" / "report.html").read_text()
    for section in ("Language model", "Sentiment classifier", "Word vectors", "Samples", "Built from"):
        assert section in report
    assert report.count("data:image/png;base64,") >= 4
    assert not re.search(r"(src|href)=['\"]https?:", report)  # nothing fetched from outside


def test_an_encoder_fine_tunes_and_is_scored_without_bits_per_byte(tiny_project, tmp_path):
    root, params = tiny_project
    params = copy.deepcopy(params)
    params["pretrain"] = {"objective": "mlm", "model": TINY_MODEL, "batch_size": 8, "max_steps": 20,
                          "warmup_steps": 2, "eval_every": 10, "eval_windows": 8, "checkpoint_every": 20,
                          "init_embeddings": NO_INPUT}
    params["evaluate"].update(pseudo_perplexity_windows=2)
    pretrain.run(parse_config(params), root / "tokens", root / "tokenizer", tmp_path / "lm", tmp_path / "ck",
                 tmp_path)
    params = finetune_params(params, tmp_path, epochs=4)
    tuned = finetune.run(parse_config(params), tmp_path / "lm", root / "tokens", tmp_path / "classifier",
                         tmp_path / "ckpt", tmp_path / "m")
    assert tuned["val_macro_f1"] > 0
    classifier = Classifier.load(tmp_path / "classifier")
    assert classifier.model.backbone.cfg.causal is False
    metrics = evaluate.run(parse_config(params), tmp_path / "lm", root / "tokens", tmp_path / "classifier",
                           root / "clean", tmp_path / "metrics", tmp_path / "report.html")
    lm = metrics["language_model"]
    assert lm["objective"] == "mlm" and "test_bits_per_byte" not in lm
    assert 0 <= lm["test_mlm_accuracy"] <= 1 and lm["test_pseudo_perplexity"] > 1
    assert metrics["samples"] == []  # an encoder does not generate
    assert "pseudo-perplexity" in (tmp_path / "report.html").read_text()


def test_classify_command_prints_label_and_probabilities(trained):
    out, _, _ = trained
    command = ["classify", "--model", str(out / "classifier"), "--json", "great flight"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip())
    assert line["label"] in line["probabilities"]
    assert sum(line["probabilities"].values()) == pytest.approx(1, abs=1e-3)


def test_missing_checkpoint_and_empty_labeled_set_are_refused(tiny_lm, tmp_path):
    root, params = tiny_lm
    with pytest.raises(InputError, match="no model here"):
        finetune.run(parse_config(finetune_params(params, tmp_path)), tmp_path / "nolm", root / "tokens",
                     tmp_path / "c", tmp_path / "k", tmp_path / "m")
    labeled = tmp_path / "tokens" / "labeled"
    labeled.mkdir(parents=True)
    schema = pa.schema([("ids", pa.list_(pa.uint16())), ("label", pa.int32())])
    with pa.OSFile(str(labeled / "train.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(schema.empty_table())
    with pytest.raises(InputError, match="labeled train split is empty"):
        read_examples(labeled, "train")
    result = CliRunner().invoke(app, ["classify", "--model", str(tmp_path / "nowhere"), "hello"])
    assert result.exit_code == 2 and "no checkpoint here" in result.output


def test_a_label_seen_in_test_but_never_in_train_is_refused(tiny_project, tmp_path):
    root, params = tiny_project
    table = pq.read_table(root / "clean" / "labeled.parquet").to_pylist()
    first_test = next(i for i, row in enumerate(table) if row["split"] == "test")
    table[first_test]["label"] = "sarcastic"
    (tmp_path / "clean").mkdir()
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "clean" / "labeled.parquet")
    (tmp_path / "clean" / "corpus.parquet").write_bytes((root / "clean" / "corpus.parquet").read_bytes())
    with pytest.raises(InputError, match=r"\['sarcastic'\] appear in test but never in train"):
        tokenize_all(parse_config(params), tmp_path / "clean", tmp_path, tmp_path)


def test_registered_classifier_serves_through_pyfunc(trained, tmp_path, monkeypatch, capfd):
    import mlflow.pyfunc
    import pandas as pd

    from pipeline import tracking
    from pipeline.config import Tracking

    out, _, _ = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # artifacts land under ./mlruns
    with tracking.stage_run("finetune", Tracking(experiment="t"), {}, {}, {}) as run, \
            warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        version = tracking.register_model(run, out / "classifier", "clf", "classifier")
    assert version == "1" and tracking.champion_version(run.client, "clf") == "1"  # the first is champion
    said = capfd.readouterr().err
    assert "CloudPickle" not in said and "Downloading artifacts" not in said  # a quiet log
    assert not [w for w in warned if "type hints" in str(w.message)]
    assert tracking.version_with_md5(run.client, "clf", tracking.path_md5(out / "classifier")) == "1"
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/clf@champion")
    texts = ["I love this airline", "my bag is lost again"]
    predictions = served.predict(pd.DataFrame({"text": texts}))
    labels, probs = Classifier.load(out / "classifier").predict(texts)
    assert predictions["label"].tolist() == labels
    columns = ["p_negative", "p_neutral", "p_positive"]
    np.testing.assert_allclose(predictions[columns].to_numpy(), probs, rtol=1e-5)
