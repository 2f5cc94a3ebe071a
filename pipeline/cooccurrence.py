"""Exact, memory-bounded co-occurrence counting of documents of vocabulary rows (rows by frequency).

Each pair of rows d apart (1 <= d <= window) in one document adds 1/d to X[a, b] and to X[b, a],
summed as the integer lcm(1..window)/d, so sums do not depend on order and every value is the exact
rational rounded once. As in GloVe C, pairs of frequent rows are summed in place in a table (row a
keeps the columns b with (a + 1)(b + 1) <= a maximum product that fits a quarter of `memory_mb`);
the rest accumulate in pair buffers, which are sorted, reduced and spilled to disk when full. The
table and the spills are sorted runs, merged a block of rows at a time into the triples.

A batch of documents is counted by `counted_batch` (it needs only the table's `TableLayout`) into
sorted, reduced runs: its pairs outside the table, and its additions to table entries; a
`PairCounter` adds and spills them: this process's, for batches counted on its threads, or, on a
Dask cluster, each worker's own (`pipeline.cooccurrence_cluster`). The triples are written in row
groups of `ROW_GROUP_ENTRIES`, so the file's bytes depend on the counts alone, not on how many
workers, batches or spills produced them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.configfamilies import Cooccur
from pipeline.executors import OrderedMap
from pipeline.progress import Progress

BYTES_PER_PAIR = 8 * 3  # an int64 code, its sorted copy, and the keys and weights unpacked from it
DISTANCE_BITS = 5  # window <= 24 < 2**5
TABLE_SHARE = 4  # the table takes 1/4 of the counting memory, the pair buffers the rest
MAX_TABLE_ENTRIES = 1 << 23  # 64 MiB: past that its random adds miss the cache more than sorting costs
MAX_BATCH_UNITS = 1 << 16  # larger batches gain nothing and leave workers idle
MAX_BUFFER_PAIRS = 1 << 20  # nor do larger buffers: one merge of everything at the end is slower
ROW_GROUP_ENTRIES = 1 << 20  # triples per row group of the output (16 MiB of row, col and value)

Batch = tuple[np.ndarray, np.ndarray]  # rows of whole documents, and each row's document index


def weight_scale(window: int) -> int:
    """lcm(1..window): 1/d is scale // d units, exactly."""
    return math.lcm(*range(1, window + 1))


