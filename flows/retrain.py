"""Prefect flow: retrain the pipeline when its inputs change, one DVC stage per task, and promote the new
classifier only when it beats the champion.

1. Apply params overrides (`stage.key=value`, as `dvc exp run -S` takes them) to params.yaml.
2. Change detection: run `ingest` (it copies the raw sources, so their bytes get hashed), then ask
   `dvc status` whether any stage's inputs, code or params differ from dvc.lock. Nothing changed: the
   flow ends in a `NothingToRetrain` state without running a stage.
3. Each stage as a task running `dvc repro --single-item <stage>`, in dependency order, so dvc.lock
   stays the record of what ran. Retries: pretrain and finetune resume from their checkpoints (they
   live outside DVC's outputs), so a retried training task continues rather than restarts.
4. Promotion gate: the new classifier's test metric (tagged on its registry version by `evaluate`)
   against the version holding the `champion` alias; the alias moves only if the new one is better by
   `margin`. The decision and both figures go to the flow's result and the MLflow parent run.
5. Optionally `dvc push` to the configured remote.

Stages on the right workers: with `gpu_deployment` (a deployment of `run_stages` below, on a GPU work
pool), the stages in `gpu_stages` leave this flow's machine. The flow pushes its outputs to the DVC
remote and hands the deployment the stage names, its git commit, params.yaml, dvc.lock and the
metrics (the outputs DVC leaves to git); the GPU worker, in its own checkout at that commit, pulls what
the stages read, runs them, pushes what they wrote and hands back its dvc.lock and metrics (a Prefect
artifact of its flow run); the flow writes them and pulls the outputs. Data and models move only
through the DVC remote; dvc.lock stays one unbroken record.

Every stage's MLflow run nests under the flow's parent run (PIPELINE_PARENT_RUN_ID), on any worker.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# offline by default: no telemetry from a local Prefect server; room for a cold one to start
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from prefect import flow, get_run_logger, task
from prefect.states import Completed, State

from pipeline import tracking
from pipeline.config import load_config, project_root

STAGES = ("ingest", "clean", "clean_labeled", "tokenize", "tokenize_labeled", "cooccur", "glove", "skipgram",
          "cbow", "cooccur_token", "glove_token", "pretrain", "finetune", "autoencode", "evaluate")
GPU_STAGES = ("pretrain", "finetune", "autoencode", "evaluate")  # the stages that train or run a network


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A DVC command in the project with this interpreter's venv first on PATH (stages run `python`)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                          env=env)


def apply_overrides(params_file: Path, overrides: list[str]) -> None:
    """`a.b=value` assignments into params.yaml, keeping its comments (YAML parses each value)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(params_file.read_text())
    for assignment in overrides:
        key, _, value = assignment.partition("=")
        if not _:
            raise ValueError(f"override {assignment!r} is not key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = yaml.load(value)
    with params_file.open("w") as out:
        yaml.dump(data, out)
    load_config(params_file)  # a bad override stops here, with the key named


def changed_stages(status: dict[str, Any]) -> list[str]:
    """Stages `dvc status --json` reports as changed, ignoring `ingest`'s standing "always changed"."""
    changed = []
    for stage, changes in status.items():
        real = [c for c in changes if c != "always changed"]
        if real:
            changed.append(stage)
    return changed


@task(retries=2, retry_delay_seconds=10, timeout_seconds=6 * 3600)
def run_stage(project: Path, stage: str) -> float:
    """`dvc repro --single-item <stage>`; returns its wall time. A failure raises (and retries)."""
    logger = get_run_logger()
    started = time.perf_counter()
    result = dvc(project, "repro", "--single-item", stage)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"stage {stage} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    logger.info("stage %s: %.1f s", stage, seconds)
    return seconds


def remote_name(project: Path) -> str:
    """The default DVC remote as `name (url)`, for messages; `(none)` when none is configured."""
    found = dvc(project, "remote", "default")
    name = found.stdout.strip()
    if found.returncode != 0 or not name:  # "No default remote set", exit 1
        return "(none)"
    url = dvc(project, "config", f"remote.{name}.url").stdout.strip()
    endpoint = dvc(project, "config", f"remote.{name}.endpointurl").stdout.strip()
    return f"{name} ({url}{' at ' + endpoint if endpoint else ''})"


def transfer(project: Path, command: str, *args: str) -> None:
    """`dvc push` or `dvc pull`; a failure is one line naming the remote (DVC leaves the workspace and
    cache as they were)."""
    result = dvc(project, command, *args)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        direction = "to" if command == "push" else "from"
        raise RuntimeError(f"dvc {command} {direction} remote {remote_name(project)} failed: "
                           f"{lines[-1] if lines else 'exit ' + str(result.returncode)}")


@task(retries=1, retry_delay_seconds=10)
def dvc_push(project: Path, *targets: str) -> None:
    """Push the outputs of `targets` (default: every output in dvc.lock)."""
    transfer(project, "push", *targets)


@task(retries=1, retry_delay_seconds=10)
def dvc_pull(project: Path, *args: str) -> None:
    transfer(project, "pull", *args)


@task
def detect_changes(project: Path) -> list[str]:
    result = dvc(project, "status", "--json")
    if result.returncode != 0:
        raise RuntimeError(f"dvc status failed:\n{result.stderr[-4000:]}")
    return changed_stages(json.loads(result.stdout or "{}"))


def decide_promotion(client: Any, name: str, new_version: str, metric: str, margin: float) -> dict[str, Any]:
    """Move `champion` to `new_version` if its test metric beats the champion's by `margin`."""
    new_score = float(client.get_model_version(name, new_version).tags[f"test_{metric}"])
    champion = tracking.champion_version(client, name)
    decision: dict[str, Any] = {"model": name, "metric": metric, "margin": margin, "new_version": new_version,
                                "new_score": new_score, "champion_version": champion, "champion_score": None}
    if champion is None or champion == new_version:
        decision["promoted"] = True
    else:
        champion_tags = client.get_model_version(name, champion).tags
        champion_score = float(champion_tags.get(f"test_{metric}", "-inf"))
        decision["champion_score"] = champion_score
        decision["promoted"] = new_score >= champion_score + margin
    if decision["promoted"]:
        client.set_registered_model_alias(name, "champion", new_version)
    return decision


@task
def promotion_gate(project: Path, metric: str, margin: float) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    cfg = load_config(project / "params.yaml")
    client = MlflowClient(tracking.tracking_uri(cfg.tracking))
    name = cfg.tracking.classifier_model
    new_version = tracking.version_with_md5(client, name, tracking.path_md5(project / cfg.paths.classifier))
    if new_version is None:
        raise RuntimeError(f"no registered version of {name} matches {cfg.paths.classifier}")
    decision = decide_promotion(client, name, new_version, metric, margin)
    get_run_logger().info("promotion gate: %s", decision)
    return decision


def stage_groups(stages: list[str], away: set[str]) -> list[tuple[bool, list[str]]]:
    """Consecutive runs of `stages`, each marked whether it runs away (in `away`) or here."""
    return [(is_away, list(group)) for is_away, group in itertools.groupby(stages, lambda s: s in away)]


def handoff_key(flow_run_id: str) -> str:
    return f"handoff-{flow_run_id}"


def handoff_files(project: Path) -> dict[str, str]:
    """What travels with a hand-off besides the DVC remote: params.yaml, dvc.lock and the outputs DVC
    leaves to git (`cache: false`: the metrics and plots)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        outs = [out for stage in repo.index.stages for out in stage.outs]
        uncached = [Path(out.fs_path) for out in outs if not out.use_cache]
    paths = [project / "params.yaml", project / "dvc.lock", *sorted(uncached)]
    return {Path(os.path.relpath(p, project)).as_posix(): p.read_text() for p in paths if p.is_file()}


def within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def stage_inputs(project: Path, stages: list[str]) -> list[str]:
    """The cached outputs of other stages that `stages` read: what a worker pulls to run them."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        everything = repo.index.stages
        reads = [str(dep.fs_path) for stage in everything if stage.name in stages for dep in stage.deps]
        made_elsewhere = [str(out.fs_path) for stage in everything if stage.name not in stages
                          for out in stage.outs if out.use_cache]
    needed = {out for out in made_elsewhere for dep in reads if within(dep, out) or within(out, dep)}
    return sorted(os.path.relpath(out, project) for out in needed)


def write_files(project: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"a hand-off file outside the project: {name}")
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)


