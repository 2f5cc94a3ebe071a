"""Ingest stage: copy each raw source, byte for byte, into `paths.raw/<kind>/<source name>/`, where
the kind is `labeled` (a source with a `label_field`) or `corpus`, so each clean stage depends on
exactly the sources it reads; `paths.raw/sources.json` lists every source's origin, kind and files.

Sources can live anywhere: in an installed package (`pkg://`), in a local file, directory or glob,
or at an http(s) URL. Copying them into the workspace makes DVC hash them, so `dvc.lock` records
the md5 of the exact raw bytes every later stage was built from. Raw inputs are only read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import Config, Source, project_root
from pipeline.files import InputError, atomic_dir, file_digest, resolve_paths, write_json
from pipeline.stagecli import stage_main

URL_SCHEMES = ("http://", "https://")
COPY_CHUNK = 1 << 20


def download(url: str, target: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out, COPY_CHUNK)
    except OSError as exc:
        raise InputError(f"{url}: download failed: {exc}") from None


def source_files(source: Source, base: Path) -> list[tuple[Path, str]]:
    """(file, name inside the source's raw folder) for every file a local source names."""
    files = resolve_paths(source.path, base)
    if len(files) == 1:
        return [(files[0], files[0].name)]
    root = Path(os.path.commonpath(files))
    return [(f, f.relative_to(root).as_posix()) for f in files]


def ingest_source(source: Source, folder: Path, base: Path) -> list[dict[str, Any]]:
    folder.mkdir(parents=True)
    if source.path.startswith(URL_SCHEMES):
        name = source.path.rstrip("/").rsplit("/", 1)[-1] or "download"
        download(source.path, folder / name)
        copied = [folder / name]
    else:
        copied = []
        for path, name in source_files(source, base):
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied.append(target)
    return [
        {"file": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "md5": file_digest(p, "md5")}
        for p in copied
    ]


def run(cfg: Config, raw_dir: Path, base: Path | None = None) -> dict[str, Any]:
    """Copy every configured source into `raw_dir/<kind>/<name>/`; returns origin, kind and files
    (sizes and md5) per source."""
    base = base or project_root()
    report: dict[str, Any] = {}
    with atomic_dir(raw_dir) as tmp:
        for source in cfg.data.sources:
            files = ingest_source(source, tmp / source.kind / source.name, base)
            report[source.name] = {"origin": source.path, "kind": source.kind, "files": files}
        write_json(tmp / "sources.json", report)
    return report


def read_report(raw_dir: Path) -> dict[str, Any] | None:
    """The previous copy's sources.json (DVC keeps the output between runs: `persist`), if any."""
    try:
        return json.loads((raw_dir / "sources.json").read_text())
    except (OSError, ValueError):
        return None


def execute(cfg: Config) -> str:
    """The stage as DVC runs it: paths from params, a summary line, and one MLflow run when the bytes
    differ from the last copy's (DVC reruns ingest every time; a no-op rerun should stay cheap)."""
    from pipeline import tracking

    raw_dir = project_root() / cfg.paths.raw
    previous = read_report(raw_dir)
    report = run(cfg, raw_dir)
    summary = "\n".join(
        f"ingest: {name}: {len(entry['files'])} file(s), "
        f"{sum(f['bytes'] for f in entry['files']):,} bytes from {entry['origin']}"
        for name, entry in report.items()
    )
    if report == previous:  # the same bytes from the same origins: an earlier run already records them
        return summary + "\ningest: unchanged since the last copy (no new MLflow run)"
    params = {"sources": [s.model_dump() for s in cfg.data.sources]}
    with tracking.stage_run("ingest", cfg.tracking, params, {}, {"raw": raw_dir}) as run_log:
        files = [(name, f) for name, entry in report.items() for f in entry["files"]]
        run_log.log_metrics({f"{name}.{f['file']}.bytes": f["bytes"] for name, f in files})
        run_log.set_tags({f"raw.{name}.{f['file']}.md5": f["md5"] for name, f in files})
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("ingest", __doc__, execute, argv)


if __name__ == "__main__":
    sys.exit(main())
