"""The word2vec stage's training against gensim's Word2Vec alone, on the same words, in one run.

- ours: `pipeline.stages.word2vec.train`, the stage's path: the train words streamed from the clean
  Parquet (regex on lowercased text) on every pass, gensim doing the training.
- gensim: the same words already split into lists in memory (no data path at all), the same
  `Word2Vec` settings (params.yaml `word2vec`, `--method`), `workers` as the stage uses them.
Both are timed around `train()` alone (the vocabulary pass excluded) and run alternately, `--repeats`
times each; the ratio is of median words per second. Goal: ours >= 0.9x gensim's (the data path is
not the bottleneck).

    python benchmarks/word2vec.py [--method skipgram|cbow] [--repeats 2] [--epochs N] [--workers N]
    # after the clean stage (`make run` or `.venv/bin/pipeline run clean`)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.stages import word2vec  # noqa: E402
from pipeline.vectors import word_tables  # noqa: E402


def ours(cfg: Config, sentences: word2vec.TrainSentences, method: word2vec.Method) -> float:
    _, timing = word2vec.train(sentences, cfg, method)
    return timing["words_per_second"]


def gensim_alone(cfg: Config, sentences: list[list[str]], method: word2vec.Method) -> float:
    model = word2vec.new_model(cfg, method)  # the stage's settings, without the stage's reader
    model.build_vocab(sentences)
    started = time.perf_counter()
    _, raw_words = model.train(sentences, total_examples=model.corpus_count, epochs=cfg.word2vec.epochs)
    return raw_words / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=word2vec.METHODS, default="skipgram")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="override word2vec.epochs")
    parser.add_argument("--workers", type=int, help="override word2vec.workers (0: all cores)")
    args = parser.parse_args()
    overrides = {"tracking.enabled": False, **({"word2vec.epochs": args.epochs} if args.epochs else {}),
                 **({"word2vec.workers": args.workers} if args.workers is not None else {})}
    cfg = load_config(overrides=overrides)
    tables = word_tables(ROOT / cfg.paths.clean, cfg.paths.given(cfg.words.include_labeled_train))
    streamed = word2vec.TrainSentences(tables, cfg.words.pattern)
    in_memory = list(streamed)
    rates: dict[str, list[float]] = {"ours": [], "gensim": []}
    for repeat in range(args.repeats):
        order = ("ours", "gensim") if repeat % 2 == 0 else ("gensim", "ours")
        for side in order:
            if side == "ours":
                rate = ours(cfg, streamed, args.method)
            else:
                rate = gensim_alone(cfg, in_memory, args.method)
            rates[side].append(rate)
            print(f"{side:7s} {rate:,.0f} words/s", flush=True)
    medians = {side: statistics.median(values) for side, values in rates.items()}
    ratio = medians["ours"] / medians["gensim"]
    words = sum(map(len, in_memory))
    print(f"{args.method}: {words:,} words x {cfg.word2vec.epochs} epochs, {os.cpu_count()} cores; "
          f"ours {medians['ours']:,.0f} words/s, gensim alone {medians['gensim']:,.0f}: "
          f"{ratio:.3f}x (goal >= 0.9)")
    print(json.dumps({"method": args.method, "words": words, "epochs": cfg.word2vec.epochs, "rates": rates,
                      "ratio_ours_over_gensim": round(ratio, 3)}))


if __name__ == "__main__":
    main()