def run_away(project: Path, stages: list[str], deployment: str, parent_run_id: str) -> dict[str, float]:
    """`stages` on a worker of `deployment`: push what they read, wait for its run, take back its
    dvc.lock and metrics and pull what they wrote."""
    from prefect.artifacts import Artifact
    from prefect.deployments import run_deployment

    dvc_push(project)
    parameters = {"stages": stages, "files": handoff_files(project),
                  "commit": tracking.git_state(project)["git.commit"], "parent_run_id": parent_run_id}
    flow_run = run_deployment(deployment, parameters=parameters, timeout=None)
    if flow_run.state is None or not flow_run.state.is_completed():
        state = flow_run.state.name if flow_run.state else "unknown"
        raise RuntimeError(f"stages {', '.join(stages)} on {deployment} ended {state}")
    artifact = Artifact.get(handoff_key(str(flow_run.id)))
    if artifact is None or not isinstance(artifact.data, str):
        raise RuntimeError(f"the run of {deployment} left no hand-off artifact")
    handoff = json.loads(artifact.data.removeprefix("```json\n").removesuffix("\n```"))
    write_files(project, handoff["files"])
    dvc_pull(project, *stages)
    return {stage: float(seconds) for stage, seconds in handoff["durations"].items()}


@flow(name="run-stages", log_prints=True)
def run_stages(stages: list[str], files: dict[str, str], commit: str = "", parent_run_id: str = "",
               project: str | None = None) -> dict[str, float]:
    """A worker's part of `retrain`: in this checkout (at the caller's `commit`), with the caller's
    params.yaml, dvc.lock and metrics (`files`), pull what `stages` read from the DVC remote, run them,
    push what they wrote; the new dvc.lock and metrics go back as this flow run's artifact."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    root = Path(project).resolve() if project else project_root()
    head = tracking.git_state(root)["git.commit"]
    if commit and head != commit:
        raise RuntimeError(f"this worker's checkout {root} is at commit {head[:12]}, the flow's at "
                           f"{commit[:12]}: check out the same commit")
    if "dvc.lock" not in files:
        (root / "dvc.lock").unlink(missing_ok=True)
    write_files(root, files)
    dvc_pull(root, "--allow-missing", *stage_inputs(root, stages))
    if parent_run_id:
        os.environ[tracking.PARENT_RUN_ENV] = parent_run_id
    durations = {stage: run_stage(root, stage) for stage in stages}
    dvc_push(root, *stages)
    handoff = json.dumps({"files": handoff_files(root), "durations": durations}, indent=1)
    create_markdown_artifact(markdown=f"```json\n{handoff}\n```", key=handoff_key(str(flow_run.id)),
                             description=f"dvc.lock and metrics after {', '.join(stages)}")
    return durations


@flow(name="retrain", log_prints=True)
def retrain(project: str | None = None, overrides: list[str] | None = None, push: bool = False,
            metric: str = "macro_f1", margin: float = 0.0, gpu_deployment: str | None = None,
            gpu_stages: list[str] | None = None, pull: bool = False) -> State | dict[str, Any]:
    """Retrain what changed, stage by stage, then gate the classifier's promotion to `champion`.
    `project`: the project directory (default: the one around the current directory);
    `gpu_deployment`: a deployment of `run_stages` that runs `gpu_stages` (default GPU_STAGES) there;
    `pull`: first fetch the outputs dvc.lock names from the remote (a fresh container or clone then
    reruns only what changed); `push`: push every output at the end."""
    root = Path(project).resolve() if project else project_root()
    if overrides:
        apply_overrides(root / "params.yaml", overrides)
    cfg = load_config(root / "params.yaml")
    if (push or pull or gpu_deployment) and remote_name(root) == "(none)":
        raise RuntimeError("pull, push and stages on other workers need a default DVC remote "
                           "(dvc remote add -d NAME URL)")
    if pull:
        dvc_pull(root, "--allow-missing")
    away = set(gpu_stages if gpu_stages is not None else GPU_STAGES) if gpu_deployment else set()
    with tracking.pipeline_run(cfg.tracking, "retrain", {"trigger": "prefect"}) as parent:
        durations = {"ingest": run_stage(root, "ingest")}
        changed = detect_changes(root)
        if not changed:
            parent.set_tags({"outcome": "nothing to retrain"})
            return Completed(name="NothingToRetrain", message="raw sources, code and params match dvc.lock",
                             data={"outcome": "nothing to retrain", "durations": durations})
        for is_away, group in stage_groups(list(STAGES[1:]), away):
            if is_away and gpu_deployment:
                durations.update(run_away(root, group, gpu_deployment, parent.run_id or ""))
            else:
                durations.update({stage: run_stage(root, stage) for stage in group})
        decision = promotion_gate(root, metric, margin)
        if push:
            dvc_push(root)
        parent.log_metrics({f"seconds_{stage}": s for stage, s in durations.items()})
        parent.log_metrics({"new_score": decision["new_score"], "promoted": float(decision["promoted"])})
        parent.set_tags({"outcome": "retrained", "changed": ",".join(changed),
                         "promotion": json.dumps(decision)})
    return {"outcome": "retrained", "changed": changed, "durations": durations, "promotion": decision}


if __name__ == "__main__":
    retrain()
