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

Exact and memory-bounded: the weight 1/d is summed as the integer lcm(1..window)/d, so sums do not
depend on order and every value equals the exact rational rounded once. Pairs accumulate in a buffer
of `memory_mb`; a full buffer is sorted, reduced and spilled to disk; spilled chunks are merged a
block of rows at a time.

Outputs in `paths.cooccur/` (tokens: `paths.cooccur_token/`): `cooccur.parquet` (`row` int32,
`col` int32, `value` float64, sorted by row then col), `vocab.parquet` (`unit`, `count`, and
`token_id` for tokens; row i is unit i), and `metrics/cooccur.json` (`metrics/cooccur_token.json`).
"""

from __future__ import annotations

import array
import contextlib
import functools
import math
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, Cooccur, project_root
from pipeline.files import InputError, atomic_dir, write_json
from pipeline.progress import Progress
from pipeline.shards import TokenShards, read_manifest
from pipeline.stagecli import stage_main
from pipeline.vectors import (
    COOCCUR_FILE,
    VOCAB_FILE,
    Vocabulary,
    word_documents,
    word_tables,
    write_vocabulary,
)

BYTES_PER_PAIR = 8 * 3  # an int64 code, its sorted copy, and the keys and weights unpacked from it
DISTANCE_BITS = 5  # window <= 24 < 2**5
IDS_PER_READ = 1 << 22  # word ids per read when counting (16 MiB)

Unit = Literal["word", "token"]
UNITS: tuple[Unit, ...] = ("word", "token")


# ---------------------------------------------------------------- units and vocabulary


@dataclass(frozen=True)
class WordIds:
    """The train words read once: each word as a provisional id (order of first sight), stored in a
    flat int32 file with each document's length, so counting needs no second pass over the text."""

    words: list[str]  # provisional id -> word
    path: Path
    lengths: np.ndarray

    def counts(self) -> np.ndarray:
        counts = np.zeros(len(self.words), dtype=np.int64)
        with open(self.path, "rb") as f:
            while len(chunk := np.fromfile(f, np.int32, IDS_PER_READ)):
                counts += np.bincount(chunk, minlength=len(self.words))
        return counts

    def document_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Whole documents about `IDS_PER_READ` ids at a time: (ids, each document's start in them).
        Read, not mapped: a mapping would keep every page read so far resident."""
        offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        first = 0
        with open(self.path, "rb") as f:
            while first < len(self.lengths):
                last = max(int(np.searchsorted(offsets, offsets[first] + IDS_PER_READ, "right")) - 1,
                           first + 1)
                f.seek(int(offsets[first]) * 4)  # int32
                ids = np.fromfile(f, np.int32, int(offsets[last] - offsets[first]))
                yield ids, offsets[first:last] - offsets[first]
                first = last


def read_word_ids(tables: list[Path], pattern: str, path: Path) -> WordIds:
    first_seen: dict[str, int] = {}
    lengths: list[int] = []
    pending = array.array("i")  # int32, written IDS_PER_READ at a time: a write per document costs more
    with open(path, "wb") as out:
        for words in word_documents(tables, pattern):
            new = set(words).difference(first_seen)
            first_seen.update(zip(new, range(len(first_seen), len(first_seen) + len(new)), strict=True))
            pending.extend(map(first_seen.__getitem__, words))
            lengths.append(len(words))
            if len(pending) >= IDS_PER_READ:
                pending.tofile(out)
                del pending[:]
        pending.tofile(out)
    return WordIds(list(first_seen), path, np.array(lengths, dtype=np.int64))


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


def word_rows(word_ids: WordIds, vocab: Vocabulary) -> Iterator[np.ndarray]:
    """Each train document as vocabulary rows, units outside the vocabulary dropped."""
    assert vocab.provisional is not None
    row_of = np.full(len(word_ids.words), -1, dtype=np.int64)
    row_of[vocab.provisional] = np.arange(len(vocab))
    for ids, starts in word_ids.document_blocks():
        rows = row_of[ids]
        in_vocab = rows >= 0
        kept_before = np.concatenate([[0], np.cumsum(in_vocab)])  # in-vocabulary units before each id
        yield from np.split(rows[in_vocab], kept_before[starts[1:]])


def token_rows(shards: TokenShards, vocab: Vocabulary, id_count: int) -> Iterator[np.ndarray]:
    row_of = np.full(id_count, -1, dtype=np.int64)
    assert vocab.token_ids is not None
    row_of[vocab.token_ids] = np.arange(len(vocab))
    for document in shards.documents():
        rows = row_of[document]
        yield rows[rows >= 0]


# ---------------------------------------------------------------- counting


def weight_scale(window: int) -> int:
    """lcm(1..window): 1/d is scale // d units, exactly."""
    return math.lcm(*range(1, window + 1))


def code_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint32 when every packed code fits (V up to 11,585), which sorts 1.5x faster than uint64."""
    return np.uint32 if (vocab_size * vocab_size) << DISTANCE_BITS <= 2**32 else np.uint64


def window_pairs(rows: np.ndarray, document: np.ndarray, vocab_size: int, window: int) -> np.ndarray:
    """Every pair within `window` in the same document, both directions, packed as
    (row * V + col) << DISTANCE_BITS | d; `rows` is several documents concatenated, `document` their
    document index. Packing lets a plain sort (3x faster than an argsort) carry the distance along."""
    dtype = code_dtype(vocab_size)
    rows = rows.astype(dtype)
    codes = []
    for d in range(1, min(window, len(rows) - 1) + 1):
        same = document[:-d] == document[d:]
        left, right = rows[:-d][same], rows[d:][same]
        codes += [(left * vocab_size + right) << DISTANCE_BITS | d,
                  (right * vocab_size + left) << DISTANCE_BITS | d]
    return np.concatenate(codes) if codes else np.empty(0, dtype)


def reduce_codes(codes: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and their integer weight sums (scale // d per occurrence)."""
    codes = np.sort(codes)
    weight_of_distance = np.array([0] + [scale // d for d in range(1, 1 << DISTANCE_BITS)], dtype=np.int64)
    return sum_by_key(codes >> DISTANCE_BITS, weight_of_distance[codes & ((1 << DISTANCE_BITS) - 1)])


def sum_by_key(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys of sorted `keys` and the sum of each key's weights."""
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(weights, starts) if len(keys) else weights


def reduce_pairs(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge reduced chunks: `keys` is a concatenation of sorted runs, which a stable sort merges fast."""
    order = np.argsort(keys, kind="stable")
    return sum_by_key(keys[order], weights[order])


def document_batches(
    documents: Iterable[np.ndarray], max_units: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Documents concatenated into batches of about `max_units` units, with each unit's document index."""
    rows: list[np.ndarray] = []
    size = 0
    for document in documents:
        rows.append(document)
        size += len(document)
        if size >= max_units:
            yield _joined(rows)
            rows, size = [], 0
    if rows:
        yield _joined(rows)


def _joined(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    document = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    return np.concatenate(rows), document


def reduced_batch(batch: tuple[np.ndarray, np.ndarray], vocab_size: int, window: int,
                  scale: int) -> tuple[np.ndarray, np.ndarray]:
    rows, document = batch
    return reduce_codes(window_pairs(rows, document, vocab_size, window), scale)


class PairCounter:
    """Counts document batches in `workers` threads (NumPy's sort releases the GIL), each batch
    reduced to sorted (key, integer sum) runs; runs are merged and spilled as .npy when they fill
    their share of the memory. Memory: `workers` batches of pairs in flight plus one buffer of runs."""

    def __init__(
        self, vocab_size: int, window: int, memory_bytes: int, workers: int, spill_dir: Path
    ) -> None:
        self.vocab_size, self.window, self.scale = vocab_size, window, weight_scale(window)
        self.workers = workers
        self.max_pairs = max(int(memory_bytes) // BYTES_PER_PAIR // (workers + 1), 2 * window)
        self.spill_dir = spill_dir
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.spills: list[tuple[Path, Path]] = []
        self.units = 0

    @property
    def units_per_batch(self) -> int:
        return max(self.max_pairs // (2 * self.window), 1)

    def count(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], progress: Progress) -> None:
        reduce = functools.partial(reduced_batch, vocab_size=self.vocab_size, window=self.window,
                                   scale=self.scale)
        with ThreadPoolExecutor(self.workers) as pool:
            in_flight: deque[Future[tuple[np.ndarray, np.ndarray]]] = deque()
            for batch in batches:
                self.units += len(batch[0])
                in_flight.append(pool.submit(reduce, batch))
                progress.update(len(batch[0]))
                if len(in_flight) >= self.workers:
                    self.add_run(*in_flight.popleft().result())
            for future in in_flight:
                self.add_run(*future.result())

    def add_run(self, keys: np.ndarray, sums: np.ndarray) -> None:
        self.runs.append((keys, sums))
        self.buffered += len(keys)
        if self.buffered >= self.max_pairs:
            self.spill()

    def spill(self) -> None:
        if not self.buffered:
            return
        keys, sums = (np.concatenate(parts) for parts in zip(*self.runs, strict=True))
        keys, sums = reduce_pairs(keys, sums)
        self.runs, self.buffered = [], 0
        index = len(self.spills)
        paths = (self.spill_dir / f"keys-{index:05d}.npy", self.spill_dir / f"sums-{index:05d}.npy")
        np.save(paths[0], keys)
        np.save(paths[1], sums)
        self.spills.append(paths)

    def merged_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The reduced (keys, integer sums) in key order, a block of rows at a time. Spills are read
        a range at a time, never kept mapped, and only block boundaries are kept per spill, so memory
        stays at about one block whatever the number of spills."""
        self.spill()
        row_starts = np.arange(self.vocab_size + 1, dtype=np.int64) * self.vocab_size
        per_row = np.zeros(self.vocab_size, dtype=np.int64)
        for keys_path, _ in self.spills:
            per_row += np.diff(np.searchsorted(np.load(keys_path, mmap_mode="r"), row_starts))
        cuts = block_starts(per_row, self.max_pairs)
        bounds = [np.searchsorted(np.load(k, mmap_mode="r"), row_starts[cuts]) for k, _ in self.spills]
        layouts = [(npy_layout(k), npy_layout(s)) for k, s in self.spills]
        for block in range(len(cuts) - 1):
            parts = [(read_range(k, kl, b[block], b[block + 1]), read_range(s, sl, b[block], b[block + 1]))
                     for (k, s), (kl, sl), b in zip(self.spills, layouts, bounds, strict=True)]
            keys, sums = (np.concatenate(p) for p in zip(*parts, strict=True))
            yield (keys, sums) if len(parts) == 1 else reduce_pairs(keys, sums)


def block_starts(per_row: np.ndarray, max_entries: int) -> np.ndarray:
    """Row cuts [0, ..., rows] so each block of rows holds at most `max_entries` entries (at least one
    row)."""
    cuts, first = [0], 0
    while first < len(per_row):
        last, total = first + 1, per_row[first]
        while last < len(per_row) and total + per_row[last] <= max_entries:
            total += per_row[last]
            last += 1
        cuts.append(last)
        first = last
    return np.array(cuts, dtype=np.int64)


def npy_layout(path: Path) -> tuple[int, np.dtype]:
    """Where a 1-D .npy file's data starts, and its dtype."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        _, _, dtype = header(f)
        return f.tell(), dtype


def read_range(path: Path, layout: tuple[int, np.dtype], start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of a 1-D .npy file, read rather than mapped."""
    offset, dtype = layout
    with open(path, "rb") as f:
        f.seek(offset + int(start) * dtype.itemsize)
        return np.fromfile(f, dtype=dtype, count=int(stop - start))


def count_cooccurrences(
    documents: Iterable[np.ndarray], vocab_size: int, cfg: Cooccur, out_path: Path, spill_dir: Path
) -> dict[str, Any]:
    """Count over `documents` (vocabulary rows), write the triples to `out_path`; returns counts."""
    workers = cfg.workers or os.cpu_count() or 1
    counter = PairCounter(vocab_size, cfg.window, int(cfg.memory_mb * 2**20), workers, spill_dir)
    progress = Progress("cooccur", None, "unit")
    counter.count(document_batches(documents, counter.units_per_batch), progress)
    progress.close()
    schema = pa.schema([("row", pa.int32()), ("col", pa.int32()), ("value", pa.float64())])
    nnz, total = 0, 0
    with pq.ParquetWriter(out_path, schema) as writer:
        for keys, sums in counter.merged_blocks():
            if not len(keys):
                continue
            writer.write_table(pa.table({
                "row": (keys // vocab_size).astype(np.int32), "col": (keys % vocab_size).astype(np.int32),
                "value": sums / counter.scale,  # int64 / int: the exact rational, rounded once
            }, schema=schema))
            nnz += len(keys)
            total += int(sums.sum())
    return {"nnz": nnz, "sum": total / counter.scale, "units": counter.units, "chunks": len(counter.spills)}


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
    stack = contextlib.ExitStack()
    if unit == "word":
        tables = word_tables(clean_dir, cfg.paths.given(cfg.words.include_labeled_train))
        word_ids = read_word_ids(tables, cfg.words.pattern, Path(stack.enter_context(
            tempfile.TemporaryDirectory(dir=out_dir.parent))) / "word_ids.int32")
        vocab = word_vocabulary(word_ids, co, tables, cfg.words.pattern)
        check_vocabulary(vocab, co, unit)
        documents: Iterable[np.ndarray] = word_rows(word_ids, vocab)
    else:
        manifest = read_manifest(tokens_dir)
        shards = TokenShards(tokens_dir, "train")
        names = token_names(tokenizer_dir, manifest["vocab_size"])
        specials = {manifest[k] for k in ("eot_id", "pad_id", "mask_id") if manifest.get(k) is not None}
        vocab = token_vocabulary(shards, names, specials, co)
        check_vocabulary(vocab, co, unit)
        documents = token_rows(shards, vocab, manifest["vocab_size"])
    with stack, atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory(dir=tmp.parent) as spill:
        write_vocabulary(vocab, tmp / VOCAB_FILE)
        counts = count_cooccurrences(documents, len(vocab), co, tmp / COOCCUR_FILE, Path(spill))
    if not counts["nnz"]:
        raise InputError("no two in-vocabulary units share a document in train: the matrix is empty")
    metrics = {
        "unit": unit, "window": co.window, "min_count": co.min_count, "vocab_size": len(vocab),
        "nnz": counts["nnz"], "sum": round(counts["sum"], 6), "train_units_in_vocab": counts["units"],
        "chunks": counts["chunks"],
    }
    write_json(metrics_path, metrics)
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    return metrics


def execute(cfg: Config, unit: Unit = "word") -> str:
    """The stage as DVC runs it: `cooccur` on words, `cooccur_token` (`--unit token`) on BPE ids."""
    from pipeline import tracking

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
