"""Which stages `dvc repro` would rerun, and why: code, params, data, a missing output, or a stage
upstream that reruns. DVC decides; this names its reasons."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARAMS_SUFFIXES = (".yaml", ".yml", ".json", ".toml")
CODE_SUFFIXES = (".py",)


KINDS = ("params", "code", "data", "output", "upstream")


@dataclass
class StageStatus:
    name: str
    reasons: list[tuple[str, str]] = field(default_factory=list)  # (kind, what): kind one of KINDS
    always: bool = False  # `always_changed` stages (ingest) rerun every time; alone they change nothing


def dependency_reasons(path: str, change: Any) -> list[tuple[str, str]]:
    if isinstance(change, dict):  # a params file: key -> new | modified | deleted
        return [("params", key if what == "modified" else f"{key} ({what})") for key, what in change.items()]
    kind = "code" if path.endswith(CODE_SUFFIXES) or path.startswith("pipeline/") else "data"
    return [(kind, path if change == "modified" else f"{path} ({change})")]


def stage_reasons(name: str, entries: list[Any]) -> StageStatus:
    status = StageStatus(name)
    for entry in entries:
        if entry == "always changed":
            status.always = True
        elif entry == "changed command":
            status.reasons.append(("code", "its command"))
        elif isinstance(entry, dict):
            for path, change in entry.get("changed deps", {}).items():
                status.reasons.extend(dependency_reasons(path, change))
            for path, change in entry.get("changed outs", {}).items():
                status.reasons.append(("output", f"{path} ({change})"))
    return status


def rebuilds(status: StageStatus) -> bool:
    """Whether a stale stage's rerun can change what its dependents read: not when only its own
    outputs were modified (the rerun restores them as recorded; readers of the modified files are
    stale on their own account)."""
    return any(kind != "output" for kind, _ in status.reasons)


def stale_stages(root: Path) -> tuple[list[StageStatus], list[str]]:
    """The stages that would rerun, in pipeline order, each with its reasons, and the stages that
    are up to date."""
    import networkx as nx
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:  # DVC reads some paths from the cwd
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        reported = repo.status()
        order = [stage.name for stage in reversed(list(nx.topological_sort(graph)))]
        needs = {s.name: [d.name for d in graph.successors(s)] for s in graph.nodes}
    found: dict[str, StageStatus] = {}
    for name in order:
        status = stage_reasons(name, reported.get(name, []))
        status.reasons += [("upstream", d) for d in needs[name] if d in found and rebuilds(found[d])]
        if status.reasons or status.always:
            found[name] = status
    stale = [found[name] for name in order if name in found]
    fresh = [name for name in order if name not in found]
    return stale, fresh


def render(stale: list[StageStatus], fresh: list[str]) -> str:
    rerun = [s for s in stale if s.reasons]
    always = [s.name for s in stale if not s.reasons]
    width = max((len(s.name) for s in rerun), default=0)
    lines = [f"{len(rerun)} of {len(stale) + len(fresh)} stages would rerun" + (":" if rerun else ".")]
    for status in rerun:
        parts = []
        for kind in KINDS:
            items = [what for k, what in status.reasons if k == kind]
            if items:
                more = f" +{len(items) - 2}" if len(items) > 2 else ""
                parts.append(f"{kind}: {', '.join(items[:2])}{more}")
        lines.append(f"  {status.name:{width}s}  {' | '.join(parts)}")
    if fresh:
        lines.append("up to date: " + ", ".join(fresh))
    if always:
        lines.append(f"always run: {', '.join(always)} (recopies the sources; the same bytes change nothing)")
    return "\n".join(lines)
