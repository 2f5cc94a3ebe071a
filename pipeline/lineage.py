"""Lineage: from any output back to the raw bytes, and from any input forward to everything built
from it, read from `dvc.lock` (at the workspace or any git revision) and joined to MLflow runs by the
md5 values both record.

- `trace(target)`: the chain of stages that produced a path, each with its inputs' and outputs' md5,
  its params, and the MLflow run whose output tags carry the same md5 (with its git commit).
- `verify(target)`: recompute the hashes on disk along that chain; name every artifact that no longer
  matches, and every stage downstream of it.
- `impacted(path)`: every stage and output built, directly or not, from a path.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import project_root
from pipeline.files import InputError
from pipeline.tracking import NotInStore, finished_stage_runs, model_version_tags, path_md5, run_tags

LOCK_FILE = "dvc.lock"
RAW_MANIFEST = "sources.json"


@dataclass(frozen=True)
class Artifact:
    path: str
    md5: str
    size: int | None = None

    def contains(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path.rstrip("/") + "/")


@dataclass
class StageRecord:
    name: str
    cmd: str
    deps: list[Artifact]
    outs: list[Artifact]
    params: dict[str, Any] = field(default_factory=dict)


def _artifacts(entries: list[dict[str, Any]] | None) -> list[Artifact]:
    return [Artifact(e["path"], e.get("md5", ""), e.get("size")) for e in entries or []]


def read_lock(root: Path | None = None, rev: str | None = None) -> dict[str, StageRecord]:
    """The stages dvc.lock records, from the workspace or from git revision `rev`."""
    root = root or project_root()
    if rev is None:
        lock_path = root / LOCK_FILE
        if not lock_path.exists():
            raise InputError(f"{lock_path}: no dvc.lock yet; run the pipeline first (dvc repro)")
        text = lock_path.read_text()
    else:
        shown = subprocess.run(["git", "show", f"{rev}:{LOCK_FILE}"], cwd=root, capture_output=True,
                               text=True, check=False)
        if shown.returncode != 0:
            raise InputError(f"git revision '{rev}': no {LOCK_FILE} there ({shown.stderr.strip()})")
        text = shown.stdout
    stages = yaml.safe_load(text).get("stages", {})
    return {
        name: StageRecord(
            name, str(entry.get("cmd", "")), _artifacts(entry.get("deps")), _artifacts(entry.get("outs")),
            {k: v for file_params in (entry.get("params") or {}).values() for k, v in file_params.items()},
        )
        for name, entry in stages.items()
    }


def producer(stages: dict[str, StageRecord], path: str) -> StageRecord | None:
    return next((s for s in stages.values() if any(o.contains(path) for o in s.outs)), None)


def upstream(stages: dict[str, StageRecord], path: str) -> list[StageRecord]:
    """The stages that built `path`, nearest first, each once."""
    order: list[StageRecord] = []
    pending = [path]
    while pending:
        stage = producer(stages, pending.pop(0))
        if stage is None or stage in order:
            continue
        order.append(stage)
        pending.extend(d.path for d in stage.deps)
    return order


def downstream(stages: dict[str, StageRecord], path: str) -> dict[str, list[str]]:
    """The stages built from `path`, directly or through other stages, each with its outputs: DVC's
    graph is exact (every stage depends on what it reads under its params), so no finer rule."""
    found: dict[str, list[str]] = {}
    frontier = [path]
    while frontier:
        current = frontier.pop(0)
        for stage in stages.values():
            uses = any(d.contains(current) or Artifact(current, "").contains(d.path) for d in stage.deps)
            if not uses:
                continue
            reached = [o.path for o in stage.outs if o.path not in found.get(stage.name, [])]
            if reached:
                found.setdefault(stage.name, []).extend(reached)
                frontier.extend(reached)
    return found


def relative(target: str, root: Path) -> str:
    path = Path(target)
    if path.is_absolute():
        try:
            return path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise InputError(f"{target}: not inside the project ({root})") from None
    return path.as_posix().rstrip("/")


def raw_sources(stages: dict[str, StageRecord], root: Path, rev: str | None) -> list[dict[str, Any]]:
    """The raw files the ingest stage copied in, with md5 as DVC computed them (its .dir manifest)."""
    ingest = stages.get("ingest")
    if ingest is None:
        return []
    found = []
    for out in ingest.outs:
        manifest = root / ".dvc" / "cache" / "files" / "md5" / out.md5[:2] / out.md5[2:]
        entries = json.loads(manifest.read_text()) if manifest.exists() else []
        origins = _raw_origins(root / out.path / RAW_MANIFEST, rev is None)
        for entry in entries:
            if entry["relpath"] == RAW_MANIFEST:
                continue
            source = entry["relpath"].split("/")[1]  # <kind>/<source>/<file>
            found.append({"path": f"{out.path}/{entry['relpath']}", "md5": entry["md5"], "source": source,
                          "origin": origins.get(source, "")})
    return found


def _raw_origins(manifest: Path, readable: bool) -> dict[str, str]:
    if not readable or not manifest.exists():
        return {}
    return {name: entry["origin"] for name, entry in json.loads(manifest.read_text()).items()}


def mlflow_run_for(stage: StageRecord, tracking_uri: str | None) -> dict[str, str] | None:
    """The latest finished MLflow run of this stage whose output tags carry one of dvc.lock's md5s."""
    if tracking_uri is None or not stage.outs:
        return None
    recorded = {o.md5 for o in stage.outs}
    for run_id, tags in finished_stage_runs(tracking_uri, stage.name):
        if recorded & {v for k, v in tags.items() if k.startswith("output.")}:
            return {"run_id": run_id, "git_commit": tags.get("git.commit", ""),
                    "git_dirty": tags.get("git.dirty", "")}
    return None


