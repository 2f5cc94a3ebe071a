"""Co-occurrence and GloVe side by side with a peer on the same corpus, in one run, with the quality of both.

Corpus: by default the train split of the default clean corpus (`data/clean/corpus.parquet`), as the
cooccur stage reads it: lowercased words (`words.pattern`), one document per line for the peer.
`--text gensim` takes the same dump's pages as gensim's `WikiCorpus` tokenizes them instead (the issue's
reference figures were measured on that text; it keeps table cells, our cleaning drops them), and
`--splits all` every page rather than the train split (pages follow `data/splits/corpus.parquet`).
The labeled set's train texts follow the pages, as the stage counts them, unless `--no-labeled` (or
`words.include_labeled_train: inputs/none`).
- Peer, when `--glove-c DIR` names a built Stanford GloVe checkout (`make` in it; never committed):
  `vocab_count` + `cooccur` timed against our cooccur stage (which also builds the vocabulary), both
  with `cooccur.memory_mb` of counting memory (`--memory-mb`), then
  `shuffle` + `glove` (same dim, iterations, x_max, window, min count, threads = cores) against our glove
  stage, seconds per iteration from wall time over iterations.
- Otherwise gensim's Word2Vec (skip-gram, same window, dim, min count, epochs, workers = cores).
Quality: WordSim353 and SimLex-999 Spearman and analogy accuracy (3CosAdd), with coverage, evaluated
by `pipeline.wordbench` for both sides.

    python benchmarks/glove.py [--glove-c /path/to/GloVe] [--seeds 1] [--text gensim] [--splits all]
                               [--no-labeled] [--memory-mb MB]
    # after `make run`
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
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipeline import wordbench  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.files import resolve_package_path  # noqa: E402
from pipeline.stages import clean, cooccur, glove  # noqa: E402
from pipeline.vectors import CORPUS_FILE, LABELED_FILE, train_texts  # noqa: E402


def gensim_pages(cfg: Config) -> dict[str, str]:
    """Page title -> its text as gensim's WikiCorpus tokenizes it, for the first MediaWiki source."""
    from gensim.corpora.wikicorpus import WikiCorpus

    source = next(s for s in cfg.data.sources if s.format == "mediawiki")
    wiki = WikiCorpus(str(resolve_package_path(source.path)), dictionary={}, processes=os.cpu_count())
    wiki.metadata = True
    return {title: " ".join(tokens) for tokens, (_, title) in wiki.get_texts()}


def corpus_dir(cfg: Config, text: str, splits: str, labeled: bool, work: Path) -> Path:
    """A clean dir whose corpus.parquet has the chosen texts, all marked train (what cooccur counts)."""
    wanted = {"train", "val", "test"} if splits == "all" else {"train"}
    corpus = pq.read_table(ROOT / cfg.paths.clean / clean.CORPUS_FILE, columns=["text", "split"]).to_pydict()
    texts = [t for t, s in zip(corpus["text"], corpus["split"], strict=True) if s in wanted]
    if text == "gensim":
        manifest = pq.read_table(ROOT / cfg.paths.splits / clean.CORPUS_FILE).to_pydict()
        split_of = dict(zip(manifest["key"], manifest["split"], strict=True))
        texts = [t for title, t in gensim_pages(cfg).items() if split_of.get(f"title:{title}") in wanted]
    if labeled:
        texts += train_texts(ROOT / cfg.paths.clean / LABELED_FILE)
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, "split": ["train"] * len(texts)}), work / clean.CORPUS_FILE)
    return work


def quality(vectors: wordbench.WordVectors, cfg: Config) -> dict[str, Any]:
    files = wordbench.benchmark_files(cfg.word_eval.benchmarks.model_dump(), ROOT)
    return wordbench.evaluate(vectors, *files)


