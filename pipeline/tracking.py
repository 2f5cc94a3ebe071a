"""The only place that talks to MLflow: one run per stage execution, batched metrics, lineage tags.

The store defaults to a SQLite file at an absolute path inside the project, so queued `dvc exp`
runs (which execute in temporary copies of the workspace) still log to the one store;
`MLFLOW_TRACKING_URI` or `tracking.uri` override it (an `http://` tracking server: its health is
checked before a stage starts, and any failure to reach it is one `TrackingError` line naming it).
A stage run nests under the pipeline run named by `PIPELINE_PARENT_RUN_ID` when that is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Tracking, project_root
from pipeline.files import file_digest

if TYPE_CHECKING:
    from mlflow.entities import Metric

PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"
METRIC_BATCH = 1000  # MLflow's log_batch limit


def store_root(root: Path | None = None) -> Path:
    """The project whose mlflow.db holds the runs. `dvc exp run --queue` (and `--temp`) execute in a
    copy under <project>/.dvc/tmp/exps/; their runs belong to the project's store, not the copy's."""
    root = root or project_root()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri(cfg: Tracking) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri or f"sqlite:///{store_root() / 'mlflow.db'}"


class TrackingError(RuntimeError):
    """The tracking store could not be reached or refused a call: one line naming the store."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before a stage's work, when an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except OSError as exc:  # URLError included
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, or run "
                            "with tracking.enabled: false") from None


@contextlib.contextmanager
def tracking_errors(uri: str) -> Iterator[None]:
    """Any failure of a tracking call as one line naming the store (MLflow's own message is a page)."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise TrackingError(f"MLflow tracking at {uri} failed: {detail}") from exc


def git_state(root: Path | None = None) -> dict[str, str]:
    """The commit the code came from and whether the work tree differed from it."""
    root = root or project_root()
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def path_md5(path: Path) -> str:
    """The md5 that DVC records in dvc.lock: of a file's bytes, or for a directory of the JSON list
    of its files' {md5, relpath} sorted by path, with a `.dir` suffix."""
    if path.is_file():
        return file_digest(path, "md5")
    entries = [
        {"md5": file_digest(p, "md5"), "relpath": p.relative_to(path).as_posix()}
        for p in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix())
        if p.is_file()
    ]
    return hashlib.md5(json.dumps(entries).encode()).hexdigest() + ".dir"


def leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The non-mapping values of a nested mapping, keyed by their dotted path."""
    found: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            found.update(leaves(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def flatten(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them: dotted keys, string values (MLflow caps them at 6000 chars)."""
    return {key: str(value)[:6000] for key, value in leaves(params).items()}


class StageRun:
    """Collects what a stage logs; with tracking disabled every call is a no-op."""

    def __init__(self, client: Any | None, run_id: str | None) -> None:
        self.client = client
        self.run_id = run_id
        self._pending: list[Metric] = []

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return tracking_errors(str(self.client.tracking_uri)) if self.client else contextlib.nullcontext()

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._pending.append(Metric(key, float(value), now, step))
        if len(self._pending) >= METRIC_BATCH:
            self.flush()

    def flush(self) -> None:
        while self._pending and self.client is not None:
            batch = self._pending[:METRIC_BATCH]
            with self.errors():
                self.client.log_batch(self.run_id, metrics=batch)
            self._pending = self._pending[METRIC_BATCH:]  # kept if the call failed: a later flush retries

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.client is not None:
            from mlflow.entities import RunTag

            with self.errors():
                self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.client is None:
            return
        with self.errors():
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        """Flush and close the run; on a failed stage (`status` FAILED) best effort, never masking
        the stage's own error."""
        if self.client is None:
            return
        if status == "FAILED":
            with contextlib.suppress(Exception):
                self.flush()
                self.client.set_terminated(self.run_id, status)
            return
        self.flush()
        with self.errors():
            self.client.set_terminated(self.run_id, status)