def output_with_md5(stages: dict[str, StageRecord], md5s: set[str], target: str) -> str:
    for stage in stages.values():
        for out in stage.outs:
            if out.md5 in md5s:
                return out.path
    raise InputError(f"{target}: its md5 ({', '.join(sorted(md5s)) or 'none recorded'}) matches no output "
                     f"in {LOCK_FILE}; was it built from another revision (--rev)?")


def resolve_target(target: str, stages: dict[str, StageRecord], root: Path, tracking_uri: str | None) -> str:
    """An output path from a path, an MLflow run id, or a `models:/name@alias` (or `/version`) URI:
    the run's output md5 tags, or the model version's md5 tag, name the dvc.lock output."""
    is_run_id = len(target) == 32 and all(c in "0123456789abcdef" for c in target)
    if not (target.startswith("models:/") or (is_run_id and not (root / target).exists())):
        return relative(target, root)
    if tracking_uri is None:
        raise InputError(f"{target}: resolving it needs MLflow tracking")
    try:
        if is_run_id:
            tags = run_tags(tracking_uri, target)
            md5s = {v for k, v in tags.items() if k.startswith("output.") and k.endswith(".md5")}
        else:
            name, _, alias = target.removeprefix("models:/").partition("@")
            name, _, version = name.partition("/")
            tags = model_version_tags(tracking_uri, name, alias or None, version or None)
            md5s = {tags["md5"]} if tags.get("md5") else set()
    except NotInStore as exc:
        raise InputError(f"{target}: not found in MLflow ({exc})") from None
    return output_with_md5(stages, md5s, target)


def trace(target: str, root: Path | None = None, rev: str | None = None,
          tracking_uri: str | None = None) -> dict[str, Any]:
    """The chain from `target` (an output path, an MLflow run id or a models:/ URI) back to the raw
    sources."""
    root = root or project_root()
    stages = read_lock(root, rev)
    path = resolve_target(target, stages, root, tracking_uri)
    chain = upstream(stages, path)
    if not chain:
        raise InputError(f"{target}: no stage in {LOCK_FILE} produced this path")
    return {
        "target": path,
        "rev": rev or "workspace",
        "stages": [
            {
                "stage": s.name, "cmd": s.cmd, "params": s.params,
                "outs": [vars(o) for o in s.outs], "deps": [vars(d) for d in s.deps],
                "mlflow": mlflow_run_for(s, tracking_uri),
            }
            for s in chain
        ],
        "raw_sources": raw_sources(stages, root, rev),
    }


def verify(target: str, root: Path | None = None) -> list[dict[str, Any]]:
    """Every artifact along `target`'s chain whose bytes on disk differ from dvc.lock."""
    root = root or project_root()
    stages = read_lock(root)
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    for stage in upstream(stages, relative(target, root)):
        for artifact in [*stage.outs, *stage.deps]:
            if artifact.path in seen:
                continue
            seen.add(artifact.path)
            on_disk = root / artifact.path
            actual = path_md5(on_disk) if on_disk.exists() else "missing"
            if actual != artifact.md5:
                problems.append({
                    "path": artifact.path, "recorded": artifact.md5, "actual": actual,
                    "changed_files": _changed_files(on_disk, artifact, root),
                    "downstream": list(downstream(stages, artifact.path)),
                })
    return problems


def _changed_files(on_disk: Path, artifact: Artifact, root: Path) -> list[str]:
    """For a directory, which of its files differ from the recorded manifest."""
    manifest = root / ".dvc" / "cache" / "files" / "md5" / artifact.md5[:2] / artifact.md5[2:]
    if not artifact.md5.endswith(".dir") or not manifest.exists() or not on_disk.is_dir():
        return []
    recorded = {e["relpath"]: e["md5"] for e in json.loads(manifest.read_text())}
    present = {p.relative_to(on_disk).as_posix(): p for p in on_disk.rglob("*") if p.is_file()}
    changed = [f"{artifact.path}/{rel}" for rel, md5 in recorded.items()
               if rel not in present or path_md5(present[rel]) != md5]
    return sorted(changed + [f"{artifact.path}/{rel}" for rel in present if rel not in recorded])


def impacted(path: str, root: Path | None = None, rev: str | None = None,
             tracking_uri: str | None = None) -> dict[str, Any]:
    """Every stage and output built from `path` (a raw file, a code file, any output), and with
    `tracking_uri` the MLflow run of each of those stages and the registered model versions whose
    md5 is one of those outputs'."""
    root = root or project_root()
    stages = read_lock(root, rev)
    target = relative(path, root)
    users = downstream(stages, target)
    if not users and producer(stages, target) is None:
        raise InputError(f"{path}: {LOCK_FILE} records no stage that reads or writes this path")
    result: dict[str, Any] = {"input": target, "stages": users, "mlflow_runs": {}, "model_versions": []}
    if tracking_uri is not None:
        from mlflow.tracking import MlflowClient

        result["mlflow_runs"] = {name: (mlflow_run_for(stages[name], tracking_uri) or {}).get("run_id")
                                 for name in users}
        md5s = {o.md5 for name in users for o in stages[name].outs}
        client = MlflowClient(tracking_uri)
        result["model_versions"] = [
            f"models:/{v.name}/{v.version}" for model in client.search_registered_models()
            for v in client.search_model_versions(f"name='{model.name}'") if v.tags.get("md5") in md5s
        ]
    return result
