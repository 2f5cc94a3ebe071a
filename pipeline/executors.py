"""Where a stage's independent pieces of work run: worker processes of this machine (`local`), or a
Dask cluster (`dask`): the scheduler at an address, or, with none given, a cluster of local worker
processes started for the stage on 127.0.0.1. Either way results come back in input order with a
bounded number in flight, so a stage's output is byte-identical whichever executor ran it. A Dask
worker that dies mid-task is replaced by its nanny and the task runs again elsewhere; results
already returned are kept.

An ordered map is called as `in_order(work, items, *shared)` and yields `work(item, *shared)` for
each item; `shared` values (a tokenizer, a table's layout) go to each Dask worker once, not with
every task.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from pipeline.configbase import Executor

Item = TypeVar("Item")
OrderedMap = Callable[..., Iterator[Any]]  # (work, items, *shared) -> work(item, *shared) per item
IN_FLIGHT_PER_WORKER = 4  # pieces submitted ahead of the one awaited, per worker
DASK_ATTEMPTS = 3  # runs of a task whose worker died before it is given up
WORKER_ENVIRONMENT = {"RAYON_NUM_THREADS": 1}  # a worker is one thread (tokenizers' pool: all cores)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
FREED_BYTES_KEPT = 65536  # both thresholds: what Dask sets for its workers (MALLOC_TRIM_THRESHOLD_)


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """`items` as lists of `size` (the last one shorter): the pieces of work."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def throttled(items: Iterable[Item], slots: threading.BoundedSemaphore) -> Iterator[Item]:
    """`items`, each taken only once a slot is free: the consumer frees one per result."""
    for item in items:
        slots.acquire()
        yield item


def in_process_map(work: Callable[..., Any], items: Iterable[Any], *shared: Any) -> Iterator[Any]:
    """The ordered map of one process: for work that is parallel inside (tokenizers' threads)."""
    return (work(item, *shared) for item in items)


def with_shared(item: Any, work: Callable[..., Any], shared: tuple[Any, ...]) -> Any:
    return work(item, *shared)


@contextlib.contextmanager
def threaded_map(workers: int) -> Iterator[OrderedMap]:
    """An ordered map on `workers` threads (for work that releases the GIL: NumPy's sorts), `workers`
    pieces in flight."""
    with ThreadPoolExecutor(workers) as pool:

        def thread_map(work: Callable[..., Any], items: Iterable[Any], *shared: Any) -> Iterator[Any]:
            in_flight: deque[Future[Any]] = deque()
            for item in items:
                in_flight.append(pool.submit(work, item, *shared))
                if len(in_flight) >= workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()

        yield thread_map


@contextlib.contextmanager
def ordered_map(executor: Executor, workers: int, scheduler: str | None = None,
                ahead_per_worker: int = IN_FLIGHT_PER_WORKER) -> Iterator[OrderedMap]:
    """A `map(work, items, *shared)` that runs on the executor, in order, at most `ahead_per_worker`
    pieces per worker ahead (a source is never read whole into memory)."""
    if executor == "local":
        with multiprocessing.get_context("fork").Pool(workers) as pool:

            def local_map(work: Callable[..., Any], items: Iterable[Any], *shared: Any) -> Iterator[Any]:
                slots = threading.BoundedSemaphore(ahead_per_worker * workers)
                bound = functools.partial(with_shared, work=work, shared=shared)  # sent with every task
                for result in pool.imap(bound, throttled(items, slots)):  # imap's feeder would read all
                    slots.release()
                    yield result

            yield local_map
        return
    with dask_client(workers, scheduler) as client:
        yield dask_map(client, ahead_per_worker)


def dask_map(client: Any, ahead_per_worker: int = IN_FLIGHT_PER_WORKER) -> OrderedMap:
    """The ordered map of a Dask client's cluster, at most `ahead_per_worker` tasks per worker ahead."""
    ahead = ahead_per_worker * max(len(client.scheduler_info()["workers"]), 1)

    def cluster_map(work: Callable[..., Any], items: Iterable[Any], *shared: Any) -> Iterator[Any]:
        # hash=False: a key of its own, which the release of an earlier scatter of equal data cannot take
        on_workers = [client.scatter(value, broadcast=True, hash=False) for value in shared]
        in_flight: deque[Any] = deque()
        for item in items:
            in_flight.append(client.submit(work, item, *on_workers, pure=False))
            if len(in_flight) >= ahead:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    return cluster_map


def hand_freed_memory_back() -> None:
    """Fixed malloc thresholds for this process. glibc keeps freed memory for reuse and raises its
    mmap threshold as large blocks are freed, so a process that receives many large, short-lived
    messages (a Dask client, and a LocalCluster's scheduler beside it) keeps growing: 505 against
    447 MiB counting co-occurrences of the 100x growth-curve corpus. A no-op off glibc. Process-wide
    (every later large allocation is mapped and unmapped), so only a stage's own process sets it
    (`prepare_stage_process`), not a library call that a notebook or a test process makes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, FREED_BYTES_KEPT)
    libc.mallopt(M_TRIM_THRESHOLD, FREED_BYTES_KEPT)


def prepare_stage_process(executor: Executor) -> None:
    """What a stage's own process sets for its executor (called by the stages' CLIs)."""
    if executor == "dask":
        hand_freed_memory_back()


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None) -> Iterator[Any]:
    import dask
    from dask.distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set({
            "distributed.scheduler.allowed-failures": DASK_ATTEMPTS - 1,
            # the scheduler's streams keep their last N messages for debugging, each task's pieces
            # with them: 1.9 GiB at 100x the default dump with the default 1000
            "distributed.admin.low-level-log-length": 0,
            "distributed.nanny.pre-spawn-environ": {
                **dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_ENVIRONMENT},
        }))
        if scheduler:
            yield stack.enter_context(Client(scheduler))
            return
        cluster = stack.enter_context(LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address="127.0.0.1:0", silence_logs=40))  # 40: errors only
        yield stack.enter_context(Client(cluster))
