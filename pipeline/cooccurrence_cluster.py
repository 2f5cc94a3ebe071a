"""Co-occurrence counting on a Dask cluster, the counts kept on the workers that make them.

Each worker holds a `PartCounter` (a Dask actor) and is sent every `parts`-th batch of documents,
which it counts, adds, spills (to the worker's local directory) and merges as the local counter
does. At the end the stage asks every part for the same block of rows, merges the parts' sorted
runs and writes the block. So documents go out and only each part's merged counts come back:
sending every counted batch back to the stage (the local executor's threads do) moved 18x the batch
over the network, about 10 GB at 100x the default dump.

A worker that dies loses its part's counts: that part's batches are counted again on a new actor,
up to `DASK_ATTEMPTS` passes; the other parts keep theirs.
"""

from __future__ import annotations

import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.configfamilies import Cooccur
from pipeline.cooccurrence import (
    Batch,
    PairCounter,
    SpillBlocks,
    batch_units,
    block_starts,
    buffer_pairs,
    counted_batch,
    reduce_pairs,
    weight_scale,
    write_triples,
)
from pipeline.executors import DASK_ATTEMPTS, IN_FLIGHT_PER_WORKER
from pipeline.progress import Progress

BLOCKS_AHEAD = 1  # blocks of rows requested from the parts ahead of the one being merged
WORKER_WAIT_S = 60  # how long a pass waits for a cluster with no worker (one restarting) to get one


class PartCounter:
    """The counts of the batches sent to one worker (a Dask actor: its methods run one at a time on
    the worker's actor thread)."""

    def __init__(self, vocab_size: int, window: int, memory_bytes: int) -> None:
        from distributed import get_worker

        self.scratch = tempfile.TemporaryDirectory(prefix="cooccur-", dir=get_worker().local_directory)
        self.counter = PairCounter(vocab_size, window, memory_bytes, 1, Path(self.scratch.name))
        self.spiller = ThreadPoolExecutor(1)

    @property
    def spills(self) -> int:
        return self.counter.buffer_spills

    def add(self, batch: Batch) -> None:
        self.counter.add(counted_batch(batch, self.counter.layout), self.spiller)

    def finish(self) -> None:
        self.counter.finish(self.spiller)
        self.spiller.shutdown()

    def entries_per_row(self) -> np.ndarray:
        return self.counter.entries_per_row()

    def plan_blocks(self, cuts: np.ndarray) -> None:
        self.blocks = SpillBlocks(self.counter.spills, self.counter.vocab_size, cuts)

    def block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        return self.blocks.merged(block)

    def close(self) -> None:
        self.scratch.cleanup()


def failed_parts(actors: dict[int, Any], batches: Iterable[Batch], parts: int) -> dict[int, Exception]:
    """Sends batch i to part i % `parts` (where that part has an actor), `IN_FLIGHT_PER_WORKER` calls
    ahead per actor, then ends their counting; returns the parts whose actor failed (its worker died),
    with the error."""
    failed: dict[int, Exception] = {}
    in_flight: deque[tuple[int, Any]] = deque()

    def call(part: int, method: str, *args: Any) -> None:
        if part in actors and part not in failed:
            try:  # a lost actor refuses the call itself
                in_flight.append((part, getattr(actors[part], method)(*args)))
            except Exception as error:
                failed.setdefault(part, error)

    def settle(limit: int) -> None:
        while len(in_flight) > limit:
            part, result = in_flight.popleft()
            try:
                result.result()
            except Exception as error:  # its worker died (or its counting failed): the part is redone
                failed.setdefault(part, error)

    for i, batch in enumerate(batches):
        call(i % parts, "add", batch)
        settle(IN_FLIGHT_PER_WORKER * len(actors))
    settle(0)
    for part in actors:
        call(part, "finish")
    settle(0)
    return failed


def counted_parts(client: Any, batches: Callable[[], Iterable[Batch]], parts: int, cfg: Cooccur,
                  vocab_size: int, counter_class: type = PartCounter) -> list[Any]:
    """Actors holding the finished counts of each part, in part order: the parts whose worker died
    are counted again on new actors, up to `DASK_ATTEMPTS` passes in all."""
    counter_args = (vocab_size, cfg.window, int(cfg.memory_mb * 2**20))
    done: dict[int, Any] = {}
    pending = list(range(parts))
    failed: dict[int, Exception] = {}
    for _ in range(DASK_ATTEMPTS):
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            raise RuntimeError(f"cooccur: the Dask cluster has had no worker for {WORKER_WAIT_S} s") from None
        workers = list(client.scheduler_info()["workers"])
        actors = {part: client.submit(counter_class, *counter_args, actor=True, pure=False,
                                      workers=[workers[i % len(workers)]], allow_other_workers=True).result()
                  for i, part in enumerate(pending)}
        failed = failed_parts(actors, batches(), parts)
        done.update((part, actor) for part, actor in actors.items() if part not in failed)
        pending = sorted(failed)
        if not pending:
            return [done[part] for part in range(parts)]
    last = failed[pending[-1]]
    raise RuntimeError(f"cooccur: parts {pending} failed on {DASK_ATTEMPTS} passes (their Dask workers "
                       f"died, or counting failed: {type(last).__name__}: {last}); rerun the stage") from last


def merged_blocks(actors: list[Any], max_entries: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The parts' counts merged a block of rows at a time, in key order, `BLOCKS_AHEAD` blocks
    requested ahead so the workers read and merge while this process merges and writes."""
    cuts = block_starts(sum(actor.entries_per_row().result() for actor in actors), max_entries)
    for planned in [actor.plan_blocks(cuts) for actor in actors]:
        planned.result()
    requested: deque[list[Any]] = deque()
    for block in range(len(cuts) - 1):
        while len(requested) <= BLOCKS_AHEAD and block + len(requested) < len(cuts) - 1:
            requested.append([actor.block(block + len(requested)) for actor in actors])
        keys, sums = (np.concatenate(p) for p in zip(*(r.result() for r in requested.popleft()), strict=True))
        yield (keys, sums) if len(actors) == 1 else reduce_pairs(keys, sums)
    for actor in actors:
        actor.close().result()


def count_on_cluster(batches: Callable[[int], Iterable[Batch]], vocab_size: int, cfg: Cooccur,
                     out_path: Path, client: Any, counter_class: type = PartCounter) -> dict[str, Any]:
    """`count_cooccurrences` on the cluster of `client`, one part of the batches per worker: the same
    outputs and counts."""
    parts = max(len(client.scheduler_info()["workers"]), 1)
    max_pairs = buffer_pairs(int(cfg.memory_mb * 2**20), cfg.window, 1)
    progress = Progress("cooccur", None, "unit")
    units, passes = 0, 0

    def batches_of_a_pass() -> Iterator[Batch]:
        nonlocal units, passes
        passes += 1
        for batch in batches(batch_units(max_pairs, cfg.window)):
            if passes == 1:  # a pass that redoes a lost part is not progress
                units += len(batch[0])
                progress.update(len(batch[0]))
            yield batch

    actors = counted_parts(client, batches_of_a_pass, parts, cfg, vocab_size, counter_class)
    progress.close()
    spills = sum(actor.spills for actor in actors)
    scale = weight_scale(cfg.window)
    nnz, total = write_triples(merged_blocks(actors, max_pairs), vocab_size, scale, out_path)
    return {"nnz": nnz, "sum": total / scale, "units": units, "chunks": spills}
