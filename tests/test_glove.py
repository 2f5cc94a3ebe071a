"""The glove stage: the C code's update rule, determinism, outputs, benchmarks and bad inputs."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr

from pipeline import wordbench
from pipeline.config import parse_config
from pipeline.files import InputError, resolve_package_path
from pipeline.stages import cooccur, glove
from pipeline.vectors import TEXT_FILE, VECTORS_FILE, VOCAB_FILE, read_vocabulary


def c_reference_epoch(params: glove.Parameters, records: list[tuple[int, int, float]], eta: float,
                      x_max: float, alpha: float, clip: float) -> float:
    """glove.c's inner loop for one thread, transcribed: one record at a time, in double precision."""
    table, squares = params.table.double().tolist(), params.squares.double().tolist()
    vocab = params.vocab_size
    cost = 0.0
    for i, j, x in records:
        w, c, gw, gc = table[i], table[vocab + j], squares[i], squares[vocab + j]
        dim = len(w) - 1  # the bias is the last column
        diff = sum(w[k] * c[k] for k in range(dim)) + w[dim] + c[dim] - math.log(x)
        fdiff = diff if x > x_max else (x / x_max) ** alpha * diff
        cost += 0.5 * fdiff * diff
        for k in range(dim):
            t1 = eta * max(-clip, min(clip, fdiff * c[k]))
            t2 = eta * max(-clip, min(clip, fdiff * w[k]))
            w[k] -= t1 / math.sqrt(gw[k])
            c[k] -= t2 / math.sqrt(gc[k])
            gw[k] += t1 * t1
            gc[k] += t2 * t2
        w[dim] -= fdiff / math.sqrt(gw[dim])
        c[dim] -= fdiff / math.sqrt(gc[dim])
        gw[dim] += fdiff * fdiff
        gc[dim] += fdiff * fdiff
    params.state = torch.cat([torch.tensor(table), torch.tensor(squares)], 1)
    return cost / len(records)


