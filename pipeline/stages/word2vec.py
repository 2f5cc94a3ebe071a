"""Word2Vec stage: skip-gram or CBOW word vectors, trained by gensim on the same train words as GloVe.

Negative sampling (`word2vec.negative` noise words per pair) and frequent-word subsampling
(`word2vec.sample`), a linearly decaying learning rate, words seen fewer than `min_count` times
dropped. The words are those of the `cooccur` stage (`words`): lowercased `words.pattern` matches of
the corpus's train texts, then with `words.include_labeled_train` the labeled set's train texts, each
text a sentence (cut into gensim's 10,000-word pieces). They stream once from the clean Parquet into
a temporary file of one sentence per line, which gensim's `LineSentence` reads on every pass (0.07 s a
pass against 0.4 s for Parquet and the regex again; nothing holds the corpus in memory). Val and
test texts are never read.

Two stages: `skipgram` (`--method skipgram`) and `cbow` (`--method cbow`). Outputs in
`paths.skipgram/` (`paths.cbow/`): `vectors.safetensors` (`vectors` float32, row i = the i-th most
frequent word), `vectors.txt` (GloVe's text format), and `metrics/<stage>.json`: training seconds and
words per second, the word benchmarks with coverage and the probe words' nearest neighbours, as for
GloVe. Bit-exact reruns need `workers: 1` (gensim's threads race, as GloVe C's do).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from gensim.models import Word2Vec
from gensim.models.callbacks import CallbackAny2Vec
from gensim.models.word2vec import MAX_WORDS_IN_BATCH, LineSentence
from safetensors.torch import save_file

from pipeline import wordbench
from pipeline.config import Config, project_root
from pipeline.files import InputError, atomic_dir, write_json
from pipeline.progress import Progress
from pipeline.stagecli import stage_main
from pipeline.vectors import TEXT_FILE, VECTORS_FILE, word_documents, word_tables, write_text_vectors

Method = Literal["skipgram", "cbow"]
METHODS: tuple[Method, ...] = ("skipgram", "cbow")


class TrainSentences:
    """The train words as a restartable stream: gensim reads it once for the vocabulary and once per epoch."""

    def __init__(self, tables: list[Path], pattern: str) -> None:
        self.tables, self.pattern = tables, pattern

    def __iter__(self) -> Iterator[list[str]]:
        for words in word_documents(self.tables, self.pattern):
            for start in range(0, len(words), MAX_WORDS_IN_BATCH):
                yield words[start : start + MAX_WORDS_IN_BATCH]


class EpochProgress(CallbackAny2Vec):
    """A progress bar over epochs (one line per update when not on a terminal); keeps epoch seconds."""

    def __init__(self, stage: str, epochs: int) -> None:
        self.bar = Progress(stage, epochs, "epoch")
        self.seconds: list[float] = []
        self.started = 0.0

    def on_epoch_begin(self, model: Word2Vec) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, model: Word2Vec) -> None:
        self.seconds.append(time.perf_counter() - self.started)
        self.bar.update(1)

    def on_train_end(self, model: Word2Vec) -> None:
        self.bar.close()


def write_sentences(sentences: TrainSentences, path: Path) -> None:
    """One sentence per line, words separated by spaces (gensim's LineSentence format)."""
    with open(path, "w", encoding="utf-8") as out:
        for words in sentences:
            if words:
                out.write(" ".join(words) + "\n")


def stable_hash(text: str) -> int:
    """gensim seeds each word's initial vector from a hash of the word; Python's `hash` of a str
    changes from process to process, crc32 does not."""
    return zlib.crc32(text.encode("utf-8"))


def new_model(cfg: Config, method: Method) -> Word2Vec:
    """An untrained gensim Word2Vec with the `word2vec` params (negative sampling, no softmax tree)."""
    w = cfg.word2vec
    return Word2Vec(vector_size=w.dim, window=w.window, min_count=w.min_count, sg=int(method == "skipgram"),
                    negative=w.negative, hs=0, sample=w.sample, alpha=w.learning_rate,
                    min_alpha=w.min_learning_rate, workers=w.workers or os.cpu_count() or 1, seed=w.seed,
                    hashfxn=stable_hash)


def train(sentences: TrainSentences, cfg: Config, method: Method) -> tuple[Word2Vec, dict[str, Any]]:
    """Train on the sentences; the seconds and words per second count writing them out too."""
    w = cfg.word2vec
    model = new_model(cfg, method)
    progress = EpochProgress(method, w.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = Path(tmp) / "sentences.txt"
        write_sentences(sentences, path)
        lines = LineSentence(str(path))
        model.build_vocab(lines)
        if not model.wv.index_to_key:
            raise InputError(f"word2vec: no word occurs {w.min_count} times in the train text")
        _, raw_words = model.train(lines, total_examples=model.corpus_count, epochs=w.epochs,
                                   callbacks=[progress])
        seconds = time.perf_counter() - started
    return model, {"train_seconds": round(seconds, 2),
                   "seconds_per_epoch": round(float(np.median(progress.seconds)), 3),
                   "words_per_second": round(raw_words / seconds), "train_words": model.corpus_total_words}


def run(cfg: Config, clean_dir: Path, out_dir: Path, metrics_dir: Path, method: Method = "skipgram"
        ) -> dict[str, Any]:
    """Train, save and evaluate one method's vectors; returns the metrics written to
    `metrics/<method>.json`."""
    files = wordbench.benchmark_files(cfg.word_eval.benchmarks.model_dump(), project_root())
    tables = word_tables(clean_dir, cfg.paths.given(cfg.words.include_labeled_train))
    sentences = TrainSentences(tables, cfg.words.pattern)
    model, timing = train(sentences, cfg, method)
    words, vectors = list(model.wv.index_to_key), np.ascontiguousarray(model.wv.vectors, dtype=np.float32)
    with atomic_dir(out_dir) as tmp:
        save_file({"vectors": torch.from_numpy(vectors)}, str(tmp / VECTORS_FILE), metadata={"unit": "word"})
        write_text_vectors(tmp / TEXT_FILE, words, vectors)
    word_vectors = wordbench.WordVectors(words, vectors)
    w = cfg.word2vec
    metrics: dict[str, Any] = {
        "method": method, "unit": "word", "vocab_size": len(words), "dim": w.dim, "window": w.window,
        "negative": w.negative, "epochs": w.epochs, **timing,
        **wordbench.evaluate(word_vectors, *files),
        "neighbours": wordbench.nearest_neighbours(word_vectors, cfg.word_eval.probe_words,
                                                   cfg.word_eval.neighbours),
    }
    write_json(metrics_dir / f"{method}.json", metrics)
    return metrics


def execute(cfg: Config, method: Method = "skipgram") -> str:
    """The stage as DVC runs it: `skipgram` or `cbow` (`--method`)."""
    from pipeline import tracking

    root = project_root()
    clean_dir, out_dir = root / cfg.paths.clean, root / getattr(cfg.paths, method)
    params = {**cfg.word2vec.model_dump(), **cfg.words.model_dump(), "method": method}
    with tracking.stage_run(method, cfg.tracking, params, {"clean": clean_dir}, {method: out_dir}) as run_log:
        metrics = run(cfg, clean_dir, out_dir, root / cfg.paths.metrics, method)
        run_log.log_metrics(tracking.numeric_leaves({k: v for k, v in metrics.items() if k != "neighbours"}))
        run_log.log_artifact(out_dir / VECTORS_FILE, "embeddings")
    scores = ", ".join(f"{k} {metrics[k].get('spearman', metrics[k].get('accuracy'))}"
                       for k in ("wordsim353", "simlex999", "analogy"))
    return (f"{method}: {metrics['vocab_size']} words, {metrics['words_per_second']} words/s, "
            f"{scores} -> {out_dir}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("word2vec", __doc__, execute, argv, choices={"method": METHODS})


if __name__ == "__main__":
    sys.exit(main())
