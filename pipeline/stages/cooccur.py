"""Cooccur stage: co-occurrence counts over the train split, as Stanford GloVe's `cooccur` counts them.

Semantics (see ../shared/reference/glove-c-algorithm.md): units below `min_count` are dropped before
windowing (they take no window slot); each pair of units d apart (1 <= d <= window) within one
document adds 1/d to X[a, b] and to X[b, a], so X is symmetric and self pairs count twice. Windows
never cross a document boundary.

Units (`--unit`; the `cooccur` stage counts words, `cooccur_token` tokens): `word`, lowercased
`words.pattern` matches of the clean train text (the corpus, then with `words.include_labeled_train`
the labeled set's train texts, each text a document), or `token`, the BPE ids of the train token shards,
which hold the labeled train texts when `tokenize.include_labeled_train` (the row of a token is then
its id's vocabulary rank; `vocab.parquet` maps it back to the id).

Exact and memory-bounded (`pipeline.cooccurrence`): the weight 1/d is summed as the integer
lcm(1..window)/d, so sums do not depend on order and every value equals the exact rational rounded
once. Within `memory_mb`, pairs of frequent units are summed in place in a table (as GloVe C's), the
others in buffers that are sorted, reduced and spilled to disk when full; the table and the spills
are merged a block of rows at a time.

Where the work runs (`cooccur.executor`): `local` splits words in `workers` processes (each reading
every `workers`-th text) and counts batches of documents on `workers` threads, this process adding,
spilling and merging; `dask` sends texts, `batch_texts` (at most `batch_chars`) at a time, to the
cluster's workers to be split into words (this process joins the word ids), then batches of
documents, in turn, to each worker, which counts, adds and spills them where it is
(`pipeline.cooccurrence_cluster`); this process merges the workers' counts a block of rows at a
time. The output bytes are the same either way.

Outputs in `paths.cooccur/` (tokens: `paths.cooccur_token/`): `cooccur.parquet` (`row` int32,
`col` int32, `value` float64, sorted by row then col), `vocab.parquet` (`unit`, `count`, and
`token_id` for tokens; row i is unit i), and `metrics/cooccur.json` (`metrics/cooccur_token.json`).
"""

from __future__ import annotations

import array
import contextlib
import functools
import itertools
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.config import Config, project_root
from pipeline.configfamilies import Cooccur
from pipeline.cooccurrence import Batch, count_cooccurrences, document_batches
from pipeline.cooccurrence_cluster import count_on_cluster
from pipeline.executors import OrderedMap, dask_client, dask_map, prepare_stage_process, threaded_map
from pipeline.files import InputError, atomic_dir, write_json
from pipeline.shards import TokenShards, read_manifest
from pipeline.stagecli import stage_main
from pipeline.vectors import (
    COOCCUR_FILE,
    VOCAB_FILE,
    Vocabulary,
    train_texts,
    word_documents,
    word_tables,
    write_vocabulary,
)

IDS_PER_READ = 1 << 20  # word ids per read when counting (4 MiB; a block's batches take about 40x that)

Unit = Literal["word", "token"]
UNITS: tuple[Unit, ...] = ("word", "token")


# ---------------------------------------------------------------- units and vocabulary


@dataclass(frozen=True)
class WordIdsPart:
    """Some of the train texts as provisional ids in a flat int32 file, with each text's length and
    each id's id in the whole (`to_global`)."""

    path: Path
    lengths: np.ndarray
    to_global: np.ndarray


