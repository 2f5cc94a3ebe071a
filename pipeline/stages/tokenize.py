"""Tokenize stages: `tokenize` trains a byte-level BPE on the train split and encodes the corpus into
token shards; `tokenize_labeled` (`--part labeled`) encodes the labeled set for classification with
that tokenizer, so a change in the labeled set alone leaves the tokenizer, the shards and the
language model built from them untouched (unless `include_labeled_train` names the labeled set).

Outputs of `tokenize`:
- `paths.tokenizer/tokenizer.json`: loads with `tokenizers.Tokenizer.from_file` and with
  `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`, giving the same ids;
- `paths.tokens/<split>/<split>-NNNNN.arrow`: fixed-size shards (see `pipeline/shards.py`);
- `paths.tokens/manifest.json` (every shard's sha256, tokens, documents, dtype; totals; the
  special ids) and `metrics/tokenize.json` (tokens per split, bytes per token, vocabulary size).
Outputs of `tokenize_labeled`:
- `paths.tokens/labeled/<split>.arrow`: `ids` (list of ids, truncated), `label` (int) and `text` (the
  clean text, for a fine-tune on a transformers model with its own tokenizer) per example,
  with `labels.json` mapping label names to ints (from the train split, sorted) and `summary.json`
  (the mapping, the pad id, examples and truncated examples per split), and
  `metrics/tokenize_labeled.json`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.config import Config, Tokenize, project_root
from pipeline.executors import OrderedMap, in_process_map, ordered_map, prepare_stage_process
from pipeline.files import (
    TEXT_ROWS_PER_READ,
    InputError,
    atomic_children,
    atomic_dir,
    file_digest,
    streamed_parquet,
    write_json,
)
from pipeline.progress import Progress
from pipeline.shards import MANIFEST, write_shard
from pipeline.stagecli import stage_main

SPLITS = ("train", "val", "test")
BYTE_ALPHABET = 256
CORPUS_FILE = "corpus.parquet"
LABELED_FILE = "labeled.parquet"


def read_texts(path: Path, split: str, batch: int = TEXT_ROWS_PER_READ) -> Iterator[list[str]]:
    """The texts of one split, streamed in file order, a batch at a time."""
    for texts, splits in text_batches(path, batch):
        chosen = [t for t, s in zip(texts, splits, strict=True) if s == split]
        if chosen:
            yield chosen


def pretraining_texts(corpus: Path, labeled: Path | None, split: str,
                      batch: int = TEXT_ROWS_PER_READ) -> Iterator[list[str]]:
    """The corpus texts of a split, then (train only, when `labeled` is given) the labeled texts."""
    yield from read_texts(corpus, split, batch)
    if split == "train" and labeled is not None:
        yield from read_texts(labeled, split, batch)


def train_tokenizer(corpus: Path, labeled: Path | None, cfg: Tokenize) -> Tokenizer:
    """Byte-level BPE on the train split only; no normaliser, so decoding gives the text back exactly."""
    specials = [cfg.eot_token, cfg.pad_token, cfg.mask_token]
    if cfg.vocab_size < BYTE_ALPHABET + len(specials):
        raise InputError(
            f"tokenize.vocab_size {cfg.vocab_size} is too small: the byte alphabet ({BYTE_ALPHABET}) "
            f"plus {len(specials)} special tokens need at least {BYTE_ALPHABET + len(specials)}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = (t for batch in pretraining_texts(corpus, labeled, "train") for t in batch)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: Path, cfg: Tokenize) -> Tokenizer:
    if not path.exists():
        raise InputError(f"{path}: tokenizer file not found (tokenize.tokenizer_file)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unparsable files
        raise InputError(f"{path}: not a tokenizer.json that tokenizers can load: {exc}") from None
    for token in (cfg.eot_token, cfg.pad_token):
        if tokenizer.token_to_id(token) is None:
            raise InputError(f"{path}: the tokenizer has no '{token}' token")
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents of one split and writes a shard every `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, eot: int, cfg: Tokenize, dtype: np.dtype) -> None:
        self.out_dir, self.split, self.eot, self.cfg, self.dtype = out_dir, split, eot, cfg, dtype
        (out_dir / split).mkdir(parents=True)
        self.shards: list[dict[str, Any]] = []
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.text_bytes = 0
        self.corpus_tokens: int | None = None  # where the corpus ends, when labeled texts follow

    def written(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.pending_tokens

    def add(self, documents: list[np.ndarray], text_bytes: int) -> None:
        self.text_bytes += text_bytes
        end = np.asarray([self.eot], dtype=self.dtype)
        for ids in documents:
            self.pending += [ids, end]
            self.pending_tokens += len(ids) + 1
        while self.pending_tokens >= self.cfg.shard_tokens:
            joined = np.concatenate(self.pending)
            self.flush(joined[: self.cfg.shard_tokens])
            self.pending = [joined[self.cfg.shard_tokens :]]
            self.pending_tokens = len(joined) - self.cfg.shard_tokens

    def flush(self, tokens: np.ndarray) -> None:
        name = f"{self.split}/{self.split}-{len(self.shards):05d}.arrow"
        write_shard(self.out_dir / name, tokens)
        self.shards.append({
            "split": self.split, "file": name, "sha256": file_digest(self.out_dir / name),
            "tokens": len(tokens), "documents": int(np.count_nonzero(tokens == self.eot)),
            "dtype": self.dtype.name,
        })

    def close(self, corpus: Path) -> list[dict[str, Any]]:
        if self.pending_tokens:
            self.flush(np.concatenate(self.pending))
            self.pending, self.pending_tokens = [], 0
        if not self.shards:
            raise InputError(f"{corpus}: split '{self.split}' holds no documents")
        return self.shards


class Encoded(NamedTuple):
    """A batch of texts encoded: every text's ids end to end, each text's token count and UTF-8 size."""

    ids: np.ndarray
    lengths: np.ndarray
    text_bytes: np.ndarray

    def documents(self) -> list[np.ndarray]:
        return np.split(self.ids, np.cumsum(self.lengths)[:-1])


@functools.lru_cache(maxsize=1)
def tokenizer_from_json(tokenizer_json: str) -> Tokenizer:
    """Parsed once per process (a Dask worker is handed the same string for every task)."""
    return Tokenizer.from_str(tokenizer_json)


def encode_texts(texts: list[str], tokenizer_json: str, dtype: str) -> Encoded:
    """The work of one piece of the encoding (in this process or on a Dask worker)."""
    # encode_batch_fast: the same ids, without the character offsets nothing here uses
    encodings = tokenizer_from_json(tokenizer_json).encode_batch_fast(texts, add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=dtype) for e in encodings]
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    text_bytes = np.array([len(t.encode()) for t in texts], dtype=np.int64)
    return Encoded(np.concatenate(ids) if ids else np.empty(0, dtype), lengths, text_bytes)


@contextlib.contextmanager
def encoding_map(cfg: Tokenize) -> Iterator[OrderedMap]:
    """Where the encoding runs: in this process (the tokenizer's threads use every core), or on Dask."""
    if cfg.executor == "local":
        yield in_process_map
        return
    with ordered_map("dask", cfg.workers or os.cpu_count() or 1, cfg.scheduler) as in_order:
        yield in_order


def text_batches(path: Path, size: int) -> Iterator[tuple[list[str], list[str]]]:
    """(texts, their splits), `size` documents at a time, in file order."""
    for batch in streamed_parquet(path).iter_batches(columns=["text", "split"], batch_size=size):
        yield batch.column(0).to_pylist(), batch.column(1).to_pylist()


def encode_corpus(
    tokenizer: Tokenizer, corpus: Path, labeled: Path | None, out_dir: Path, cfg: Tokenize, dtype: np.dtype,
    in_order: OrderedMap = in_process_map,
) -> dict[str, ShardWriter]:
    """One streaming pass over the corpus, every split into its own fixed-size shards (then, when
    `labeled` is given, its train texts appended to the train shards); `in_order` runs the encoding
    (on a Dask cluster, or in this process, where the tokenizer uses every core)."""
    eot = tokenizer.token_to_id(cfg.eot_token)
    writers = {split: ShardWriter(out_dir, split, eot, cfg, dtype) for split in SPLITS}
    progress = Progress("tokenize", None, "doc")
    tokenizer_json = tokenizer.to_str()
    splits_on_their_way: deque[list[str]] = deque()  # of the batches handed out and not yet back

    def corpus_texts() -> Iterator[list[str]]:
        for texts, splits in text_batches(corpus, cfg.batch_documents):
            splits_on_their_way.append(splits)
            yield texts

    for encoded in in_order(encode_texts, corpus_texts(), tokenizer_json, dtype.name):
        splits, documents = splits_on_their_way.popleft(), encoded.documents()
        for split, writer in writers.items():
            chosen = [i for i, s in enumerate(splits) if s == split]
            if chosen:
                writer.add([documents[i] for i in chosen], int(encoded.text_bytes[chosen].sum()))
        progress.update(len(splits))
    if labeled is not None:
        writers["train"].corpus_tokens = writers["train"].written()
        labeled_texts = read_texts(labeled, "train", cfg.batch_documents)
        for encoded in in_order(encode_texts, labeled_texts, tokenizer_json, dtype.name):
            writers["train"].add(encoded.documents(), int(encoded.text_bytes.sum()))
            progress.update(len(encoded.lengths))
    progress.close()
    for writer in writers.values():
        writer.close(corpus)
    return writers


def encode_labeled(tokenizer: Tokenizer, labeled: Path, out_dir: Path, cfg: Tokenize) -> dict[str, Any]:
    """Ids per example (truncated at max_length) and integer labels, one Arrow file per split, into
    `out_dir/labeled/`."""
    table = pq.read_table(labeled, columns=["text", "split", "label"]).to_pydict()
    train_labels = {lab for lab, s in zip(table["label"], table["split"], strict=True) if s == "train"}
    if not train_labels:
        raise InputError(f"{labeled}: the labeled set has no train examples")
    mapping = {name: i for i, name in enumerate(sorted(train_labels))}
    (out_dir / "labeled").mkdir()
    write_json(out_dir / "labeled" / "labels.json", mapping)
    pad_id = tokenizer.token_to_id(cfg.pad_token)
    summary: dict[str, Any] = {"labels": mapping, "pad_id": pad_id, "splits": {}}
    for split in SPLITS:
        rows = [i for i, s in enumerate(table["split"]) if s == split]
        unseen = sorted({table["label"][i] for i in rows} - train_labels)
        if unseen:
            raise InputError(f"{labeled}: labels {unseen} appear in {split} but never in train")
        encodings = tokenizer.encode_batch_fast([table["text"][i] for i in rows], add_special_tokens=False)
        ids = [e.ids[: cfg.max_length] for e in encodings]
        labels = [mapping[table["label"][i]] for i in rows]
        dtype = pa.uint16() if tokenizer.get_vocab_size() <= 2**16 else pa.uint32()
        texts = [table["text"][i] for i in rows]
        batch = pa.record_batch([pa.array(ids, type=pa.list_(dtype)), pa.array(labels, type=pa.int32()),
                                 pa.array(texts, type=pa.string())], names=["ids", "label", "text"])
        with pa.OSFile(str(out_dir / "labeled" / f"{split}.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        summary["splits"][split] = {
            "examples": len(rows), "truncated": sum(len(e.ids) > cfg.max_length for e in encodings),
        }
    return summary


def run(
    cfg: Config, clean_dir: Path, tokenizer_dir: Path, tokens_dir: Path, metrics_path: Path
) -> dict[str, Any]:
    """Train (or load) the tokenizer and encode every split of the corpus (stage `tokenize`); returns
    the metrics written. The labeled set is read only when `include_labeled_train` names it."""
    tok_cfg = cfg.tokenize
    started = time.perf_counter()
    corpus = clean_dir / CORPUS_FILE
    labeled = clean_dir / LABELED_FILE if cfg.paths.given(tok_cfg.include_labeled_train) else None
    for path in (corpus, labeled):
        if path is not None and not path.exists():
            raise InputError(f"{path}: clean output not found (run the clean stages)")
    if tok_cfg.tokenizer_file:
        tokenizer = load_tokenizer(project_root() / tok_cfg.tokenizer_file, tok_cfg)
    else:
        tokenizer = train_tokenizer(corpus, labeled, tok_cfg)
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    with encoding_map(tok_cfg) as in_order, atomic_dir(tokenizer_dir) as tok_tmp, \
            atomic_children(tokens_dir) as tmp:
        tokenizer.save(str(tok_tmp / "tokenizer.json"))
        writers = encode_corpus(tokenizer, corpus, labeled, tmp, tok_cfg, dtype, in_order)
        shards = [shard for split in SPLITS for shard in writers[split].shards]
        text_bytes = {split: writers[split].text_bytes for split in SPLITS}
        totals = {
            split: {"tokens": sum(s["tokens"] for s in shards if s["split"] == split),
                    "documents": sum(s["documents"] for s in shards if s["split"] == split),
                    "shards": sum(s["split"] == split for s in shards),
                    "text_bytes": text_bytes[split],
                    # the first tokens of the split that are corpus text (the rest: labeled train texts)
                    "corpus_tokens": writers[split].corpus_tokens or writers[split].written()}
            for split in SPLITS
        }
        manifest = {
            "tokenizer_sha256": file_digest(tok_tmp / "tokenizer.json"),
            "vocab_size": vocab_size, "dtype": dtype.name, "shard_tokens": tok_cfg.shard_tokens,
            "eot_id": tokenizer.token_to_id(tok_cfg.eot_token),
            "pad_id": tokenizer.token_to_id(tok_cfg.pad_token),
            "mask_id": tokenizer.token_to_id(tok_cfg.mask_token),  # None in a reused tokenizer without it
            "shards": shards, "totals": totals,
        }
        write_json(tmp / MANIFEST, manifest)
    text_tokens = {s: totals[s]["tokens"] - totals[s]["documents"] for s in SPLITS}  # without EOT
    metrics = {
        "vocab_size": vocab_size,
        "tokens": {split: totals[split]["tokens"] for split in SPLITS},
        "documents": {split: totals[split]["documents"] for split in SPLITS},
        "bytes_per_token": {s: round(text_bytes[s] / max(text_tokens[s], 1), 4) for s in SPLITS},
    }
    write_json(metrics_path, metrics)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def run_labeled(
    cfg: Config, clean_dir: Path, tokenizer_dir: Path, tokens_dir: Path, metrics_path: Path
) -> dict[str, Any]:
    """Encode the labeled set with the trained tokenizer (stage `tokenize_labeled`); returns the
    metrics written."""
    started = time.perf_counter()
    labeled, tokenizer_file = clean_dir / LABELED_FILE, tokenizer_dir / "tokenizer.json"
    if not labeled.exists():
        raise InputError(f"{labeled}: clean output not found (run the clean_labeled stage)")
    if not tokenizer_file.exists():
        raise InputError(f"{tokenizer_file}: tokenizer not found (run the tokenize stage)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    with atomic_children(tokens_dir) as tmp:
        summary = encode_labeled(tokenizer, labeled, tmp, cfg.tokenize)
        write_json(tmp / "labeled" / "summary.json", summary)
    metrics = {
        "examples": {s: v["examples"] for s, v in summary["splits"].items()},
        "truncated": {s: v["truncated"] for s, v in summary["splits"].items()},
    }
    write_json(metrics_path, metrics)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def execute(cfg: Config, part: str) -> str:
    """The stage as DVC runs it: paths from params, one MLflow run, a summary line."""
    from pipeline import tracking

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    prepare_stage_process(cfg.tokenize.executor)
    root = project_root()
    clean_dir, tokens_dir = root / cfg.paths.clean, root / cfg.paths.tokens
    tokenizer_dir = root / cfg.paths.tokenizer
    if part == "labeled":
        metrics_path = root / cfg.paths.metrics / "tokenize_labeled.json"
        inputs = {"labeled": clean_dir / LABELED_FILE, "tokenizer": tokenizer_dir}
        with tracking.stage_run("tokenize_labeled", cfg.tracking, cfg.tokenize.model_dump(), inputs,
                                {"labeled": tokens_dir / "labeled"}) as run_log:
            metrics = run_labeled(cfg, clean_dir, tokenizer_dir, tokens_dir, metrics_path)
            run_log.log_metrics(tracking.numeric_leaves(metrics))
        return (f"tokenize_labeled: examples {metrics['examples']}, truncated {metrics['truncated']}, "
                f"{metrics['seconds']} s -> {tokens_dir / 'labeled'}")
    metrics_path = root / cfg.paths.metrics / "tokenize.json"
    inputs = {"corpus": clean_dir / CORPUS_FILE}
    if cfg.paths.given(cfg.tokenize.include_labeled_train):
        inputs["labeled"] = clean_dir / LABELED_FILE
    outputs = {"tokenizer": tokenizer_dir, **{split: tokens_dir / split for split in SPLITS},
               "manifest": tokens_dir / MANIFEST}
    with tracking.stage_run("tokenize", cfg.tracking, cfg.tokenize.model_dump(), inputs, outputs) as run_log:
        metrics = run(cfg, clean_dir, tokenizer_dir, tokens_dir, metrics_path)
        run_log.log_metrics(tracking.numeric_leaves(metrics))
        run_log.log_artifact(tokenizer_dir / "tokenizer.json", "tokenizer")
        run_log.log_artifact(tokens_dir / MANIFEST, "tokens")
    return (f"tokenize: vocab {metrics['vocab_size']}, tokens {metrics['tokens']}, "
            f"{metrics['seconds']} s -> {tokens_dir}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("tokenize", __doc__, execute, argv, choices={"part": ("corpus", "labeled")})


if __name__ == "__main__":
    sys.exit(main())