@contextlib.contextmanager
def stage_run(
    stage: str,
    cfg: Tracking,
    params: Mapping[str, Any],
    inputs: Mapping[str, Path],
    outputs: Mapping[str, Path],
) -> Iterator[StageRun]:
    """One MLflow run for one stage execution; output hashes are tagged when the stage succeeds."""
    if not cfg.enabled:
        yield StageRun(None, None)
        return
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    check_reachable(uri)
    client = MlflowClient(uri)
    tags = {"stage": stage, "mlflow.runName": stage, **git_state()}
    if parent := os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = parent
    digests = {name: path_md5(p) for name, p in inputs.items() if p.exists()}
    tags.update({f"input.{name}.md5": md5 for name, md5 in digests.items()})
    with tracking_errors(uri):
        run = client.create_run(experiment_id(client, cfg.experiment), tags=tags)
        run_id = run.info.run_id
        log_input_datasets(client, run_id, digests, inputs)
        client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(params).items()])
    tracked = StageRun(client, run_id)
    try:
        yield tracked
    except BaseException:
        tracked.end("FAILED")
        raise
    tracked.set_tags({f"output.{n}.md5": path_md5(p) for n, p in outputs.items() if p.exists()})
    tracked.end("FINISHED")


def numeric_leaves(data: Mapping[str, Any]) -> dict[str, float]:
    """Every number in a nested report, keyed by its dotted path (what MLflow takes as metrics)."""
    return {key: float(value) for key, value in leaves(data).items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


# ---------------------------------------------------------------- pipeline runs, datasets, registry


@contextlib.contextmanager
def pipeline_run(cfg: Tracking, name: str, tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
    """The parent run of one pipeline execution: stage runs started while it is open (in this process
    or in child processes, which inherit `PIPELINE_PARENT_RUN_ID`) nest under it."""
    if not cfg.enabled:
        yield StageRun(None, None)
        return
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    check_reachable(uri)
    client = MlflowClient(uri)
    with tracking_errors(uri):
        run_tags = {"mlflow.runName": name, "kind": "pipeline", **git_state(), **(tags or {})}
        run = client.create_run(experiment_id(client, cfg.experiment), tags=run_tags)
    previous = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run.info.run_id
    tracked = StageRun(client, run.info.run_id)
    try:
        yield tracked
        tracked.end("FINISHED")
    except BaseException:
        tracked.end("FAILED")
        raise
    finally:
        if previous is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = previous


def experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created on first use; with a SQLite store its artifacts go to mlruns/ beside
    the database file (an absolute path, so runs from a `dvc exp` copy keep them)."""
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    uri = str(client.tracking_uri)
    artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri() \
        if uri.startswith("sqlite:///") else None
    return client.create_experiment(name, artifact_location=artifacts)


def log_input_datasets(
    client: Any, run_id: str, digests: Mapping[str, str], paths: Mapping[str, Path]
) -> None:
    """Each input as an MLflow dataset whose digest is its DVC md5 and whose source is its path."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    datasets = [
        DatasetInput(MetaDataset(LocalArtifactDatasetSource(str(paths[name])), name=name, digest=md5[:36])
                     ._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "input")])
        for name, md5 in digests.items()
    ]
    if datasets:
        client.log_inputs(run_id, datasets=datasets)


PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
MODEL_REQUIREMENTS = ["torch", "tokenizers", "safetensors", "numpy", "pandas"]


@contextlib.contextmanager
def quiet_model_logging() -> Iterator[None]:
    """Silence what MLflow says on every pyfunc log, known and harmless here: the advice to add type
    hints to `predict` (the schema is documented in `pipeline/pyfunc.py`) and the artifact download
    bar. (Models are logged as code: MLflow has no cloudpickle warning to give.)"""
    bar = os.environ.get(PROGRESS_BAR_ENV)
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        with warnings.catch_warnings():  # MLflow forces its own filter ("once"): drop it as it is shown
            shown = warnings.showwarning

            def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
                if "Add type hints to the `predict` method" not in str(message):
                    shown(message, *args, **kwargs)

            warnings.showwarning = show
            yield
    finally:
        if bar is None:
            os.environ.pop(PROGRESS_BAR_ENV, None)
        else:
            os.environ[PROGRESS_BAR_ENV] = bar


