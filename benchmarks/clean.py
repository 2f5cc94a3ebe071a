"""Clean-stage throughput on a MediaWiki dump, side by side with gensim's WikiCorpus in one run.

Both sides stream the same bz2 dump with all cores and turn every article into text: ours through
`pipeline.clean.run` (parse, repair, filter, dedup, split, write Parquet), gensim through
`WikiCorpus(...).get_texts()` (its regex markup filter plus lowercase tokenisation, no dictionary).
Runs alternate, never overlap; medians are reported. "Cleaner" is measured by markup residue: words
that only wiki markup produces (ref, nbsp, thumb, px, cite...) per million words of each output.

    python benchmarks/clean.py [--repeats 3] [--dump PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py shadows the standard library's `tokenize` for scripts in this folder:
# replace the folder with the project root on the path before anything imports it.
ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import bz2  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
from gensim.corpora.wikicorpus import WikiCorpus  # noqa: E402

from pipeline import clean, ingest  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.files import resolve_package_path  # noqa: E402

DEFAULT_DUMP = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MARKUP_WORDS = ("ref", "nbsp", "thumb", "px", "cite", "infobox", "defaultsort", "wikitable", "colspan",
                "rowspan", "align", "style", "upright", "jpg", "svg", "png", "reflist", "isbn", "url")
WORD = re.compile(r"\w+")


def ours(dump: Path, workdir: Path) -> tuple[float, list[str]]:
    cfg = parse_config({
        "paths": {"raw": str(workdir / "raw"), "clean": str(workdir / "clean"), "metrics": str(workdir)},
        "data": {"sources": [{"name": "wiki", "format": "mediawiki", "path": str(dump)}]},
        "tracking": {"enabled": False},
    })
    ingest.run(cfg, workdir / "raw")  # a file copy, outside the timed region
    started = time.perf_counter()
    clean.run(cfg, workdir / "raw", workdir / "clean", workdir / "clean.json")
    seconds = time.perf_counter() - started
    return seconds, pq.read_table(workdir / "clean" / clean.CORPUS_FILE).column("text").to_pylist()


def gensim(dump: Path) -> tuple[float, list[str]]:
    started = time.perf_counter()
    corpus = WikiCorpus(str(dump), dictionary={}, processes=os.cpu_count())
    corpus.metadata = False
    texts = [" ".join(tokens) for tokens in corpus.get_texts()]
    return time.perf_counter() - started, texts


def residue_per_million(texts: list[str]) -> tuple[float, dict[str, int]]:
    words = Counter(w for t in texts for w in WORD.findall(t.lower()))
    total = sum(words.values())
    hits = {w: words[w] for w in MARKUP_WORDS if words[w]}
    return 1e6 * sum(hits.values()) / max(total, 1), hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dump", default=DEFAULT_DUMP, help="a MediaWiki dump (.bz2), file or pkg://")
    args = parser.parse_args()
    dump = resolve_package_path(args.dump) if args.dump.startswith("pkg://") else Path(args.dump)
    with bz2.open(dump, "rb") as f:
        raw_mb = len(f.read()) / 1e6
    times: dict[str, list[float]] = {"ours": [], "gensim": []}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            seconds, outputs["ours"] = ours(dump, Path(tmp))
        times["ours"].append(seconds)
        seconds, outputs["gensim"] = gensim(dump)
        times["gensim"].append(seconds)
    result: dict[str, object] = {"dump": dump.name, "uncompressed_mb": round(raw_mb, 2),
                                 "cores": os.cpu_count()}
    print(f"{'':8} {'median s':>9} {'MB/s':>7} {'articles':>9} {'markup words/M':>15}")
    for name in ("ours", "gensim"):
        median = statistics.median(times[name])
        residue, hits = residue_per_million(outputs[name])
        result[name] = {"seconds": round(median, 3), "mb_per_s": round(raw_mb / median, 2),
                        "articles": len(outputs[name]), "markup_words_per_million": round(residue, 1),
                        "markup_words": hits, "runs": [round(t, 3) for t in times[name]]}
        print(f"{name:8} {median:9.2f} {raw_mb / median:7.2f} {len(outputs[name]):9d} {residue:15.1f}")
    ratio = statistics.median(times["gensim"]) / statistics.median(times["ours"])
    result["throughput_ratio_ours_over_gensim"] = round(ratio, 2)
    print(f"throughput ours / gensim: {ratio:.2f}x (goal >= 1.5x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