@dataclass(frozen=True)
class WordIds:
    """The train words read once: each word as a provisional id (order of first sight), stored in
    int32 files with each document's length, so counting needs no second pass over the text."""

    words: list[str]  # provisional id -> word
    parts: list[WordIdsPart]

    def counts(self) -> np.ndarray:
        counts = np.zeros(len(self.words), dtype=np.int64)
        for part in self.parts:
            with open(part.path, "rb") as f:
                while len(chunk := np.fromfile(f, np.int32, IDS_PER_READ)):
                    counts[part.to_global] += np.bincount(chunk, minlength=len(part.to_global))
        return counts

    def document_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Whole documents about `IDS_PER_READ` ids at a time: (ids, each document's start in them).
        Read, not mapped: a mapping would keep every page read so far resident."""
        for part in self.parts:
            offsets = np.concatenate([[0], np.cumsum(part.lengths)])
            first = 0
            with open(part.path, "rb") as f:
                while first < len(part.lengths):
                    last = max(int(np.searchsorted(offsets, offsets[first] + IDS_PER_READ, "right")) - 1,
                               first + 1)
                    f.seek(int(offsets[first]) * 4)  # int32
                    ids = np.fromfile(f, np.int32, int(offsets[last] - offsets[first]))
                    yield part.to_global[ids], offsets[first:last] - offsets[first]
                    first = last


def read_word_ids_part(tables: list[Path], pattern: str, part: int, parts: int,
                       path: Path) -> tuple[list[str], np.ndarray]:
    """Train texts `part`, `part + parts`, ... as ids in order of first sight in them, written to
    `path`; returns the words by id and each text's length."""
    first_seen: dict[str, int] = {}
    lengths: list[int] = []
    pending = array.array("i")  # int32, written IDS_PER_READ at a time: a write per document costs more
    with open(path, "wb") as out:
        for words in word_documents(tables, pattern, part, parts):
            new = set(words).difference(first_seen)
            first_seen.update(zip(new, range(len(first_seen), len(first_seen) + len(new)), strict=True))
            pending.extend(map(first_seen.__getitem__, words))
            lengths.append(len(words))
            if len(pending) >= IDS_PER_READ:
                pending.tofile(out)
                del pending[:]
        pending.tofile(out)
    return list(first_seen), np.array(lengths, dtype=np.int64)


def read_word_ids(tables: list[Path], pattern: str, directory: Path, workers: int) -> WordIds:
    """The train texts split into words by `workers` processes (the regex holds the GIL), each
    taking every `workers`-th text; their ids are joined into one numbering."""
    paths = [directory / f"word_ids-{part}.int32" for part in range(workers)]
    if workers == 1:
        results = [read_word_ids_part(tables, pattern, 0, 1, paths[0])]
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            results = list(pool.map(read_word_ids_part, *zip(*[(tables, pattern, part, workers, path)
                                                              for part, path in enumerate(paths)],
                                                             strict=True)))
    first_seen: dict[str, int] = {}
    parts = []
    for path, (words, lengths) in zip(paths, results, strict=True):
        to_global = np.array([first_seen.setdefault(word, len(first_seen)) for word in words], np.int32)
        parts.append(WordIdsPart(path, lengths, to_global))
    return WordIds(list(first_seen), parts)


def split_words(texts: list[str], pattern: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Texts as lowercased `pattern` matches (the work of one Dask task): the words in order of first
    sight, every word's index in them, each text's word count."""
    word = re.compile(pattern)
    first_seen: dict[str, int] = {}
    ids: list[int] = []
    lengths = []
    for text in texts:
        words = word.findall(text.lower())
        ids += [first_seen.setdefault(w, len(first_seen)) for w in words]
        lengths.append(len(words))
    return list(first_seen), np.array(ids, dtype=np.int32), np.array(lengths, dtype=np.int64)


def text_batches(texts: Iterable[str], max_texts: int, max_chars: int) -> Iterator[list[str]]:
    """`texts` in lists of at most `max_texts` texts and `max_chars` characters (or one longer text)."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        if batch and (len(batch) == max_texts or chars + len(text) > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(text)
        chars += len(text)
    if batch:
        yield batch


def read_word_ids_on_cluster(tables: list[Path], pattern: str, path: Path, cfg: Cooccur,
                             in_order: OrderedMap) -> WordIds:
    """The train texts split into words on a Dask cluster, a batch of texts per task, their ids
    joined here into one numbering in one file."""
    first_seen: dict[str, int] = {}
    lengths = []
    with open(path, "wb") as out:
        texts = text_batches(train_texts(*tables), cfg.batch_texts, cfg.batch_chars)
        for words, ids, text_lengths in in_order(split_words, texts, pattern):
            to_global = np.array([first_seen.setdefault(w, len(first_seen)) for w in words], dtype=np.int32)
            to_global[ids].tofile(out)
            lengths.append(text_lengths)
    identity = np.arange(len(first_seen), dtype=np.int32)
    return WordIds(list(first_seen), [WordIdsPart(path, np.concatenate([np.empty(0, np.int64), *lengths]),
                                                  identity)])


def word_vocabulary(word_ids: WordIds, cfg: Cooccur, tables: list[Path], pattern: str) -> Vocabulary:
    """Words with at least `min_count` train occurrences, by count descending, ties by the word."""
    if not word_ids.words:
        raise InputError(f"{', '.join(map(str, tables))}: train has no words (words.pattern {pattern!r})")
    counts, words = word_ids.counts(), word_ids.words
    kept = sorted(np.flatnonzero(counts >= cfg.min_count), key=lambda i: (-counts[i], words[i]))
    kept_ids = np.array(kept, dtype=np.int64)
    return Vocabulary([words[i] for i in kept], counts[kept_ids], provisional=kept_ids)


def token_vocabulary(shards: TokenShards, names: list[str], specials: set[int], cfg: Cooccur) -> Vocabulary:
    counts = np.zeros(len(names), dtype=np.int64)
    for document in shards.documents():
        counts += np.bincount(document, minlength=len(names))
    if not counts.any():
        raise InputError(f"{shards.directory}: the train split holds no tokens")
    counts[list(specials)] = 0
    kept = [i for i in np.argsort(-counts, kind="stable") if counts[i] >= cfg.min_count]
    return Vocabulary([names[i] for i in kept], counts[kept], np.array(kept, dtype=np.int64))


def check_vocabulary(vocab: Vocabulary, cfg: Cooccur, unit: Unit) -> None:
    if not len(vocab):
        raise InputError(f"no {unit} occurs at least cooccur.min_count={cfg.min_count} times in train")


def word_batches(word_ids: WordIds, vocab: Vocabulary, max_units: int) -> Iterator[Batch]:
    """Whole train documents as vocabulary rows (units outside the vocabulary dropped), about
    `max_units` rows a batch, with each row's document index; cut without a loop over documents."""
    assert vocab.provisional is not None
    row_of = np.full(len(word_ids.words), -1, dtype=np.int64)
    row_of[vocab.provisional] = np.arange(len(vocab))
    for ids, starts in word_ids.document_blocks():
        rows = row_of[ids]
        document = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(ids))))
        kept = rows >= 0
        rows, document = rows[kept], document[kept]
        ends = np.flatnonzero(np.append(document[1:] != document[:-1], True)) + 1  # of each document
        cuts = np.unique(ends[np.searchsorted(ends, np.arange(max_units, ends[-1] if len(ends) else 0,
                                                              max_units))])
        for first, last in itertools.pairwise([0, *cuts.tolist(), len(rows)]):
            yield rows[first:last], document[first:last]