def test_one_record_batches_follow_the_c_update(tiny_project):
    cfg = parse_config(tiny_project[1]).glove.model_copy(update={"batch_size": 1, "x_max": 3.0})
    records = [(0, 1, 2.5), (1, 0, 2.5), (2, 2, 6.0), (0, 2, 0.5), (1, 2, 1.0), (0, 1, 2.5)]
    rows, cols, x = (torch.tensor(v) for v in zip(*records, strict=True))
    triples = glove.Triples(rows, cols, torch.log(x.double()).float(),
                            torch.clamp((x.double() / cfg.x_max) ** cfg.alpha, max=1).float())
    ours = glove.Parameters.initial(3, 4, seed=7, device=torch.device("cpu"))
    reference = glove.Parameters.initial(3, 4, seed=7, device=torch.device("cpu"))
    for _ in range(3):
        loss = glove.train_epoch(ours, triples, torch.arange(len(records)), cfg)
        expected = c_reference_epoch(reference, records, cfg.learning_rate, cfg.x_max, cfg.alpha,
                                     cfg.grad_clip)
        assert loss == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(ours.table, reference.table.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.squares, reference.squares.float(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def word_cooccur(small_project, tmp_path_factory) -> Path:
    root, params = small_project
    out = tmp_path_factory.mktemp("co") / "co"
    params = copy.deepcopy(params)
    params["cooccur"].update(min_count=2)
    cooccur.run(parse_config(params), root / "clean", root / "tokenizer", root / "tokens", out,
                out.parent / "co.json")
    return out


def run_glove(params: dict[str, Any], cooccur_dir: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    params = copy.deepcopy(params)
    if "benchmarks" in overrides:
        params["word_eval"]["benchmarks"] = overrides.pop("benchmarks")
    params["glove"].update(epochs=4, dim=16, **overrides)
    return glove.run(parse_config(params), cooccur_dir, out / "glove", out / "metrics")


def test_same_seed_gives_identical_vectors_and_the_loss_falls(small_project, word_cooccur, tmp_path):
    params = small_project[1]
    first = run_glove(params, word_cooccur, tmp_path / "a")
    second = run_glove(params, word_cooccur, tmp_path / "b")
    a = (tmp_path / "a" / "glove" / VECTORS_FILE).read_bytes()
    assert a == (tmp_path / "b" / "glove" / VECTORS_FILE).read_bytes()
    losses = [h["loss"] for h in first["history"]]
    assert losses == [h["loss"] for h in second["history"]]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    other = run_glove(params, word_cooccur, tmp_path / "c", seed=2)
    assert other["loss"] != first["loss"]


def test_outputs_text_format_plot_and_benchmarks(small_project, word_cooccur, tmp_path):
    metrics = run_glove(small_project[1], word_cooccur, tmp_path)
    vocab = read_vocabulary(word_cooccur / VOCAB_FILE)
    vectors = load_file(tmp_path / "glove" / VECTORS_FILE)["vectors"]
    assert vectors.shape == (len(vocab), 16)
    lines = (tmp_path / "glove" / TEXT_FILE).read_text(encoding="utf-8").splitlines()
    assert [ln.split(" ")[0] for ln in lines] == vocab.units
    np.testing.assert_allclose([float(v) for v in lines[0].split(" ")[1:]], vectors[0].numpy(), atol=1e-6)
    plot = (tmp_path / "metrics" / "plots" / "glove_loss.csv").read_text().splitlines()
    assert plot[0] == "epoch,loss" and len(plot) == 5
    files = parse_config(small_project[1]).word_eval.benchmarks
    for name, total in (("wordsim353", 353), ("simlex999", 999)):
        assert len(wordbench.read_pairs(resolve_package_path(getattr(files, name)))) == total
        assert metrics[name]["pairs"] == round(metrics[name]["coverage"] * total) > 0
    assert math.isfinite(metrics["wordsim353"]["spearman"])
    assert metrics["analogy"]["questions"] >= 0
    assert set(metrics["neighbours"]) <= set(small_project[1]["word_eval"]["probe_words"])


def test_token_unit_vectors_carry_their_token_ids(small_project, tmp_path):
    root, params = small_project
    params = copy.deepcopy(params)
    params["cooccur"].update(min_count=2)
    cooccur.run(parse_config(params), root / "clean", root / "tokenizer", root / "tokens", tmp_path / "co",
                tmp_path / "co.json", unit="token")
    metrics = run_glove(params, tmp_path / "co", tmp_path)
    saved = load_file(tmp_path / "glove" / VECTORS_FILE)
    vocab = read_vocabulary(tmp_path / "co" / VOCAB_FILE)
    assert saved["token_ids"].tolist() == vocab.token_ids.tolist()
    assert metrics["unit"] == "token" and "wordsim353" not in metrics


def test_missing_evaluation_file_is_refused_before_training(small_project, word_cooccur, tmp_path):
    with pytest.raises(InputError, match=r"nowhere\.tsv: evaluation file not found"):
        run_glove(small_project[1], word_cooccur, tmp_path,
                  benchmarks={"wordsim353": str(tmp_path / "nowhere.tsv")})
    assert not (tmp_path / "glove").exists()


def test_missing_cooccurrences_are_refused(small_project, tmp_path):
    with pytest.raises(InputError, match="run the cooccur stage"):
        run_glove(small_project[1], tmp_path / "absent", tmp_path)


def test_pair_similarity_and_analogies_on_known_vectors(tmp_path):
    # b - a + c lands exactly on d for the first question; the second has an unknown word
    words = ["man", "king", "woman", "queen", "apple", "pear"]
    vectors = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1], [5, -1, 2], [4, -1, 3]], dtype=float)
    (tmp_path / "q.txt").write_text(": royal\nman king woman queen\nman king woman prince\n")
    pairs_text = "# header\nman\tking\t3\nKing\tqueen\t7\napple\tpear\t9\nman\tzebra\t1\n"
    (tmp_path / "pairs.tsv").write_text(pairs_text)
    found = wordbench.WordVectors(words, vectors)
    analogy = wordbench.analogy_accuracy(found, tmp_path / "q.txt")
    assert analogy == {"accuracy": 1.0, "coverage": 0.5, "questions": 1}
    pairs = wordbench.pair_similarity(found, tmp_path / "pairs.tsv")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = [unit[0] @ unit[1], unit[1] @ unit[3], unit[4] @ unit[5]]
    assert pairs["spearman"] == pytest.approx(spearmanr(cosines, [3, 7, 9]).statistic, abs=1e-4)
    assert pairs["coverage"] == 0.75 and pairs["pairs"] == 3
