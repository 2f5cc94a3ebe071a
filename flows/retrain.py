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

Every stage's MLflow run nests under the flow's parent run (PIPELINE_PARENT_RUN_ID).
"""

from __future__ import annotations

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


@flow(name="retrain", log_prints=True)
def retrain(project: str | None = None, overrides: list[str] | None = None, push: bool = False,
            metric: str = "macro_f1", margin: float = 0.0) -> State | dict[str, Any]:
    """Retrain what changed, stage by stage, then gate the classifier's promotion to `champion`.
    `project`: the project directory (default: the one around the current directory)."""
    root = Path(project).resolve() if project else project_root()
    if overrides:
        apply_overrides(root / "params.yaml", overrides)
    cfg = load_config(root / "params.yaml")
    with tracking.pipeline_run(cfg.tracking, "retrain", {"trigger": "prefect"}) as parent:
        durations = {"ingest": run_stage(root, "ingest")}
        changed = detect_changes(root)
        if not changed:
            parent.set_tags({"outcome": "nothing to retrain"})
            return Completed(name="NothingToRetrain", message="raw sources, code and params match dvc.lock",
                             data={"outcome": "nothing to retrain", "durations": durations})
        for stage in STAGES[1:]:
            durations[stage] = run_stage(root, stage)
        decision = promotion_gate(root, metric, margin)
        if push:
            result = dvc(root, "push")
            if result.returncode != 0:
                raise RuntimeError(f"dvc push failed:\n{result.stderr[-4000:]}")
        parent.log_metrics({f"seconds_{stage}": s for stage, s in durations.items()})
        parent.log_metrics({"new_score": decision["new_score"], "promoted": float(decision["promoted"])})
        parent.set_tags({"outcome": "retrained", "changed": ",".join(changed),
                         "promotion": json.dumps(decision)})
    return {"outcome": "retrained", "changed": changed, "durations": durations, "promotion": decision}


if __name__ == "__main__":
    retrain()
