"""Wikitext-to-text throughput on a MediaWiki dump, side by side with gensim's WikiCorpus in one run.

Like for like, both sides stream the same .bz2 dump in the main process and convert articles in a
pool over all cores, and the clock covers pool start, reading, conversion and collecting the texts:
- ours: `read_mediawiki` -> batches -> `pipeline.stages.clean._clean_batch` in a fork pool, as
  `pipeline.stages.clean.run` does: `wikitext_to_text` (markup to prose), `repair` (mojibake gate, control
  characters, NFC, whitespace) and the dedup key (case-folded words); no MinHash;
- gensim: `WikiCorpus(dump, dictionary={}, processes=cores).get_texts()`: `filter_wiki` (regexes),
  lowercase tokenisation, short-article pruning; no Dictionary.
The whole clean stage (`pipeline.stages.clean.run`: also filters, exact + MinHash dedup, split, Parquet)
is timed as a third, informative row. Runs alternate, never overlap; medians are reported.

"Cleaner": markup left in each output. Ours keeps punctuation, so markup tokens (`{{`, `[[`, `<ref`,
`|-`, ...) are counted per MB; gensim drops punctuation, so the fair count is markup *words*
(ref, nbsp, thumb, px, jpg, ...) per million words, both sides tokenised by gensim's own tokenizer.

    python benchmarks/clean.py [--repeats 3] [--batch-pages 8] [--dump PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
from gensim.corpora.wikicorpus import WikiCorpus  # noqa: E402
from gensim.corpora.wikicorpus import tokenize as gensim_tokenize  # noqa: E402

from pipeline.config import Dedup, parse_config  # noqa: E402
from pipeline.files import resolve_package_path  # noqa: E402
from pipeline.sources import read_mediawiki  # noqa: E402
from pipeline.stages import clean, ingest  # noqa: E402

DEFAULT_DUMP = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MARKUP_TOKENS = {"{{": r"\{\{", "}}": r"\}\}", "[[": r"\[\[", "]]": r"\]\]", "<ref": r"<ref\b",
                 "{|": r"\{\|", "|-": r"^\|-", "&nbsp;": r"&nbsp;", "thumb|": r"\bthumb\|",
                 "File:/Category:": r"\b(?:File|Image|Category):", "| k = v line": r"^\s*\|\s*[\w -]+="}
# Words only markup produces (prose words like "style", "thumb" or "upright" are left out).
MARKUP_WORDS = ("ref", "nbsp", "px", "jpg", "jpeg", "png", "svg", "gif", "thumbnail", "infobox", "reflist",
                "defaultsort", "wikitable", "colspan", "rowspan", "bgcolor", "cellpadding", "nowrap")
Run = Callable[[], tuple[float, list[str]]]  # seconds, texts


def ours(dump: Path, batch_pages: int) -> tuple[float, list[str]]:
    started = time.perf_counter()
    work = functools.partial(clean._clean_batch, dedup=Dedup(near=False))
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        batches = clean.batched(read_mediawiki(dump), batch_pages)
        texts = [doc.text for batch in pool.imap(work, batches) for doc in batch]
    return time.perf_counter() - started, texts


def ours_stage(dump: Path, batch_pages: int) -> tuple[float, list[str]]:
    """The whole clean stage; the ingest copy (a file copy) is done first, outside the clock."""
    with tempfile.TemporaryDirectory() as tmp:
        return _stage(dump, batch_pages, Path(tmp))


def _stage(dump: Path, batch_pages: int, workdir: Path) -> tuple[float, list[str]]:
    cfg = parse_config({
        "paths": {"raw": str(workdir / "raw"), "clean": str(workdir / "clean"), "metrics": str(workdir)},
        "data": {"sources": [{"name": "wiki", "format": "mediawiki", "path": str(dump)}],
                 "clean": {"batch_pages": batch_pages}},
        "tracking": {"enabled": False},
    })
    ingest.run(cfg, workdir / "raw")
    started = time.perf_counter()
    clean.run(cfg, workdir / "raw", workdir / "clean", workdir / "clean.json", kinds=("corpus",))
    seconds = time.perf_counter() - started
    return seconds, pq.read_table(workdir / "clean" / clean.CORPUS_FILE).column("text").to_pylist()


def gensim(dump: Path) -> tuple[float, list[str]]:
    started = time.perf_counter()
    corpus = WikiCorpus(str(dump), dictionary={}, processes=os.cpu_count())
    corpus.metadata = False
    texts = [" ".join(tokens) for tokens in corpus.get_texts()]
    return time.perf_counter() - started, texts


def markup_per_mb(texts: list[str]) -> dict[str, float]:
    text = "\n".join(texts)
    mb = max(len(text.encode()), 1) / 1e6
    return {k: round(len(re.findall(p, text, re.MULTILINE)) / mb, 1) for k, p in MARKUP_TOKENS.items()}


def markup_words(texts: list[str]) -> tuple[int, float, dict[str, int]]:
    words = Counter(w for t in texts for w in gensim_tokenize(t))
    total = sum(words.values())
    hits = {w: words[w] for w in MARKUP_WORDS if words[w]}
    return total, 1e6 * sum(hits.values()) / max(total, 1), hits


def residue_context(texts: list[str], word: str, width: int = 70) -> str:
    for text in texts:
        if match := re.search(rf"\b{word}\b", text, re.IGNORECASE):
            return repr("..." + text[max(0, match.start() - width) : match.end() + width] + "...")
    return "(none)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-pages", type=int, default=8, help="pages per worker task (ours)")
    parser.add_argument("--no-stage", action="store_true", help="skip the whole-stage row")
    parser.add_argument("--dump", default=DEFAULT_DUMP, help="a MediaWiki dump (.bz2), file or pkg://")
    args = parser.parse_args()
    dump = resolve_package_path(args.dump) if args.dump.startswith("pkg://") else Path(args.dump)
    wikitext_mb = sum(len(doc.text.encode()) for doc in read_mediawiki(dump)) / 1e6
    bz2_mb = dump.stat().st_size / 1e6
    runs: dict[str, Run] = {"ours": lambda: ours(dump, args.batch_pages), "gensim": lambda: gensim(dump)}
    if not args.no_stage:
        runs["ours stage"] = lambda: ours_stage(dump, args.batch_pages)
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds, outputs[name] = run()
            times[name].append(seconds)

    result: dict[str, object] = {"dump": dump.name, "wikitext_mb": round(wikitext_mb, 3),
                                 "bz2_mb": round(bz2_mb, 3), "cores": os.cpu_count(),
                                 "batch_pages": args.batch_pages, "repeats": args.repeats}
    print(f"{dump.name}: {wikitext_mb:.2f} MB wikitext in its articles, {bz2_mb:.2f} MB bz2; "
          f"{os.cpu_count()} cores, medians of {args.repeats} alternating runs")
    print(f"{'':10} {'seconds':>7} {'wikitext MB/s':>13} {'bz2 MB/s':>8} {'articles':>8} "
          f"{'markup words/M':>14}")
    for name in runs:
        median = statistics.median(times[name])
        words, per_million, hits = markup_words(outputs[name])
        result[name] = {
            "seconds": round(median, 3), "runs": [round(t, 3) for t in times[name]],
            "wikitext_mb_per_s": round(wikitext_mb / median, 2), "bz2_mb_per_s": round(bz2_mb / median, 3),
            "articles": len(outputs[name]), "words": words,
            "markup_words_per_million": round(per_million, 1), "markup_words": hits,
            # gensim's output has no punctuation left to hold markup tokens: not comparable
            "markup_tokens_per_mb": None if name == "gensim" else markup_per_mb(outputs[name]),
        }
        print(f"{name:10} {median:7.2f} {wikitext_mb / median:13.2f} {bz2_mb / median:8.3f} "
              f"{len(outputs[name]):8d} {per_million:14.1f}")
    gensim_s = statistics.median(times["gensim"])
    ratios = {name: round(gensim_s / statistics.median(times[name]), 2) for name in runs if name != "gensim"}
    result["throughput_over_gensim"] = ratios
    print("throughput / gensim's:", ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()), "(goal >= 1.5x)")
    print(f"markup tokens per MB, ours: {markup_per_mb(outputs['ours'])}")
    for name in ("ours", "gensim"):
        print(f"markup words, {name}: {markup_words(outputs[name])[2]}")
    for name in ("ours", "gensim"):
        print(f"sample, {name}: {outputs[name][0][:200]!r}")
    for word in ("px", "jpg"):
        for name in ("ours", "gensim"):
            print(f"first '{word}', {name}: {residue_context(outputs[name], word)}")
    print(json.dumps(result))

if __name__ == "__main__":
    main()