def ours(cfg: Config, clean_dir: Path, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    cooccur.run(cfg, clean_dir, work / "tokenizer", work / "tokens", work / "co", work / "co.json")
    cooccur_seconds = time.perf_counter() - started
    metrics = glove.run(cfg, work / "co", work / "glove", work)
    seconds = [h["seconds"] for h in metrics["history"]]
    return {"cooccur_seconds": cooccur_seconds, "nnz": metrics["records"], "vocab": metrics["vocab_size"],
            "epoch_seconds": statistics.median(seconds),
            "quality": {k: metrics[k] for k in ("wordsim353", "simlex999", "analogy")}}


def glove_c(cfg: Config, clean_dir: Path, work: Path, binaries: Path, seed: int) -> dict[str, Any]:
    corpus = work / "corpus.txt"
    pattern = re.compile(cfg.words.pattern)
    with open(corpus, "w", encoding="utf-8") as out:
        for text in train_texts(clean_dir / CORPUS_FILE):
            out.write(" ".join(pattern.findall(text.lower())) + "\n")

    def timed(command: list[str], stdin: Path, stdout: Path) -> float:
        started = time.perf_counter()
        with open(stdin, "rb") as source, open(stdout, "wb") as sink:
            subprocess.run(command, stdin=source, stdout=sink, stderr=subprocess.DEVNULL, check=True)
        return time.perf_counter() - started

    build = binaries / "build"
    co, g = cfg.cooccur, cfg.glove
    vocab_seconds = timed([str(build / "vocab_count"), "-min-count", str(co.min_count), "-verbose", "0"],
                          corpus, work / "vocab.txt")
    cooccur_seconds = timed([str(build / "cooccur"), "-vocab-file", str(work / "vocab.txt"), "-verbose", "0",
                             "-window-size", str(co.window), "-memory", str(co.memory_mb / 1024)], corpus,
                            work / "cooccur.bin")
    timed([str(build / "shuffle"), "-verbose", "0", "-memory", "4", "-seed", str(seed)],
          work / "cooccur.bin", work / "shuffled.bin")
    started = time.perf_counter()
    subprocess.run([str(build / "glove"), "-input-file", str(work / "shuffled.bin"), "-vocab-file",
                    str(work / "vocab.txt"), "-save-file", str(work / "vectors"), "-verbose", "0",
                    "-vector-size", str(g.dim), "-iter", str(g.epochs), "-x-max", str(g.x_max),
                    "-eta", str(g.learning_rate), "-alpha", str(g.alpha), "-threads", str(os.cpu_count()),
                    "-binary", "0", "-seed", str(seed)], check=True, stderr=subprocess.DEVNULL)
    glove_seconds = time.perf_counter() - started
    words, rows = [], []
    for line in (work / "vectors.txt").read_text(encoding="utf-8").splitlines():
        word, *values = line.split(" ")
        if word != "<unk>":
            words.append(word)
            rows.append([float(v) for v in values])
    vectors = wordbench.WordVectors(words, np.array(rows))
    return {"cooccur_seconds": vocab_seconds + cooccur_seconds, "vocab_count_seconds": vocab_seconds,
            "epoch_seconds": glove_seconds / g.epochs, "quality": quality(vectors, cfg)}


def word2vec(cfg: Config, clean_dir: Path) -> dict[str, Any]:
    from gensim.models import Word2Vec

    pattern = re.compile(cfg.words.pattern)
    sentences = [pattern.findall(t.lower()) for t in train_texts(clean_dir / CORPUS_FILE)]
    started = time.perf_counter()
    model = Word2Vec(sentences, vector_size=cfg.glove.dim, window=cfg.cooccur.window, sg=1,
                     min_count=cfg.cooccur.min_count, workers=os.cpu_count(), epochs=cfg.glove.epochs, seed=1)
    seconds = time.perf_counter() - started
    vectors = wordbench.WordVectors(list(model.wv.index_to_key), model.wv.vectors)
    return {"epoch_seconds": seconds / cfg.glove.epochs, "quality": quality(vectors, cfg)}


def summary(result: dict[str, Any]) -> str:
    q = result["quality"]
    return (f"WS353 {q['wordsim353']['spearman']:.3f} ({q['wordsim353']['coverage']:.0%}), "
            f"SimLex {q['simlex999']['spearman']:.3f} ({q['simlex999']['coverage']:.0%}), "
            f"analogy {q['analogy']['accuracy']:.3f} ({q['analogy']['coverage']:.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--glove-c", type=Path, help="a Stanford GloVe checkout with `make` run in it")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per side (quality mean over seeds)")
    parser.add_argument("--text", choices=["clean", "gensim"], default="clean",
                        help="our cleaned pages, or gensim WikiCorpus's tokens of the same dump")
    parser.add_argument("--splits", choices=["train", "all"], default="train", help="pages counted")
    parser.add_argument("--no-labeled", action="store_true", help="leave out the labeled train texts")
    parser.add_argument("--memory-mb", type=float, help="counting memory of both sides (cooccur.memory_mb; "
                        "C's cooccur -memory in GB)")
    args = parser.parse_args()
    # the composed corpus.parquet holds every text counted, the labeled ones included
    overrides = {"tracking.enabled": False, "words.include_labeled_train": "inputs/none",
                 **({"cooccur.memory_mb": args.memory_mb} if args.memory_mb else {})}
    cfg = load_config(overrides=overrides)
    default = load_config()
    labeled = default.paths.given(default.words.include_labeled_train) and not args.no_labeled
    corpus_tmp = tempfile.TemporaryDirectory()
    clean_dir = corpus_dir(cfg, args.text, args.splits, labeled, Path(corpus_tmp.name))
    documents = cooccur.word_documents([clean_dir / CORPUS_FILE], cfg.words.pattern)
    words = sum(map(len, documents))
    torch.set_num_threads(os.cpu_count() or 1)
    rows: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}
    for seed in range(1, args.seeds + 1):
        seeded = load_config(overrides={**overrides, "glove.seed": seed})
        with tempfile.TemporaryDirectory() as tmp:
            rows["ours"].append(ours(seeded, clean_dir, Path(tmp)))
        with tempfile.TemporaryDirectory() as tmp:
            peer = glove_c(seeded, clean_dir, Path(tmp), args.glove_c, seed) if args.glove_c \
                else word2vec(seeded, clean_dir)
            rows["peer"].append(peer)
    corpus_tmp.cleanup()
    peer_name = "Stanford GloVe C" if args.glove_c else "gensim Word2Vec (skip-gram)"
    with_labeled = ", labeled train" if labeled else ""
    print(f"{args.text} text, {args.splits} split(s){with_labeled}: {words:,} words; {os.cpu_count()} cores; "
          f"{args.seeds} seed(s)")
    for name, runs in rows.items():
        label = "ours" if name == "ours" else peer_name
        epoch = statistics.median(r["epoch_seconds"] for r in runs)
        co = [r["cooccur_seconds"] for r in runs if "cooccur_seconds" in r]
        co_text = f"cooccur {statistics.median(co):.2f} s, " if co else ""
        print(f"{label:30s} {co_text}{epoch:.2f} s/epoch; " + " | ".join(summary(r) for r in runs))
    def ratio(key: str) -> float:
        ours_value, peer_value = (statistics.median(r[key] for r in rows[side]) for side in ("ours", "peer"))
        return ours_value / peer_value

    ratios = {"epoch_seconds_ours_over_peer": ratio("epoch_seconds")}
    if args.glove_c:
        ratios["cooccur_seconds_ours_over_peer"] = ratio("cooccur_seconds")
    print("ratios (goal <= 1.0 against C):", {k: round(v, 2) for k, v in ratios.items()})
    scores = (("wordsim353", "spearman"), ("simlex999", "spearman"), ("analogy", "accuracy"))
    means = {side: {k: round(statistics.mean(r["quality"][k][m] for r in runs), 3) for k, m in scores}
             for side, runs in rows.items()}
    print("quality, mean over seeds:", means)
    print(json.dumps({"peer": peer_name, "text": args.text, "splits": args.splits, "labeled": labeled,
                      "words": words, "runs": rows, "ratios": ratios, "quality_means": means}, default=float))


if __name__ == "__main__":
    main()
