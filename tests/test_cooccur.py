"""The cooccur stage against a brute-force count of the same real text, and its bad inputs."""

from __future__ import annotations

import copy
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import NO_INPUT

from pipeline import cooccurrence
from pipeline.config import ConfigError, parse_config
from pipeline.cooccurrence import PairTable
from pipeline.files import InputError, file_digest
from pipeline.shards import TokenShards, read_manifest
from pipeline.stages import cooccur
from pipeline.vectors import COOCCUR_FILE, CORPUS_FILE, LABELED_FILE, VOCAB_FILE, train_texts


def brute_force(documents: list[list[Any]], min_count: int, window: int) -> tuple[list[Any], dict]:
    """GloVe's cooccur.c, literally: drop rare units, then add 1/d both ways for every pair in reach."""
    counts = Counter(u for doc in documents for u in doc)
    vocab = sorted((u for u, c in counts.items() if c >= min_count), key=lambda u: (-counts[u], u))
    row = {u: i for i, u in enumerate(vocab)}
    matrix: dict[tuple[int, int], Fraction] = {}
    for doc in documents:
        kept = [row[u] for u in doc if u in row]
        for j in range(len(kept)):
            for k in range(max(0, j - window), j):
                for pair in ((kept[k], kept[j]), (kept[j], kept[k])):
                    matrix[pair] = matrix.get(pair, Fraction(0)) + Fraction(1, j - k)
    return vocab, matrix


def stage_matrix(out_dir: Path) -> tuple[list[str], dict]:
    table = pq.read_table(out_dir / COOCCUR_FILE).to_pydict()
    vocab = pq.read_table(out_dir / VOCAB_FILE).column("unit").to_pylist()
    return vocab, {(r, c): v for r, c, v in zip(table["row"], table["col"], table["value"], strict=True)}


def run_cooccur(root: Path, params: dict[str, Any], out: Path, unit: str = "word",
                **overrides: Any) -> dict[str, Any]:
    params = copy.deepcopy(params)
    if not overrides.pop("include_labeled_train", True):  # on in the params given
        params["words"]["include_labeled_train"] = NO_INPUT
    params["cooccur"].update(overrides)
    return cooccur.run(parse_config(params), root / "clean", root / "tokenizer", root / "tokens", out,
                       out.parent / f"{out.name}.json", unit)


@pytest.mark.parametrize(("window", "labeled", "workers"), [(15, False, 3), (3, True, 1)])
def test_word_counts_equal_a_brute_force_count_exactly(small_project, tmp_path, monkeypatch, window, labeled,
                                                       workers):
    root, params = small_project
    monkeypatch.setattr(cooccur, "IDS_PER_READ", 997)  # word ids written and read in many blocks
    # 10 KiB of pair buffer: counted in several spilled chunks, merged in several blocks; the text
    # split into words by `workers` processes
    metrics = run_cooccur(root, params, tmp_path / "co", window=window, memory_mb=0.01,
                          include_labeled_train=labeled, workers=workers)
    assert metrics["chunks"] > 1
    tables = [root / "clean" / CORPUS_FILE] + labeled * [root / "clean" / LABELED_FILE]
    texts = list(train_texts(*tables))  # each labeled train text its own document
    pattern = re.compile(params["words"]["pattern"])
    vocab, expected = brute_force([pattern.findall(t.lower()) for t in texts], 5, window)
    got_vocab, got = stage_matrix(tmp_path / "co")
    assert got_vocab == vocab
    assert len(got) == len(expected) == metrics["nnz"]
    assert all(got[key] == float(value) for key, value in expected.items())  # exact, not approximately
    assert all(got[(c, r)] == v for (r, c), v in got.items())  # symmetric
    assert metrics["sum"] == pytest.approx(float(sum(expected.values())), abs=1e-6)  # rounded to 6 places


def test_token_counts_equal_a_brute_force_count_exactly(small_project, tmp_path):
    root, params = small_project
    metrics = run_cooccur(root, params, tmp_path / "co", unit="token", window=4, min_count=3, memory_mb=0.05)
    shards = TokenShards(root / "tokens", "train")
    manifest = read_manifest(root / "tokens")
    specials = {manifest["eot_id"], manifest["pad_id"]}
    documents = [[int(t) for t in doc if int(t) not in specials] for doc in shards.documents()]
    ids, expected = brute_force(documents, 3, 4)
    token_ids = pq.read_table(tmp_path / "co" / VOCAB_FILE).column("token_id").to_pylist()
    _, got = stage_matrix(tmp_path / "co")
    assert sorted(token_ids) == sorted(ids)  # the same units (equal counts may rank differently)
    rank = {token: i for i, token in enumerate(ids)}
    remap = [rank[t] for t in token_ids]  # stage row -> brute-force row
    assert len(got) == len(expected) == metrics["nnz"]
    assert all(float(expected[(remap[r], remap[c])]) == v for (r, c), v in got.items())


