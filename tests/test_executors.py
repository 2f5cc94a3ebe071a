"""Stages' work on a Dask cluster of worker processes on 127.0.0.1 (clean, tokenize, cooccur): the
same bytes as the local executor, and a worker killed mid-task costs nothing but the rerun of its
task (for cooccur's counting: of its part of the batches)."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import pytest
from test_clean import csv_slice, run_stages, slice_params, wiki_slice, with_paths

from pipeline import cooccurrence, cooccurrence_cluster
from pipeline.config import ConfigError, parse_config
from pipeline.executors import IN_FLIGHT_PER_WORKER, ordered_map
from pipeline.files import file_digest
from pipeline.stages import cooccur, tokenize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as started:
        yield started


@pytest.fixture
def slices(tmp_path: Path):
    def make(pages: int = 30, rows: int = 600) -> dict:
        return slice_params(wiki_slice(tmp_path / "wiki.xml", pages), csv_slice(tmp_path / "s.csv", rows))

    return make


def square_or_die_once(item: tuple[Path, int]) -> int:
    """Squares; the first worker to reach item 3 dies (as a killed process would) instead."""
    marker, number = item
    if number == 3:
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            pass
        else:
            os._exit(1)
    return number * number


def test_a_dask_worker_killed_mid_task_loses_nothing(cluster, tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    with ordered_map("dask", 2, cluster.scheduler_address) as in_order:
        results = list(in_order(square_or_die_once, [(marker, n) for n in range(40)]))
    assert marker.exists()  # a worker did die
    assert results == [n * n for n in range(40)]  # in order, none lost, none twice
    assert all(host.startswith("tcp://127.0.0.1:") for host in cluster.scheduler_info["workers"])


class Page:
    """A stand-in for a page of text on its way to a worker."""

    def __init__(self, number: int) -> None:
        self.number, self.text = number, "x" * 10_000


def page_number(page: Page) -> int:
    return page.number


def test_a_dask_cluster_keeps_no_piece_it_has_finished() -> None:
    import gc

    with ordered_map("dask", 2) as in_order:  # the cluster the stage starts, scheduler in this process
        assert list(in_order(page_number, (Page(n) for n in range(60)))) == list(range(60))
        gc.collect()
        alive = sum(isinstance(o, Page) for o in gc.get_objects())
    assert alive <= 2 * IN_FLIGHT_PER_WORKER, alive  # at most what was in flight (default log: ~all 60)


def test_clean_on_a_dask_cluster_writes_the_same_bytes(tmp_path: Path, slices) -> None:
    params = slices(pages=40, rows=800)
    digests = []
    for executor in ("local", "dask"):  # dask: a cluster of 2 local workers, started by the stage
        run_params = copy.deepcopy(params)
        run_params["data"]["clean"].update(executor=executor, workers=2, batch_pages=4)
        root = tmp_path / executor
        metrics = run_stages(with_paths(run_params, root), root)
        outputs = [*sorted((root / "clean").iterdir()), *sorted((root / "splits").iterdir())]
        digests.append(([(p.name, file_digest(p)) for p in outputs], metrics["sources"]))
    assert digests[0] == digests[1]


def test_an_unknown_executor_is_refused_in_one_line(slices) -> None:
    params = slices()
    params["data"]["clean"]["executor"] = "spark"
    with pytest.raises(ConfigError, match=r"data\.clean\.executor") as refused:
        parse_config(params)
    assert "\n" not in str(refused.value)


def output_digests(directory: Path) -> list[tuple[str, str]]:
    files = [f for f in directory.rglob("*") if f.is_file()]
    return sorted((str(f.relative_to(directory)), file_digest(f)) for f in files)


def test_tokenize_on_a_dask_cluster_writes_the_same_bytes(tiny_project, cluster, tmp_path: Path) -> None:
    root, params = tiny_project
    digests = []
    for executor in ("local", "dask"):
        run_params = copy.deepcopy(params)
        run_params["tokenize"].update(executor=executor, scheduler=cluster.scheduler_address,
                                      batch_documents=8, shard_tokens=4096,
                                      include_labeled_train=str(root / "clean" / "labeled.parquet"))
        out = tmp_path / executor
        tokenize.run(parse_config(run_params), root / "clean", out / "tokenizer", out / "tokens",
                     out / "tokenize.json")
        digests.append(output_digests(out))
    assert len(digests[0]) > 10  # several shards per split, the tokenizer, the manifest, the metrics
    assert digests[0] == digests[1]


@pytest.mark.parametrize("unit", ["word", "token"])
def test_cooccur_on_a_dask_cluster_writes_the_same_bytes(tiny_project, cluster, tmp_path: Path,
                                                         monkeypatch, unit: str) -> None:
    root, params = tiny_project
    monkeypatch.setattr(cooccurrence, "ROW_GROUP_ENTRIES", 5000)
    results = []
    for executor in ("local", "dask"):
        run_params = copy.deepcopy(params)
        # 0.5 MiB: several batches and spills; 7 texts per task: several tasks
        run_params["cooccur"].update(executor=executor, scheduler=cluster.scheduler_address, memory_mb=0.5,
                                     batch_texts=7)
        out = tmp_path / executor
        metrics = cooccur.run(parse_config(run_params), root / "clean", root / "tokenizer", root / "tokens",
                              out / "cooccur", out / "cooccur.json", unit)
        assert metrics["chunks"] > 1
        results.append((output_digests(out), metrics["nnz"]))
    assert results[0] == results[1]


def test_cooccur_recounts_the_part_of_a_dask_worker_killed_mid_count(tiny_project, cluster, tmp_path: Path,
                                                                   monkeypatch) -> None:
    root, params = tiny_project
    marker = tmp_path / "killed"

    class DiesOnce(cooccurrence_cluster.PartCounter):  # local: pickled with its marker, by value
        added = 0

        def add(self, batch: cooccurrence.Batch) -> None:
            self.added += 1
            if self.added == 3:
                try:
                    marker.touch(exist_ok=False)
                except FileExistsError:
                    pass
                else:
                    os._exit(1)  # the worker process dies, as a killed one would
            super().add(batch)

    monkeypatch.setattr(cooccur, "count_on_cluster",
                        functools.partial(cooccurrence_cluster.count_on_cluster, counter_class=DiesOnce))
    results = []
    for executor in ("local", "dask"):
        run_params = copy.deepcopy(params)
        run_params["cooccur"].update(executor=executor, scheduler=cluster.scheduler_address, memory_mb=0.5)
        out = tmp_path / executor
        metrics = cooccur.run(parse_config(run_params), root / "clean", root / "tokenizer", root / "tokens",
                              out / "cooccur", out / "cooccur.json", "word")
        results.append((output_digests(out), metrics["train_units_in_vocab"]))
    assert marker.exists()  # a worker did die
    assert results[0] == results[1]