def token_rows(shards: TokenShards, vocab: Vocabulary, id_count: int) -> Iterator[np.ndarray]:
    row_of = np.full(id_count, -1, dtype=np.int64)
    assert vocab.token_ids is not None
    row_of[vocab.token_ids] = np.arange(len(vocab))
    for document in shards.documents():
        rows = row_of[document]
        yield rows[rows >= 0]


# ---------------------------------------------------------------- the stage


def token_names(tokenizer_dir: Path, vocab_size: int) -> list[str]:
    """Token strings by id, from the tokenizer the shards were encoded with."""
    from tokenizers import Tokenizer

    path = tokenizer_dir / "tokenizer.json"
    if not path.exists():
        raise InputError(f"{path}: tokenizer not found (run the tokenize stage)")
    tokenizer = Tokenizer.from_file(str(path))
    return [tokenizer.id_to_token(i) or str(i) for i in range(vocab_size)]


def run(
    cfg: Config, clean_dir: Path, tokenizer_dir: Path, tokens_dir: Path, out_dir: Path, metrics_path: Path,
    unit: Unit = "word",
) -> dict[str, Any]:
    """Build the vocabulary and the co-occurrence triples of the train split; returns the metrics.
    `unit` word reads `clean_dir`; token reads `tokens_dir` and `tokenizer_dir`."""
    co = cfg.cooccur
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    workers = co.workers or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        client = None if co.executor == "local" else stack.enter_context(dask_client(workers, co.scheduler))
        in_order = stack.enter_context(threaded_map(workers)) if client is None else dask_map(client)
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=out_dir.parent)))
        if unit == "word":
            tables = word_tables(clean_dir, cfg.paths.given(cfg.words.include_labeled_train))
            if co.executor == "local":
                word_ids = read_word_ids(tables, cfg.words.pattern, scratch, workers)
            else:
                word_ids = read_word_ids_on_cluster(tables, cfg.words.pattern, scratch / "word_ids.int32", co,
                                                    in_order)
            vocab = word_vocabulary(word_ids, co, tables, cfg.words.pattern)
            check_vocabulary(vocab, co, unit)
            batches: Callable[[int], Iterable[Batch]] = functools.partial(word_batches, word_ids, vocab)
        else:
            manifest = read_manifest(tokens_dir)
            shards = TokenShards(tokens_dir, "train")
            names = token_names(tokenizer_dir, manifest["vocab_size"])
            specials = {manifest[k] for k in ("eot_id", "pad_id", "mask_id") if manifest.get(k) is not None}
            vocab = token_vocabulary(shards, names, specials, co)
            check_vocabulary(vocab, co, unit)
            documents = token_rows(shards, vocab, manifest["vocab_size"])
            batches = functools.partial(document_batches, documents)
        with atomic_dir(out_dir) as tmp:
            write_vocabulary(vocab, tmp / VOCAB_FILE)
            if client is None:
                counts = count_cooccurrences(batches, len(vocab), co, tmp / COOCCUR_FILE, scratch, in_order)
            else:
                counts = count_on_cluster(batches, len(vocab), co, tmp / COOCCUR_FILE, client)
    if not counts["nnz"]:
        raise InputError("no two in-vocabulary units share a document in train: the matrix is empty")
    metrics = {
        "unit": unit, "window": co.window, "min_count": co.min_count, "vocab_size": len(vocab),
        "nnz": counts["nnz"], "sum": round(counts["sum"], 6), "train_units_in_vocab": counts["units"],
    }
    write_json(metrics_path, metrics)
    # not in the metrics file: they depend on the machine (cores, memory budget), not on the data
    metrics["chunks"] = counts["chunks"]
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    return metrics


