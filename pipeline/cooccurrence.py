"""Exact, memory-bounded co-occurrence counting of documents of vocabulary rows (rows by frequency).

Each pair of rows d apart (1 <= d <= window) in one document adds 1/d to X[a, b] and to X[b, a],
summed as the integer lcm(1..window)/d, so sums do not depend on order and every value is the exact
rational rounded once. As in GloVe C, pairs of frequent rows are summed in place in a table (row a
keeps the columns b with (a + 1)(b + 1) <= a maximum product that fits a quarter of `memory_mb`);
the rest accumulate in pair buffers, which are sorted, reduced and spilled to disk when full. The
table and the spills are sorted runs, merged a block of rows at a time into the triples.
"""

from __future__ import annotations

import functools
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.configfamilies import Cooccur
from pipeline.progress import Progress

BYTES_PER_PAIR = 8 * 3  # an int64 code, its sorted copy, and the keys and weights unpacked from it
DISTANCE_BITS = 5  # window <= 24 < 2**5
TABLE_SHARE = 4  # the table takes 1/4 of the counting memory, the pair buffers the rest
MAX_TABLE_ENTRIES = 1 << 23  # 64 MiB: past that its random adds miss the cache more than sorting costs
MAX_BATCH_UNITS = 1 << 16  # larger batches gain nothing and leave workers idle
MAX_BUFFER_PAIRS = 1 << 20  # nor do larger buffers: one merge of everything at the end is slower

Batch = tuple[np.ndarray, np.ndarray]  # rows of whole documents, and each row's document index


def weight_scale(window: int) -> int:
    """lcm(1..window): 1/d is scale // d units, exactly."""
    return math.lcm(*range(1, window + 1))


