"""The pipeline on real services, each started and stopped here on 127.0.0.1 with a free port: an S3
API (moto's server) as the DVC remote and the MLflow server's artifact store, an MLflow tracking
server, and a Prefect server whose process work pools are served by workers in their own clones."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
import zc.lockfile
from conftest import commit, tiny_pipeline

from flows import retrain as retrain_module

pytestmark = [pytest.mark.services, pytest.mark.slow]

BIN = Path(sys.executable).parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: the venv first on PATH, no AWS credentials unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_API"))}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PREFECT_SERVER_ANALYTICS_ENABLED":
            "false", "PREFECT_WORKER_QUERY_SECONDS": "2", **extra}


class Service:
    """A server in its own process group (stopping it stops its children), its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path,
                 ready: Callable[[], bool]) -> None:
        self.name, self.args, self.env, self.log, self.ready = name, args, env, log, ready
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        with_children = os.getpgid(self.process.pid)
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(with_children, sig)
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        with_children_left = subprocess.run(["pgrep", "-g", str(with_children)], capture_output=True)
        if with_children_left.returncode == 0:
            os.killpg(with_children, signal.SIGKILL)
        self.process = None


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server with the buckets `dvc` and `mlflow`; yields its endpoint."""
    import boto3

    endpoint = f"http://127.0.0.1:{free_port()}"
    port = endpoint.rsplit(":", 1)[1]
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    server = Service("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", port], child_env(), log,
                     lambda: answers(f"{endpoint}/moto-api/"))
    server.start()
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    for bucket in ("dvc", "mlflow"):
        client.create_bucket(Bucket=bucket)
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def mlflow_server(s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Service]]:
    """`mlflow server`, SQLite backend, artifacts on the S3 server (credentials on the server only)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"http://127.0.0.1:{free_port()}"
    args = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", "s3://mlflow/artifacts", "--host", "127.0.0.1", "--port",
            uri.rsplit(":", 1)[1], "--workers", "1"]
    # job execution off: otherwise the server starts 8 more processes (a job runner, Huey consumers; 2 GB)
    env = child_env(**CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = Service("mlflow", args, env, root / "server.log",
                     lambda: answers(f"{uri}/health"))
    server.start()
    yield uri, server
    server.stop()


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` with its own PREFECT_HOME; yields the environment that reaches it."""
    home = tmp_path_factory.mktemp("prefect")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = child_env(PREFECT_HOME=str(home), PREFECT_API_URL=api)
    port = api.rsplit(":", 1)[1].removesuffix("/api")
    server = Service("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                 port], env, home / "server.log", lambda: answers(f"{api}/health"))
    server.start()
    yield {"PREFECT_HOME": str(home), "PREFECT_API_URL": api}
    server.stop()


def run(args: list[str], cwd: Path, env: dict[str, str], check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def dvc(project: Path, env: dict[str, str], *args: str,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "dvc", *args], project, env, check)


def with_remote(project: Path, endpoint: str, env: dict[str, str]) -> None:
    """The project's default DVC remote on the S3 server (committed config, credentials from the env)."""
    dvc(project, env, "remote", "add", "--default", "store", "s3://dvc/store")
    dvc(project, env, "remote", "modify", "store", "endpointurl", endpoint)
    commit(project, "the DVC remote")


def clone(origin: Path, target: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(origin), str(target)], check=True)
    return target


@contextlib.contextmanager
def prefect_client(env: dict[str, str]) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = env["PREFECT_API_URL"]
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def flow_runs(env: dict[str, str], deployment: str) -> list[Any]:
    """The deployment's flow runs, newest first, as the Prefect server has them."""
    with prefect_client(env) as client:
        found = client.read_deployment_by_name(deployment)
        runs = [r for r in client.read_flow_runs() if r.deployment_id == found.id]
    return sorted(runs, key=lambda r: r.created, reverse=True)


def waiting_to_retry(env: dict[str, str]) -> bool:
    """Whether any task run on the Prefect server is waiting for its retry."""
    with prefect_client(env) as client:
        return any(t.state and t.state.name == "AwaitingRetry" for t in client.read_task_runs())


def test_two_pools_retrain_through_the_remote_and_the_servers_then_find_nothing(
        s3, mlflow_server, prefect_api, tmp_path, monkeypatch):
    """The nightly-split deployment: a CPU worker runs the data stages and hands the training stages
    to a GPU worker's run-stages deployment, each in its own clone, exchanging artifacts only through
    the DVC remote; every stage logs to the MLflow server; a stage failure is retried by the worker."""
    import mlflow
    from mlflow.tracking import MlflowClient

    tracking_uri, _ = mlflow_server
    origin = tiny_pipeline(tmp_path / "origin", git=True)
    env = child_env(**prefect_api, **CREDENTIALS, MLFLOW_TRACKING_URI=tracking_uri)
    with_remote(origin, s3, env)
    cpu, gpu = clone(origin, tmp_path / "cpu-worker"), clone(origin, tmp_path / "gpu-worker")
    prefect = str(BIN / "prefect")
    for pool in ("cpu-pool", "gpu-pool"):
        run([prefect, "work-pool", "create", pool, "--type", "process"], cpu, env)
    run([prefect, "--no-prompt", "deploy", "--name", "nightly-split", "--name", "stages-gpu"], cpu, env)
    run([prefect, "deployment", "run", "retrain/nightly-split"], cpu, env)

    # a transient failure: DVC's repository lock is held when the first stage starts, then let go
    (cpu / ".dvc" / "tmp").mkdir(exist_ok=True)  # a clone has no .dvc/tmp yet
    lock = zc.lockfile.LockFile(str(cpu / ".dvc" / "tmp" / "lock"))
    # the CPU worker takes the one run waiting for it and exits; the GPU worker polls until stopped
    workers = [subprocess.Popen([prefect, "worker", "start", "--pool", pool, *once], cwd=checkout,
                                env={**env, "LLM_PIPELINE_DIR": str(checkout)},
                                stdout=(tmp_path / f"{pool}.log").open("wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
               for pool, checkout, once in (("cpu-pool", cpu, ["--run-once", "--limit", "1"]),
                                            ("gpu-pool", gpu, []))]
    try:
        deadline = time.monotonic() + 300
        while not waiting_to_retry(env):
            assert time.monotonic() < deadline, (tmp_path / "cpu-pool.log").read_text()[-3000:]
            time.sleep(1)
        lock.close()
        workers[0].wait(900)
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM if worker.poll() is None else signal.SIGKILL)
            worker.wait(30)
    logs = {pool: (tmp_path / f"{pool}.log").read_text() for pool in ("cpu-pool", "gpu-pool")}
    (split_run,) = flow_runs(env, "retrain/nightly-split")
    assert split_run.state.name == "Completed", logs["cpu-pool"][-5000:]
    (stages_run,) = flow_runs(env, "run-stages/stages-gpu")
    assert stages_run.state.name == "Completed", logs["gpu-pool"][-5000:]
    assert stages_run.parameters["stages"] == list(retrain_module.GPU_STAGES)

    # the record is whole on the CPU side: every stage in its dvc.lock, outputs pulled back from the remote
    lock_file = yaml.safe_load((cpu / "dvc.lock").read_text())
    assert set(lock_file["stages"]) == set(retrain_module.STAGES)
    assert set(json.loads(dvc(cpu, env, "status", "--json").stdout)) <= {"ingest"}  # ingest: always changed
    assert (cpu / "data" / "classifier").is_dir() and not (cpu / "checkpoints" / "pretrain").exists()
    assert (gpu / "checkpoints" / "pretrain").is_dir()
    assert not (gpu / "data" / "cooccur").exists()  # the training stages never read it: never pulled

    # MLflow over HTTP: one parent run, every stage nested under it, from both workers
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)  # clients reach artifacts through the server
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("llm-pipeline").experiment_id
    (parent,) = client.search_runs([experiment], "tags.kind = 'pipeline'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["stage"] for r in children} == set(retrain_module.STAGES)
    assert {r.info.status for r in children} == {"FINISHED"}
    assert parent.data.tags["outcome"] == "retrained"
    champion = client.get_model_version_by_alias("sentiment-classifier", "champion")
    assert champion.tags["md5"] == lock_file["stages"]["finetune"]["outs"][0]["md5"]
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model("models:/sentiment-classifier@champion")
    predictions = model.predict(pd.DataFrame({"text": ["the flight was late again", "great crew, thanks"]}))
    assert len(predictions) == 2 and set(predictions["label"]) <= {"negative", "neutral", "positive"}

    # a fresh clone at the committed lock pulls everything from the remote and has nothing to do
    commit(cpu, "retrained")
    subprocess.run(["git", "push", "--quiet", str(origin), "HEAD:retrained"], cwd=cpu, check=True)
    fresh = tmp_path / "fresh"
    subprocess.run(["git", "clone", "--quiet", "--branch", "retrained", str(origin), str(fresh)], check=True)
    dvc(fresh, env, "pull")
    status = json.loads(dvc(fresh, env, "status", "--json").stdout)
    assert set(status) <= {"ingest"} and all(c == "always changed" for c in status.get("ingest", [])), status

    # the second run finds nothing to retrain, on the CPU worker alone
    run([prefect, "deployment", "run", "retrain/nightly-split"], cpu, env)
    run([prefect, "worker", "start", "--pool", "cpu-pool", "--run-once", "--limit", "1"], cpu,
        {**env, "LLM_PIPELINE_DIR": str(cpu)})
    newest = flow_runs(env, "retrain/nightly-split")[0]
    assert newest.state.name == "NothingToRetrain"
    assert len(flow_runs(env, "run-stages/stages-gpu")) == 1


def test_a_stage_whose_tracking_server_goes_down_fails_in_one_line_and_reruns(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    tracking_uri, server = mlflow_server
    project = tiny_pipeline(tmp_path / "project")
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    dvc(project, env, "repro", "clean")
    started = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "tokenize"], cwd=project, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("llm-pipeline").experiment_id
    finished = "tags.stage = 'tokenize' and attributes.status = 'FINISHED'"
    finished_before = len(client.search_runs([experiment], finished))  # the server may hold other tests' runs
    while not client.search_runs([experiment], "tags.stage = 'tokenize' and attributes.status = 'RUNNING'"):
        assert started.poll() is None, "tokenize ended before the server could be stopped"
        time.sleep(0.1)
    server.stop()
    try:
        _, stderr = started.communicate(timeout=300)
        assert started.returncode != 0
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"MLflow tracking at {tracking_uri} failed" in errors[0], stderr
        assert "Traceback" not in stderr
        refused = dvc(project, env, "repro", "tokenize", check=False)  # still down: refused before any work
        assert refused.returncode != 0
        assert f"error: MLflow tracking server {tracking_uri} is unreachable" in refused.stderr
    finally:
        server.start()
    dvc(project, env, "repro", "tokenize")
    assert "tokenize" not in json.loads(dvc(project, env, "status", "--json").stdout)  # done, and locked
    assert len(client.search_runs([experiment], finished)) == finished_before + 1


def test_a_push_to_an_unreachable_remote_names_it_and_loses_nothing(s3, tmp_path):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    project = tmp_path / "project"
    project.mkdir()
    env = child_env(**CREDENTIALS)
    subprocess.run(["git", "init", "--quiet"], cwd=project, check=True)
    dvc(project, env, "init", "--quiet")
    (project / "data.txt").write_text("the bytes to keep\n")
    dvc(project, env, "add", "data.txt")
    dead = f"http://127.0.0.1:{free_port()}"
    dvc(project, env, "remote", "add", "--default", "store", "s3://dvc/lost")
    dvc(project, env, "remote", "modify", "store", "endpointurl", dead)
    cached = sorted(p.relative_to(project) for p in (project / ".dvc" / "cache").rglob("*") if p.is_file())

    @flow
    def push_once() -> None:
        retrain_module.dvc_push.with_options(retries=0)(project)

    os.environ.update(CREDENTIALS)
    try:
        with prefect_test_harness(server_startup_timeout=120), pytest.raises(RuntimeError) as failed:
            push_once()
    finally:
        for key in CREDENTIALS:
            os.environ.pop(key, None)
    message = str(failed.value)
    assert message.startswith(f"dvc push to remote store (s3://dvc/lost at {dead}) failed:"), message
    assert "\n" not in message
    assert (project / "data.txt").read_text() == "the bytes to keep\n"
    assert sorted(p.relative_to(project) for p in (project / ".dvc" / "cache").rglob("*") if p.is_file()) \
        == cached
    dvc(project, env, "remote", "modify", "store", "endpointurl", s3)
    dvc(project, env, "push")
    assert "in sync" in dvc(project, env, "status", "--cloud").stdout


def test_a_worker_at_another_commit_and_a_push_without_a_remote_are_refused(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    project = tiny_pipeline(tmp_path / "project", git=True)
    params = (project / "params.yaml").read_text()
    with prefect_test_harness(server_startup_timeout=120):
        with pytest.raises(RuntimeError, match=r"at commit \w{12}, the flow's at 000000000000: check out"):
            retrain_module.run_stages(["clean"], {"params.yaml": "seed: 1\n"}, commit="0" * 40,
                                      project=str(project))
        with pytest.raises(RuntimeError, match="need a default DVC remote"):
            retrain_module.retrain(project=str(project), push=True)
    assert (project / "params.yaml").read_text() == params and not (project / "data").exists()  # nothing ran