@pytest.mark.parametrize(("vocab_size", "max_entries"), [(50, 200), (1000, 12_345), (30, 10_000)])
def test_the_pair_table_holds_exactly_the_pairs_whose_rank_product_fits(vocab_size, max_entries):
    table = PairTable(vocab_size, max_entries)
    assert len(table.sums) <= max_entries and table.max_product <= vocab_size**2
    assert (len(table.sums) == vocab_size**2) == (max_entries >= vocab_size**2)  # the largest that fits
    a, b = np.meshgrid(np.arange(vocab_size), np.arange(vocab_size), indexing="ij")
    inside = (a + 1) * (b + 1) <= table.max_product
    assert (inside == inside.T).all()  # a pair's two directions go the same way
    where = table.offsets[a[inside]] + b[inside]
    assert sorted(where.tolist()) == list(range(len(table.sums)))  # one entry each, none shared
    table.add(where, np.full(len(where), 3))
    table.add(where[:7], np.full(7, 5))
    keys, sums = table.run()
    assert (keys == a[inside] * vocab_size + b[inside]).all()  # in key order
    assert sums.tolist() == [8] * 7 + [3] * (len(where) - 7)


def test_memory_budget_does_not_change_the_output(tiny_project, tmp_path, monkeypatch):
    root, params = tiny_project
    monkeypatch.setattr(cooccurrence, "ROW_GROUP_ENTRIES", 1000)
    small = run_cooccur(root, params, tmp_path / "small", memory_mb=0.5)
    monkeypatch.setattr(cooccurrence, "MAX_BUFFER_PAIRS", 1 << 40)  # one buffer holds every pair
    large = run_cooccur(root, params, tmp_path / "large", memory_mb=1024)
    assert small["chunks"] > 1 and large["chunks"] == 1
    groups = pq.ParquetFile(tmp_path / "small" / COOCCUR_FILE).metadata.num_row_groups
    assert groups == -(-small["nnz"] // 1000) > 1  # full row groups, whatever the blocks merged
    for name in (COOCCUR_FILE, VOCAB_FILE):  # the same bytes, however many spills and blocks
        assert file_digest(tmp_path / "small" / name) == file_digest(tmp_path / "large" / name)


def test_window_below_one_is_refused(tiny_project):
    params = copy.deepcopy(tiny_project[1])
    params["cooccur"]["window"] = 0
    with pytest.raises(ConfigError, match=r"cooccur\.window"):
        parse_config(params)


def test_empty_vocabulary_is_refused(tiny_project, tmp_path):
    root, params = tiny_project
    with pytest.raises(InputError, match="min_count=1000000 "):
        run_cooccur(root, params, tmp_path / "co", min_count=1_000_000)
    assert not (tmp_path / "co").exists()  # nothing half-written


def test_empty_train_split_is_refused(tiny_project, tmp_path):
    root, params = tiny_project
    table = pq.read_table(root / "clean" / CORPUS_FILE)
    (tmp_path / "clean").mkdir()
    pq.write_table(table.filter(pq.read_table(root / "clean" / CORPUS_FILE)
                                .column("split").to_numpy(zero_copy_only=False) != "train"),
                   tmp_path / "clean" / CORPUS_FILE)
    params = copy.deepcopy(params)
    params["words"]["include_labeled_train"] = NO_INPUT
    with pytest.raises(InputError, match="train has no words"):
        cooccur.run(parse_config(params), tmp_path / "clean", root / "tokenizer", root / "tokens",
                    tmp_path / "co", tmp_path / "co.json")


def test_word_splitting_tasks_are_bounded_by_texts_and_by_characters() -> None:
    texts = ["a" * n for n in [5, 1, 30, 2, 2, 2, 2, 9, 1]]
    batches = list(cooccur.text_batches(texts, 3, 10))
    assert [t for batch in batches for t in batch] == texts  # every text once, in order
    assert [len(batch) for batch in batches] == [2, 1, 3, 1, 2]  # the 30-char text travels alone
    assert all(len(b) <= 3 and (len(b) == 1 or sum(map(len, b)) <= 10) for b in batches)