def code_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint32 when every packed code fits (V up to 11,585), which sorts 1.5x faster than uint64."""
    return np.uint32 if (vocab_size * vocab_size) << DISTANCE_BITS <= 2**32 else np.uint64


def table_entries(max_product: int, vocab_size: int) -> int:
    return int(np.minimum(max_product // np.arange(1, vocab_size + 1), vocab_size).sum())


class PairTable:
    """GloVe C's bigram table: row a holds columns b < widths[a] = min(V, max_product // (a + 1)) at
    offsets[a] + b, so (a, b) is in the table exactly when (a + 1)(b + 1) <= max_product, a
    symmetric condition. On Zipfian text most pairs are (76% of the default text's at 64 MB)."""

    def __init__(self, vocab_size: int, max_entries: int) -> None:
        low, high = 0, vocab_size * vocab_size  # the largest product whose table fits
        while low < high:
            middle = (low + high + 1) // 2
            fits = table_entries(middle, vocab_size) <= max_entries
            low, high = (middle, high) if fits else (low, middle - 1)
        self.vocab_size, self.max_product = vocab_size, low
        widths = np.minimum(low // np.arange(1, vocab_size + 1), vocab_size)
        self.offsets = np.concatenate([[0], np.cumsum(widths)])
        self.sums = np.zeros(int(self.offsets[-1]), dtype=np.int64)

    def add(self, entries: list[tuple[int, np.ndarray]]) -> None:
        for weight, where in entries:
            np.add.at(self.sums, where, weight)

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        """The nonzero entries as (keys row * V + col, integer sums), in key order."""
        filled = np.flatnonzero(self.sums)
        rows = np.searchsorted(self.offsets, filled, side="right") - 1
        keys = rows * self.vocab_size + filled - self.offsets[rows]
        return keys.astype(code_dtype(self.vocab_size)), self.sums[filled]


def window_pairs(rows: np.ndarray, document: np.ndarray, table: PairTable, window: int,
                 scale: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Every pair within `window` in the same document, both directions: those in the table as
    (weight, entries) per distance, the others packed as (row * V + col) << DISTANCE_BITS | d;
    `rows` is several documents concatenated, `document` their document index. Packing lets a plain
    sort (3x faster than an argsort) carry the distance along."""
    size, dtype = table.vocab_size, code_dtype(table.vocab_size)
    codes, entries = [], []
    for d in range(1, min(window, len(rows) - 1) + 1):
        same = document[:-d] == document[d:]
        left, right = rows[:-d][same], rows[d:][same]
        tabled = (left + 1) * (right + 1) <= table.max_product
        a, b = left[tabled], right[tabled]
        entries.append((scale // d, np.concatenate([table.offsets[a] + b, table.offsets[b] + a])))
        a, b = left[~tabled].astype(dtype), right[~tabled].astype(dtype)
        codes += [(a * size + b) << DISTANCE_BITS | d, (b * size + a) << DISTANCE_BITS | d]
    return (np.concatenate(codes) if codes else np.empty(0, dtype)), entries


def reduce_codes(codes: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and their integer weight sums (scale // d per occurrence)."""
    codes = np.sort(codes)
    weight_of_distance = np.array([0] + [scale // d for d in range(1, 1 << DISTANCE_BITS)], dtype=np.int64)
    return sum_by_key(codes >> DISTANCE_BITS, weight_of_distance[codes & ((1 << DISTANCE_BITS) - 1)])


def sum_by_key(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys of sorted `keys` and the sum of each key's weights."""
    if not len(keys):
        return keys, weights
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(weights, starts)


def reduce_pairs(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge reduced chunks: `keys` is a concatenation of sorted runs, which a stable sort merges fast."""
    order = np.argsort(keys, kind="stable")
    return sum_by_key(keys[order], weights[order])


def document_batches(documents: Iterable[np.ndarray], max_units: int) -> Iterator[Batch]:
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


def counted_batch(batch: tuple[np.ndarray, np.ndarray], table: PairTable, window: int,
                  scale: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """A batch's pairs outside the table reduced to (keys, sums); those in it as entries to add."""
    codes, entries = window_pairs(*batch, table, window, scale)
    return *reduce_codes(codes, scale), entries


class PairCounter:
    """Counts document batches in `workers` threads (NumPy's sort releases the GIL): pairs in the
    table are added to it, the others reduced to sorted (key, integer sum) runs, which are merged and
    spilled as .npy (by a worker) when they fill their share of the memory. Memory: the table,
    `workers` batches of pairs in flight, a buffer of runs and one being spilled."""

    def __init__(
        self, vocab_size: int, window: int, memory_bytes: int, workers: int, spill_dir: Path
    ) -> None:
        self.vocab_size, self.window, self.scale = vocab_size, window, weight_scale(window)
        self.workers = workers
        self.table = PairTable(vocab_size, min(memory_bytes // TABLE_SHARE // 8, MAX_TABLE_ENTRIES))
        pair_bytes = memory_bytes - memory_bytes // TABLE_SHARE
        share = int(pair_bytes) // BYTES_PER_PAIR // (workers + 2)
        self.max_pairs = max(min(share, MAX_BUFFER_PAIRS), 2 * window)
        self.spill_dir = spill_dir
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.spills: list[tuple[Path, Path]] = []
        self.buffer_spills = 0
        self.spilling: Future[None] | None = None
        self.units = 0

    @property
    def units_per_batch(self) -> int:
        return min(max(self.max_pairs // (2 * self.window), 1), MAX_BATCH_UNITS)

    def count(self, batches: Iterable[Batch], progress: Progress) -> None:
        counted = functools.partial(counted_batch, table=self.table, window=self.window, scale=self.scale)
        with ThreadPoolExecutor(self.workers) as pool:
            in_flight: deque[Future[tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]]] = deque()
            for batch in batches:
                self.units += len(batch[0])
                in_flight.append(pool.submit(counted, batch))
                progress.update(len(batch[0]))
                if len(in_flight) >= self.workers:
                    self.add(*in_flight.popleft().result(), pool)
            for future in in_flight:
                self.add(*future.result(), pool)
            self.spill(pool)
            if self.spilling is not None:
                self.spilling.result()
        self.buffer_spills = len(self.spills)
        keys, sums = self.table.run()  # one more sorted run to merge
        if len(keys):
            self.spills.append(self.spill_paths(len(self.spills)))
            write_spill(self.spills[-1], keys, sums)

    def add(self, keys: np.ndarray, sums: np.ndarray, entries: list[tuple[int, np.ndarray]],
            pool: ThreadPoolExecutor) -> None:
        self.table.add(entries)  # in this thread only: np.add.at is not atomic
        self.runs.append((keys, sums))
        self.buffered += len(keys)
        if self.buffered >= self.max_pairs:
            self.spill(pool)

    def spill(self, pool: ThreadPoolExecutor) -> None:
        """The buffered runs merged and written by a worker while counting goes on; one at a time."""
        if not self.buffered:
            return
        keys, sums = (np.concatenate(parts) for parts in zip(*self.runs, strict=True))
        self.runs, self.buffered = [], 0
        if self.spilling is not None:
            self.spilling.result()
        paths = self.spill_paths(len(self.spills))
        self.spills.append(paths)
        self.spilling = pool.submit(lambda: write_spill(paths, *reduce_pairs(keys, sums)))

    def spill_paths(self, index: int) -> tuple[Path, Path]:
        return self.spill_dir / f"keys-{index:05d}.npy", self.spill_dir / f"sums-{index:05d}.npy"

    def merged_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The reduced (keys, integer sums) in key order, a block of rows at a time. Spills are read
        a range at a time, never kept mapped, and only block boundaries are kept per spill, so memory
        stays at about one block whatever the number of spills."""
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


def write_spill(paths: tuple[Path, Path], keys: np.ndarray, sums: np.ndarray) -> None:
    np.save(paths[0], keys)
    np.save(paths[1], sums)


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
    batches: Callable[[int], Iterable[Batch]], vocab_size: int, cfg: Cooccur, out_path: Path, spill_dir: Path
) -> dict[str, Any]:
    """Count over `batches(max_units)` (see `document_batches`), write the triples to `out_path`;
    returns counts."""
    workers = cfg.workers or os.cpu_count() or 1
    counter = PairCounter(vocab_size, cfg.window, int(cfg.memory_mb * 2**20), workers, spill_dir)
    progress = Progress("cooccur", None, "unit")
    counter.count(batches(counter.units_per_batch), progress)
    progress.close()
    schema = pa.schema([("row", pa.int32()), ("col", pa.int32()), ("value", pa.float64())])
    nnz, total = 0, 0
    # a block is written (Arrow releases the GIL) while the next one is merged
    with pq.ParquetWriter(out_path, schema) as writer, ThreadPoolExecutor(1) as background:
        written: Future[None] | None = None
        for keys, sums in counter.merged_blocks():
            if not len(keys):
                continue
            table = pa.table({
                "row": (keys // vocab_size).astype(np.int32), "col": (keys % vocab_size).astype(np.int32),
                "value": sums / counter.scale,  # int64 / int: the exact rational, rounded once
            }, schema=schema)
            if written is not None:
                written.result()
            written = background.submit(writer.write_table, table)
            nnz += len(keys)
            total += int(sums.sum())
        if written is not None:
            written.result()
    return {"nnz": nnz, "sum": total / counter.scale, "units": counter.units, "chunks": counter.buffer_spills}