def register_model(run: StageRun, directory: Path, name: str, kind: str) -> str | None:
    """Log `directory` once as a pyfunc model of the run (`kind`: classifier or lm), register it as a
    new version of `name` tagged with the directory's DVC md5; returns the version. The first version
    of a model becomes its `champion`; later promotions are the retrain flow's gate."""
    if run.client is None:
        return None
    import mlflow

    mlflow.set_tracking_uri(run.client.tracking_uri)
    code = Path(__file__).with_name("pyfunc_entry.py")  # models from code: nothing is pickled
    with run.errors(), mlflow.start_run(run_id=run.run_id), quiet_model_logging():
        info = mlflow.pyfunc.log_model(name=kind, python_model=str(code), artifacts={kind: str(directory)},
                                       model_config={"kind": kind}, pip_requirements=MODEL_REQUIREMENTS,
                                       registered_model_name=name)
    version = str(info.registered_model_version)
    run.client.set_model_version_tag(name, version, "md5", path_md5(directory))
    run.client.set_model_version_tag(name, version, "run_id", run.run_id)
    if not champion_version(run.client, name):
        run.client.set_registered_model_alias(name, "champion", version)
    return version


def champion_version(client: Any, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except Exception:  # MlflowException: no such alias (or model) yet
        return None


def version_with_md5(client: Any, name: str, md5: str) -> str | None:
    """The newest registered version of `name` built from the directory whose DVC md5 is `md5`."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # MlflowException: no such model
        return None
    matching = [int(v.version) for v in versions if v.tags.get("md5") == md5]
    return str(max(matching)) if matching else None


def tag_model_version(run: StageRun, name: str, directory: Path, tags: Mapping[str, Any]) -> str | None:
    """Tag the registered version of `name` built from `directory` (e.g. with its test metrics)."""
    if run.client is None:
        return None
    version = version_with_md5(run.client, name, path_md5(directory))
    with run.errors():
        for key, value in (tags.items() if version else ()):
            run.client.set_model_version_tag(name, version, key, str(value))
    return version


# ---------------------------------------------------------------- reading runs and versions back (lineage)
# A SQLite store is read directly and read-only: importing MLflow and opening its SQLAlchemy store
# take about 3 s, these queries a millisecond. Any other store goes through MlflowClient.


class NotInStore(LookupError):
    """A run or model version the tracking store does not hold."""


def sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def query(db: Path, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        return connection.execute(sql, args).fetchall()


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    if db := sqlite_file(uri):
        if not query(db, "SELECT 1 FROM runs WHERE run_uuid = ?", (run_id,)):
            raise NotInStore(f"Run '{run_id}' not found")
        return dict(query(db, "SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return dict(MlflowClient(uri).get_run(run_id).data.tags)
    except MlflowException as exc:
        raise NotInStore(exc.message.splitlines()[0]) from None


def model_version_tags(uri: str, name: str, alias: str | None, version: str | None) -> dict[str, str]:
    """The tags of model `name` at `alias` (or `version`)."""
    if db := sqlite_file(uri):
        if alias:
            found = query(db, "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                          (name, alias))
            if not found:
                raise NotInStore(f"Registered model alias {alias} not found for model {name}")
            version = str(found[0][0])
        if not query(db, "SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (name, version)):
            raise NotInStore(f"Model version {name}/{version} not found")
        return dict(query(db, "SELECT key, value FROM model_version_tags WHERE name = ? AND version = ?",
                          (name, version)))
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        if alias:
            found = client.get_model_version_by_alias(name, alias)
        else:
            found = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise NotInStore(exc.message.splitlines()[0]) from None
    return dict(found.tags)


def finished_stage_runs(uri: str, stage: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(run id, tags) of the finished runs of `stage` in active experiments, the newest first."""
    if db := sqlite_file(uri):
        runs = query(db, "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                         "JOIN experiments e ON e.experiment_id = r.experiment_id "
                         "WHERE t.key = 'stage' AND t.value = ? AND r.status = 'FINISHED' "
                         "AND r.lifecycle_stage = 'active' AND e.lifecycle_stage = 'active' "
                         "ORDER BY r.start_time DESC", (stage,))
        for (run_id,) in runs:
            yield run_id, run_tags(uri, run_id)
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return
    found = f"tags.stage = '{stage}' and attributes.status = 'FINISHED'"
    for run in client.search_runs(experiment_ids, found, order_by=["attributes.start_time DESC"]):
        yield run.info.run_id, dict(run.data.tags)
