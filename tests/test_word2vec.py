"""The word2vec stage: train words only, exact vocabulary, text format, reruns, bad params."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import NO_INPUT
from safetensors.numpy import load_file

from pipeline.config import parse_config, project_root
from pipeline.stages import word2vec
from pipeline.vectors import CORPUS_FILE, LABELED_FILE, TEXT_FILE, VECTORS_FILE, read_text_vectors

REPO = project_root(Path(__file__).parent)


def run_word2vec(root: Path, params: dict[str, Any], out: Path, method: word2vec.Method = "skipgram",
                 **overrides: Any) -> dict[str, Any]:
    params = copy.deepcopy(params)
    params["word2vec"].update(dim=16, epochs=2, workers=1, **overrides)
    return word2vec.run(parse_config(params), root / "clean", out / method, out / "metrics", method)


def words_by_split(root: Path, pattern: str) -> dict[str, Counter[str]]:
    found: dict[str, Counter[str]] = {"train": Counter(), "val": Counter(), "test": Counter()}
    word = re.compile(pattern)
    for table in (CORPUS_FILE, LABELED_FILE):
        rows = pq.read_table(root / "clean" / table, columns=["text", "split"]).to_pydict()
        for text, split in zip(rows["text"], rows["split"], strict=True):
            found[split].update(word.findall(text.lower()))
    return found


def test_the_vocabulary_is_the_train_words_seen_min_count_times(tiny_project, tmp_path):
    root, params = tiny_project
    metrics = run_word2vec(root, params, tmp_path)
    vocab, _ = read_text_vectors(tmp_path / "skipgram" / TEXT_FILE)
    counts = words_by_split(root, params["words"]["pattern"])
    expected = {w for w, n in counts["train"].items() if n >= params["word2vec"]["min_count"]}
    assert set(vocab) == expected
    assert metrics["vocab_size"] == len(expected)
    heldout_only = (set(counts["val"]) | set(counts["test"])) - set(counts["train"])
    frequent_heldout = [w for w in heldout_only if counts["val"][w] + counts["test"][w] >= 5]
    assert frequent_heldout  # the check below means something
    assert not heldout_only & set(vocab)
    assert [counts["train"][w] for w in vocab] == sorted((counts["train"][w] for w in vocab), reverse=True)


def test_vectors_round_trip_through_the_text_format(tiny_project, tmp_path):
    root, params = tiny_project
    run_word2vec(root, params, tmp_path, "cbow")
    words, from_text = read_text_vectors(tmp_path / "cbow" / TEXT_FILE)
    saved = load_file(str(tmp_path / "cbow" / VECTORS_FILE))["vectors"]
    assert from_text.shape == saved.shape == (len(words), 16)
    np.testing.assert_allclose(from_text, saved, atol=5e-7)


def test_one_worker_reruns_give_identical_vectors(tiny_project, tmp_path):
    root, params = tiny_project
    first = run_word2vec(root, params, tmp_path / "a")
    run_word2vec(root, params, tmp_path / "b")
    a, b = ((tmp_path / side / "skipgram" / VECTORS_FILE).read_bytes() for side in "ab")
    assert a == b
    other = run_word2vec(root, params, tmp_path / "c", seed=2)
    assert (tmp_path / "c" / "skipgram" / VECTORS_FILE).read_bytes() != a
    assert {"wordsim353", "simlex999", "analogy", "neighbours", "words_per_second"} <= set(first)
    assert other["vocab_size"] == first["vocab_size"]


def test_labeled_texts_count_only_when_asked(tiny_project, tmp_path):
    root, params = tiny_project
    params = copy.deepcopy(params)
    params["words"]["include_labeled_train"] = NO_INPUT
    run_word2vec(root, params, tmp_path)
    vocab, _ = read_text_vectors(tmp_path / "skipgram" / TEXT_FILE)
    corpus = pq.read_table(root / "clean" / CORPUS_FILE, columns=["text", "split"]).to_pydict()
    word = re.compile(params["words"]["pattern"])
    counts = Counter(w for text, split in zip(corpus["text"], corpus["split"], strict=True)
                     if split == "train" for w in word.findall(text.lower()))
    assert set(vocab) == {w for w, n in counts.items() if n >= params["word2vec"]["min_count"]}


@pytest.mark.parametrize(("key", "value"), [("window", 0), ("negative", -1)])
def test_bad_params_are_refused_with_one_line_naming_the_key(tmp_path, key, value):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["word2vec"][key] = value
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "pipeline.stages.word2vec", "--params", str(bad)],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert f"word2vec.{key}" in result.stderr


def test_the_report_puts_every_method_in_one_table(tiny_project, tmp_path):
    from pipeline.report import embedding_tables

    root, params = tiny_project
    skipgram = run_word2vec(root, params, tmp_path)
    glove_like = {**skipgram, "seconds_per_epoch": 0.5, "epochs": 4}
    del glove_like["train_seconds"]
    html = embedding_tables({"glove": glove_like, "skipgram": skipgram})
    assert html.count("<tr>") >= 3 and "GloVe" in html and "skip-gram" in html
    assert f"<td>{skipgram['wordsim353']['spearman']}</td>" in html
    assert "<td>2.0</td>" in html  # GloVe's seconds: its epochs
