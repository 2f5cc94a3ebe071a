"""Stage runs land in MLflow with params, batched metrics and lineage tags."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import tracking
from pipeline.config import Tracking


def test_stage_run_records_params_metrics_and_hashes(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, "parent123")
    source = tmp_path / "in.txt"
    source.write_text("raw bytes")
    out = tmp_path / "out"
    with tracking.stage_run("demo", Tracking(experiment="t"), {"a": {"b": 3}}, {"src": source},
                            {"out": out}) as run:
        out.mkdir()
        (out / "x.bin").write_bytes(b"\x00\x01")
        for step in range(1500):  # more than one batch
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    client = MlflowClient(uri)
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"a.b": "3"}
    tags = stored.data.tags
    assert tags["stage"] == "demo" and tags["mlflow.parentRunId"] == "parent123"
    assert tags["input.src.md5"] == tracking.path_md5(source)
    assert tags["output.out.md5"] == tracking.path_md5(out)
    assert len(tags["git.commit"]) in (40, 7) or tags["git.commit"] == "unknown"
    assert len(client.get_metric_history(run.run_id, "loss")) == 1500


def test_disabled_tracking_touches_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with tracking.stage_run("demo", Tracking(enabled=False), {}, {}, {}) as run:
        run.log_metrics({"x": 1.0})
    assert run.run_id is None and not list(tmp_path.iterdir())


def test_numeric_leaves_flatten_reports() -> None:
    report = {"a": {"b": 1, "c": {"d": 2.5}}, "name": "x", "flag": True}
    assert tracking.numeric_leaves(report) == {"a.b": 1.0, "a.c.d": 2.5}


def test_pipeline_run_nests_stage_runs_and_logs_inputs_as_datasets(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("raw bytes")
    with tracking.pipeline_run(Tracking(experiment="t"), "pipeline") as parent, \
            tracking.stage_run("demo", Tracking(experiment="t"), {}, {"raw": source}, {}) as child:
        pass

    assert tracking.PARENT_RUN_ENV not in os.environ  # restored when the pipeline run ends
    client = MlflowClient(uri)
    stored = client.get_run(child.run_id)
    assert stored.data.tags["mlflow.parentRunId"] == parent.run_id
    (dataset,) = stored.inputs.dataset_inputs
    assert dataset.dataset.name == "raw" and dataset.dataset.digest == tracking.path_md5(source)
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_queued_experiments_log_to_the_project_store(tmp_path: Path) -> None:
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    assert tracking.store_root(copy) == tmp_path / "proj"
    assert tracking.store_root(tmp_path / "proj") == tmp_path / "proj"


def test_an_unreachable_tracking_server_stops_a_stage_before_its_work_in_one_line(monkeypatch) -> None:
    import socket

    import pytest

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    worked = []
    with pytest.raises(tracking.TrackingError) as refused, \
            tracking.stage_run("demo", Tracking(experiment="t"), {}, {}, {}):
        worked.append(True)
    assert not worked and "\n" not in str(refused.value)
    assert str(refused.value).startswith(f"MLflow tracking server {dead} is unreachable (")
    with pytest.raises(tracking.TrackingError, match=f"MLflow tracking at {dead} failed: [^\n]*$"), \
            tracking.tracking_errors(dead):
        raise RuntimeError("API request to ... failed\nwith a page of detail")
