"""Where a stage's independent pieces of work run: worker processes of this machine (`local`), or a
Dask cluster (`dask`): the scheduler at an address, or, with none given, a cluster of local worker
processes started for the stage on 127.0.0.1. Either way results come back in input order with a
bounded number in flight, so a stage's output is byte-identical whichever executor ran it. A Dask
worker that dies mid-task is replaced by its nanny and the task runs again elsewhere; results
already returned are kept.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

Item = TypeVar("Item")
OrderedMap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]
Executor = Literal["local", "dask"]
IN_FLIGHT_PER_WORKER = 4  # pieces submitted ahead of the one awaited, per worker
DASK_ATTEMPTS = 3  # runs of a task whose worker died before it is given up


def throttled(items: Iterable[Item], slots: threading.BoundedSemaphore) -> Iterator[Item]:
    """`items`, each taken only once a slot is free: the consumer frees one per result."""
    for item in items:
        slots.acquire()
        yield item


@contextlib.contextmanager
def ordered_map(executor: Executor, workers: int, scheduler: str | None = None) -> Iterator[OrderedMap]:
    """A `map(work, items)` that runs on the executor, in order, at most `IN_FLIGHT_PER_WORKER`
    pieces per worker ahead (a source is never read whole into memory)."""
    if executor == "local":
        with multiprocessing.get_context("fork").Pool(workers) as pool:

            def local_map(work: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
                slots = threading.BoundedSemaphore(IN_FLIGHT_PER_WORKER * workers)
                for result in pool.imap(work, throttled(items, slots)):  # imap's feeder would read all
                    slots.release()
                    yield result

            yield local_map
        return
    with dask_client(workers, scheduler) as client:
        ahead = IN_FLIGHT_PER_WORKER * max(len(client.scheduler_info()["workers"]), 1)

        def dask_map(work: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
            in_flight: deque[Any] = deque()
            for item in items:
                in_flight.append(client.submit(work, item, pure=False))
                if len(in_flight) >= ahead:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()

        yield dask_map


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
        }))
        if scheduler:
            yield stack.enter_context(Client(scheduler))
            return
        cluster = stack.enter_context(LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address="127.0.0.1:0", silence_logs=40))  # 40: errors only
        yield stack.enter_context(Client(cluster))