def execute(cfg: Config, unit: Unit = "word") -> str:
    """The stage as DVC runs it: `cooccur` on words, `cooccur_token` (`--unit token`) on BPE ids."""
    from pipeline import tracking

    prepare_stage_process(cfg.cooccur.executor)
    root = project_root()
    clean_dir, tokens_dir, tokenizer_dir = (root / p for p in (cfg.paths.clean, cfg.paths.tokens,
                                                                cfg.paths.tokenizer))
    word = unit == "word"
    stage = "cooccur" if word else "cooccur_token"
    out_dir = root / (cfg.paths.cooccur if word else cfg.paths.cooccur_token)
    metrics_path = root / cfg.paths.metrics / f"{stage}.json"
    inputs = {"clean": clean_dir} if word else {"tokens": tokens_dir, "tokenizer": tokenizer_dir}
    with tracking.stage_run(stage, cfg.tracking, cfg.cooccur.model_dump(), inputs,
                            {"cooccur": out_dir}) as run_log:
        metrics = run(cfg, clean_dir, tokenizer_dir, tokens_dir, out_dir, metrics_path, unit)
        run_log.log_metrics(tracking.numeric_leaves(metrics))
    return (f"{stage}: {metrics['unit']} vocabulary {metrics['vocab_size']}, nnz {metrics['nnz']}, "
            f"{metrics['seconds']} s -> {out_dir}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("cooccur", __doc__, execute, argv, choices={"unit": UNITS})


if __name__ == "__main__":
    sys.exit(main())