def code_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint32 when every packed code fits (V up to 11,585), which sorts 1.5x faster than uint64."""
    return np.uint32 if (vocab_size * vocab_size) << DISTANCE_BITS <= 2**32 else np.uint64


def table_entries(max_product: int, vocab_size: int) -> int:
    return int(np.minimum(max_product // np.arange(1, vocab_size + 1), vocab_size).sum())


@dataclass(frozen=True)
class TableLayout:
    """What counting a batch needs: GloVe C's bigram table's shape (row a holds columns b <
    min(V, max_product // (a + 1)) at offsets[a] + b), the window and the integer weight scale."""

    vocab_size: int
    max_product: int
    offsets: np.ndarray
    window: int
    scale: int


class PairTable:
    """GloVe C's bigram table: (a, b) is in the table exactly when (a + 1)(b + 1) <= max_product, a
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

    def add(self, positions: np.ndarray, sums: np.ndarray) -> None:
        """Adds `sums` at `positions`, which are unique (a reduced run)."""
        self.sums[positions] += sums

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        """The nonzero entries as (keys row * V + col, integer sums), in key order."""
        filled = np.flatnonzero(self.sums)
        rows = np.searchsorted(self.offsets, filled, side="right") - 1
        keys = rows * self.vocab_size + filled - self.offsets[rows]
        return keys.astype(code_dtype(self.vocab_size)), self.sums[filled]


def window_pairs(rows: np.ndarray, document: np.ndarray,
                 layout: TableLayout) -> tuple[np.ndarray, np.ndarray]:
    """Every pair within the window in the same document, both directions, as codes: those outside
    the table (row * V + col) << DISTANCE_BITS | d, those in it (its entry) << DISTANCE_BITS | d;
    `rows` is several documents concatenated, `document` their document index. Packing lets a plain
    sort (3x faster than an argsort) carry the distance along."""
    size, dtype = layout.vocab_size, code_dtype(layout.vocab_size)
    entry_dtype = np.uint32 if int(layout.offsets[-1]) << DISTANCE_BITS <= 2**32 else np.uint64
    codes, tabled_codes = [], []
    for d in range(1, min(layout.window, len(rows) - 1) + 1):
        same = document[:-d] == document[d:]
        left, right = rows[:-d][same], rows[d:][same]
        tabled = (left + 1) * (right + 1) <= layout.max_product
        a, b = left[tabled], right[tabled]
        entries = np.concatenate([layout.offsets[a] + b, layout.offsets[b] + a]).astype(entry_dtype)
        tabled_codes.append(entries << DISTANCE_BITS | d)
        a, b = left[~tabled].astype(dtype), right[~tabled].astype(dtype)
        codes += [(a * size + b) << DISTANCE_BITS | d, (b * size + a) << DISTANCE_BITS | d]
    return (np.concatenate(codes) if codes else np.empty(0, dtype),
            np.concatenate(tabled_codes) if tabled_codes else np.empty(0, entry_dtype))


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


class CountedBatch(NamedTuple):
    """A batch's pairs outside the table as sorted unique keys and integer sums, and its additions to
    the table as sorted unique entries and integer sums."""

    keys: np.ndarray
    sums: np.ndarray
    table_entries: np.ndarray
    table_sums: np.ndarray


def counted_batch(batch: Batch, layout: TableLayout) -> CountedBatch:
    """The work of one piece of the counting (on a thread, or on a Dask worker)."""
    codes, tabled_codes = window_pairs(*batch, layout)
    return CountedBatch(*reduce_codes(codes, layout.scale), *reduce_codes(tabled_codes, layout.scale))


def buffer_pairs(memory_bytes: int, window: int, workers: int) -> int:
    """Pairs a buffer holds before it is spilled: the counting memory less the table's share, over
    the `workers` batches in flight, the buffer and the one being spilled."""
    pair_bytes = memory_bytes - memory_bytes // TABLE_SHARE
    return max(min(pair_bytes // BYTES_PER_PAIR // (workers + 2), MAX_BUFFER_PAIRS), 2 * window)


def batch_units(max_pairs: int, window: int) -> int:
    """Units per batch: a batch's pairs (2 * window per unit) fill about one buffer."""
    return min(max(max_pairs // (2 * window), 1), MAX_BATCH_UNITS)


class PairCounter:
    """Adds counted batches (`counted_batch`, run by an ordered map: threads, or a Dask cluster) to
    the table and buffers their other runs, which are merged and spilled as .npy (on a thread) when
    they fill their share of the memory. Memory: the table, `workers` batches in flight, a buffer of
    runs and one being spilled."""

    def __init__(
        self, vocab_size: int, window: int, memory_bytes: int, workers: int, spill_dir: Path
    ) -> None:
        self.vocab_size, self.window, self.scale = vocab_size, window, weight_scale(window)
        self.table = PairTable(vocab_size, min(memory_bytes // TABLE_SHARE // 8, MAX_TABLE_ENTRIES))
        self.layout = TableLayout(vocab_size, self.table.max_product, self.table.offsets, window, self.scale)
        self.max_pairs = buffer_pairs(memory_bytes, window, workers)
        self.spill_dir = spill_dir
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.spills: list[tuple[Path, Path]] = []
        self.buffer_spills = 0
        self.spilling: Future[None] | None = None
        self.units = 0

    @property
    def units_per_batch(self) -> int:
        return batch_units(self.max_pairs, self.window)

    def count(self, batches: Iterable[Batch], progress: Progress, in_order: OrderedMap) -> None:
        def taken() -> Iterator[Batch]:
            for batch in batches:
                self.units += len(batch[0])
                progress.update(len(batch[0]))
                yield batch

        with ThreadPoolExecutor(1) as spiller:
            for counted in in_order(counted_batch, taken(), self.layout):
                self.add(counted, spiller)
            self.finish(spiller)

    def finish(self, spiller: ThreadPoolExecutor) -> None:
        """The last buffer spilled and the table's run written: `merged_blocks` may begin."""
        self.spill(spiller)
        if self.spilling is not None:
            self.spilling.result()
        self.buffer_spills = len(self.spills)
        keys, sums = self.table.run()  # one more sorted run to merge
        if len(keys):
            self.spills.append(self.spill_paths(len(self.spills)))
            write_spill(self.spills[-1], keys, sums)

    def add(self, counted: CountedBatch, spiller: ThreadPoolExecutor) -> None:
        self.table.add(counted.table_entries, counted.table_sums)
        self.runs.append((counted.keys, counted.sums))
        self.buffered += len(counted.keys)
        if self.buffered >= self.max_pairs:
            self.spill(spiller)

    def spill(self, spiller: ThreadPoolExecutor) -> None:
        """The buffered runs merged and written on a thread while counting goes on; one at a time."""
        if not self.buffered:
            return
        keys, sums = (np.concatenate(parts) for parts in zip(*self.runs, strict=True))
        self.runs, self.buffered = [], 0
        if self.spilling is not None:
            self.spilling.result()
        paths = self.spill_paths(len(self.spills))
        self.spills.append(paths)
        self.spilling = spiller.submit(lambda: write_spill(paths, *reduce_pairs(keys, sums)))

    def spill_paths(self, index: int) -> tuple[Path, Path]:
        return self.spill_dir / f"keys-{index:05d}.npy", self.spill_dir / f"sums-{index:05d}.npy"

    def entries_per_row(self) -> np.ndarray:
        """Each row's entries over the spills (more than the merged row's where spills share keys)."""
        row_starts = np.arange(self.vocab_size + 1, dtype=np.int64) * self.vocab_size
        per_row = np.zeros(self.vocab_size, dtype=np.int64)
        for keys_path, _ in self.spills:
            per_row += np.diff(np.searchsorted(np.load(keys_path, mmap_mode="r"), row_starts))
        return per_row

    def merged_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The reduced (keys, integer sums) in key order, a block of rows at a time."""
        cuts = block_starts(self.entries_per_row(), self.max_pairs)
        blocks = SpillBlocks(self.spills, self.vocab_size, cuts)
        return (blocks.merged(block) for block in range(blocks.count))


class SpillBlocks:
    """Sorted spills merged a block of rows [cuts[i], cuts[i + 1]) at a time, in any order. Spills are
    read a range at a time, never kept mapped, and only block boundaries are kept per spill, so memory
    stays at about one block whatever the number of spills."""

    def __init__(self, spills: list[tuple[Path, Path]], vocab_size: int, cuts: np.ndarray) -> None:
        row_starts = np.asarray(cuts, dtype=np.int64) * vocab_size
        self.spills, self.count, self.dtype = spills, len(cuts) - 1, code_dtype(vocab_size)
        self.bounds = [np.searchsorted(np.load(k, mmap_mode="r"), row_starts) for k, _ in spills]
        self.layouts = [(npy_layout(k), npy_layout(s)) for k, s in spills]

    def merged(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [(read_range(k, kl, b[block], b[block + 1]), read_range(s, sl, b[block], b[block + 1]))
                 for (k, s), (kl, sl), b in zip(self.spills, self.layouts, self.bounds, strict=True)]
        if not parts:
            return np.empty(0, self.dtype), np.empty(0, np.int64)
        keys, sums = (np.concatenate(p) for p in zip(*parts, strict=True))
        return (keys, sums) if len(parts) == 1 else reduce_pairs(keys, sums)


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


def fixed_size(blocks: Iterable[tuple[np.ndarray, np.ndarray]],
               size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The blocks' (keys, sums) regrouped into pieces of exactly `size` (the last one shorter)."""
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    held = 0
    for keys, sums in blocks:
        pending.append((keys, sums))
        held += len(keys)
        while held >= size:
            all_keys, all_sums = (np.concatenate(parts) for parts in zip(*pending, strict=True))
            yield all_keys[:size], all_sums[:size]
            pending, held = [(all_keys[size:], all_sums[size:])], held - size
    if held:
        all_keys, all_sums = (np.concatenate(parts) for parts in zip(*pending, strict=True))
        yield all_keys, all_sums


def count_cooccurrences(
    batches: Callable[[int], Iterable[Batch]], vocab_size: int, cfg: Cooccur, out_path: Path, spill_dir: Path,
    in_order: OrderedMap,
) -> dict[str, Any]:
    """Count over `batches(max_units)` (see `document_batches`), each batch by `in_order` (an ordered
    map of `cooccur.workers` threads, or of a Dask cluster), write the triples to `out_path`; returns
    counts."""
    workers = cfg.workers or os.cpu_count() or 1
    counter = PairCounter(vocab_size, cfg.window, int(cfg.memory_mb * 2**20), workers, spill_dir)
    progress = Progress("cooccur", None, "unit")
    counter.count(batches(counter.units_per_batch), progress, in_order)
    progress.close()
    nnz, total = write_triples(counter.merged_blocks(), vocab_size, counter.scale, out_path)
    return {"nnz": nnz, "sum": total / counter.scale, "units": counter.units, "chunks": counter.buffer_spills}


def write_triples(blocks: Iterable[tuple[np.ndarray, np.ndarray]], vocab_size: int, scale: int,
                  out_path: Path) -> tuple[int, int]:
    """The merged (keys, integer sums), in key order, as `cooccur.parquet` in row groups of exactly
    `ROW_GROUP_ENTRIES`; returns the entries and the integer sum written."""
    schema = pa.schema([("row", pa.int32()), ("col", pa.int32()), ("value", pa.float64())])
    nnz, total = 0, 0
    # a row group is written (Arrow releases the GIL) while the next one is merged
    with pq.ParquetWriter(out_path, schema) as writer, ThreadPoolExecutor(1) as background:
        written: Future[None] | None = None
        for keys, sums in fixed_size(blocks, ROW_GROUP_ENTRIES):
            table = pa.table({
                "row": (keys // vocab_size).astype(np.int32), "col": (keys % vocab_size).astype(np.int32),
                "value": sums / scale,  # int64 / int: the exact rational, rounded once
            }, schema=schema)
            if written is not None:
                written.result()
            written = background.submit(writer.write_table, table, row_group_size=ROW_GROUP_ENTRIES)
            nnz += len(keys)
            total += int(sums.sum())
        if written is not None:
            written.result()
    return nnz, total
