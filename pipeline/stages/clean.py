"""Clean stages: raw sources -> deduplicated, filtered, split Parquet tables and a report, one stage
per kind of source (`--kind corpus`: stage `clean`; `--kind labeled`: stage `clean_labeled`), each
reading only `paths.raw/<kind>/`.

Outputs (schemas in DESIGN.md), each written atomically into `paths.clean`:
- `corpus.parquet`: id, source, text, split — the pretraining corpus (sources without labels);
- `labeled.parquet`: id, source, text, split, label — the labeled set;
`paths.splits/<kind>.parquet` (source, key, split): the split of every document ever seen, which
the next run reads so that no document changes split as its source grows (DVC keeps it: `persist`);
and `metrics/clean.json` (`clean_labeled.json`): documents in and out per source and per filter,
repairs, characters, split sizes and the label distribution per split.

The split: a document seen before keeps its split. New documents, taken in the order of a salted
hash of their key (a page title, else the content id), each go to the split furthest below its
ratio, so every source's split sizes stay within one document of the ratios however small it is.
A fixed hash threshold alone cannot promise that: 106 articles drew 78.3 / 8.5 / 13.2.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import MinHash, MinHashLSH

from pipeline.config import Config, Dedup, Filters, Source, project_root
from pipeline.executors import batched, ordered_map, prepare_stage_process
from pipeline.files import (
    TEXT_ROWS_PER_READ,
    InputError,
    atomic_path,
    resolve_paths,
    streamed_parquet,
    write_json,
)
from pipeline.progress import Progress
from pipeline.sources import RawDoc, read_source
from pipeline.splits import SPLITS, read_split_manifest, split_rows, write_split_manifest
from pipeline.stagecli import stage_main
from pipeline.textfix import PROSE_PUNCTUATION, has_mojibake, repair, wikitext_to_text

WORD = re.compile(r"\w+")
CORPUS_FILE = "corpus.parquet"
LABELED_FILE = "labeled.parquet"
KIND_FILES = {"corpus": CORPUS_FILE, "labeled": LABELED_FILE}
# batches of `batch_pages` pages on their way per worker: at 4, a Dask run held 430 MiB at 100x
# (each batch sits in this process as pages, task and scheduler message), 1.49x its 1x peak
BATCHES_AHEAD_PER_WORKER = 2


@dataclass(frozen=True, slots=True)
class CleanDoc:
    text: str
    label: str | None
    where: str
    repairs: tuple[str, ...]
    split_key: str | None
    key: str  # the normalised text dedup compares
    id: str  # a hash of the key
    signature: np.ndarray | None  # its MinHash, when near-dedup is on
    failed: str | None  # the first quality filter it fails


@dataclass
class SourceReport:
    files: int = 0
    documents_in: int = 0
    documents_out: int = 0
    characters_out: int = 0
    removed: Counter[str] = field(default_factory=Counter)
    repairs: Counter[str] = field(default_factory=Counter)


@dataclass
class OutputSet:
    """Documents kept for one output file, with the dedup indexes that guard it. Rows stream to an
    unsplit Parquet file a row group at a time; only their (source, split key) stay in memory until
    the splits are drawn, so memory does not grow with the text."""

    dedup: Dedup
    path: Path
    labeled: bool
    row_group_rows: int
    row_group_bytes: int
    keys: list[tuple[str, str]] = field(default_factory=list)  # (source, split key) per row, in order
    buffer: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    writer: pq.ParquetWriter | None = None
    seen_ids: set[str] = field(default_factory=set)  # ids hash the dedup key: 8 bytes, not the text
    lsh: MinHashLSH | None = None  # built on first use: choosing its bands takes a moment
    buffered_bytes: int = 0  # UTF-8 bytes of the buffered texts

    @property
    def columns(self) -> list[str]:
        return ["id", "source", "text"] + (["label"] if self.labeled else [])

    def duplicate_of_earlier(self, doc: CleanDoc) -> str | None:
        """'exact_duplicate', 'near_duplicate' or None (and remember the document when new)."""
        if self.dedup.exact and doc.id in self.seen_ids:
            return "exact_duplicate"
        if self.dedup.exact:
            self.seen_ids.add(doc.id)
        if not self.dedup.near or doc.signature is None:
            return None
        if self.lsh is None:
            self.lsh = MinHashLSH(threshold=self.dedup.threshold, num_perm=self.dedup.num_perm)
        _, scheme = minhash_template(self.dedup.num_perm, self.dedup.seed)
        minhash = MinHash(num_perm=self.dedup.num_perm, hashvalues=doc.signature, scheme=scheme)
        if self.lsh.query(minhash):
            return "near_duplicate"
        self.lsh.insert(doc.id, minhash, check_duplication=False)
        return None

    def add(self, row: dict[str, Any]) -> None:
        self.keys.append((row["source"], row["split_key"]))
        for column in self.columns:
            self.buffer[column].append(row[column])
        self.buffered_bytes += len(row["text"].encode())
        if len(self.buffer["id"]) >= self.row_group_rows or self.buffered_bytes >= self.row_group_bytes:
            self.flush()

    def flush(self) -> None:
        schema = pa.schema([(c, pa.string()) for c in self.columns])
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, schema)
        if self.buffer:
            columns = {c: pa.array(self.buffer[c], type=pa.string()) for c in self.columns}
            self.writer.write_table(pa.table(columns, schema=schema))
        self.buffer.clear()
        self.buffered_bytes = 0

    def row_groups(self) -> Iterator[pa.Table]:
        """The unsplit file's row groups (`row_group_rows` rows or `row_group_bytes` of text), each read
        in small batches: Arrow's read buffers grow with the batch (long articles cost several times
        their text)."""
        unsplit = streamed_parquet(self.path)
        for group in range(unsplit.num_row_groups):
            batches = unsplit.iter_batches(TEXT_ROWS_PER_READ, row_groups=[group])
            yield pa.Table.from_batches(list(batches), schema=unsplit.schema_arrow)

    def write_split(self, splits: list[str], out_path: Path) -> dict[str, Any]:
        """The rows with their `split` column to `out_path` (the unsplit file's row groups); returns
        the split summary (and, for the labeled set, the quality counts)."""
        self.flush()
        assert self.writer is not None
        self.writer.close()
        columns = ["id", "source", "text", "split"] + (["label"] if self.labeled else [])
        schema = pa.schema([(c, pa.string()) for c in columns])
        tally = SplitTally(self.labeled)
        with pq.ParquetWriter(out_path, schema, compression="zstd") as writer:
            start = 0
            for group in self.row_groups():
                chunk = splits[start : start + group.num_rows]
                start += group.num_rows
                table = group.append_column("split", pa.array(chunk, type=pa.string())).select(columns)
                writer.write_table(table, row_group_size=self.row_group_rows)
                tally.add(table)
        return {**tally.summary(), **({"quality": tally.quality_counts()} if self.labeled else {})}


@dataclass
class SplitTally:
    """Documents, characters (and labels) per split, and the labeled texts' quality counts."""

    labeled: bool
    documents: Counter[str] = field(default_factory=Counter)
    characters: Counter[str] = field(default_factory=Counter)
    labels: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    quality: Counter[str] = field(default_factory=Counter)

    def add(self, table: pa.Table) -> None:
        texts, splits = table.column("text").to_pylist(), table.column("split").to_pylist()
        labels = table.column("label").to_pylist() if self.labeled else [None] * len(texts)
        for text, split, label in zip(texts, splits, labels, strict=True):
            self.documents[split] += 1
            self.characters[split] += len(text)
            if self.labeled:
                self.labels[split][label] += 1
                self.quality["labeled_with_mojibake"] += has_mojibake(text)
                self.quality["labeled_with_other_non_ascii"] += any(
                    not c.isascii() and c not in PROSE_PUNCTUATION for c in text)

    def quality_counts(self) -> dict[str, int]:
        return {k: self.quality[k] for k in ("labeled_with_mojibake", "labeled_with_other_non_ascii")}

    def summary(self) -> dict[str, Any]:
        total = sum(self.documents.values())
        summary: dict[str, Any] = {"documents": total, "characters": sum(self.characters.values()),
                                   "splits": {}}
        for split in SPLITS:
            entry: dict[str, Any] = {
                "documents": self.documents[split],
                "share": round(self.documents[split] / total, 4) if total else 0.0,
                "characters": self.characters[split],
            }
            if self.labeled:
                entry["labels"] = dict(sorted(self.labels[split].items()))
            summary["splits"][split] = entry
        return summary


# ---------------------------------------------------------------- pure per-document functions


def normalized_key(text: str) -> str:
    """The text as dedup compares it: case-folded words, punctuation and spacing ignored."""
    return " ".join(WORD.findall(text.casefold()))


def shingles(key: str, size: int) -> set[str]:
    words = key.split()
    if len(words) <= size:
        return {key}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def crc32_hash(data: bytes) -> int:
    return zlib.crc32(data)  # deterministic across processes, and far cheaper than sha1


@functools.cache
def minhash_template(num_perm: int, seed: int) -> tuple[Any, str]:
    """The permutations (and their scheme) every MinHash of one dedup config shares."""
    template = MinHash(num_perm=num_perm, seed=seed)
    return template.permutations, template.scheme


def minhash_signature(key: str, dedup: Dedup) -> np.ndarray:
    permutations, scheme = minhash_template(dedup.num_perm, dedup.seed)
    minhash = MinHash(num_perm=dedup.num_perm, permutations=permutations, scheme=scheme, hashfunc=crc32_hash)
    minhash.update_batch([s.encode() for s in shingles(key, dedup.shingle_words)])
    return minhash.hashvalues


def document_id(key: str) -> str:
    """A stable content hash: the same normalised text always gets the same id."""
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def effective_filters(source: Source, filters: Filters) -> Filters:
    overrides = source.filters.model_dump(exclude_none=True)
    return filters.model_copy(update=overrides)


def failed_filter(text: str, f: Filters) -> str | None:
    """The name of the first quality filter the text fails, or None."""
    if not text:
        return "empty"
    if len(text) < f.min_chars:
        return "min_chars"
    if len(text) > f.max_chars:
        return "max_chars"
    if len(text.split()) < f.min_words:
        return "min_words"
    visible = len(text) - sum(map(str.isspace, text))
    nonletter = visible - sum(map(str.isalpha, text))
    if visible and nonletter / visible > f.max_nonletter_ratio:
        return "max_nonletter_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) > 1 and (len(lines) - len(set(lines))) / len(lines) > f.max_repeated_line_ratio:
        return "max_repeated_line_ratio"
    return None


def clean_document(doc: RawDoc, dedup: Dedup | None = None, filters: Filters | None = None) -> CleanDoc:
    """Everything done to one document on its own (in a worker): prose, repairs, dedup key and id,
    MinHash, quality filters."""
    text = wikitext_to_text(doc.text) if doc.kind == "wikitext" else doc.text
    text, made = repair(text)
    key = normalized_key(text)
    signature = minhash_signature(key, dedup) if dedup is not None and dedup.near else None
    failed = failed_filter(text, filters) if filters is not None else None
    return CleanDoc(text, doc.label, doc.where, tuple(made), doc.split_key, key, document_id(key),
                    signature, failed)


def _clean_batch(batch: list[RawDoc], dedup: Dedup, filters: Filters | None = None) -> list[CleanDoc]:
    return [clean_document(d, dedup, filters) for d in batch]


# ---------------------------------------------------------------- the stage


def read_all(source: Source, raw_dir: Path, report: SourceReport) -> Iterator[RawDoc]:
    paths = resolve_paths(str(raw_dir / source.kind / source.name))
    report.files = len(paths)
    for path in paths:
        yield from read_source(source, path)


def clean_sources(cfg: Config, raw_dir: Path, sets: dict[str, OutputSet]) -> dict[str, SourceReport]:
    """Every source of the kinds in `sets` read, cleaned in worker processes (local, or on a Dask
    cluster) a batch at a time, filtered and deduplicated into its set in the source's order."""
    clean_cfg = cfg.data.clean
    reports: dict[str, SourceReport] = {}
    workers = clean_cfg.workers or os.cpu_count() or 1
    with ordered_map(clean_cfg.executor, workers, clean_cfg.scheduler, BATCHES_AHEAD_PER_WORKER) as in_order:
        for source in (s for s in cfg.data.sources if s.kind in sets):
            report = reports[source.name] = SourceReport()
            target = sets[source.kind]
            filters = effective_filters(source, clean_cfg.filters)
            batches = batched(read_all(source, raw_dir, report), clean_cfg.batch_pages)
            progress = Progress(f"clean {source.name}", None, "doc")
            work = functools.partial(_clean_batch, dedup=clean_cfg.dedup, filters=filters)
            for cleaned in in_order(work, batches):
                for doc in cleaned:
                    report.documents_in += 1
                    report.repairs.update(doc.repairs)
                    reason = "missing_label" if source.labeled and doc.label is None else None
                    reason = reason or doc.failed or target.duplicate_of_earlier(doc)
                    if reason:
                        report.removed[reason] += 1
                        continue
                    report.documents_out += 1
                    report.characters_out += len(doc.text)
                    target.add({"id": doc.id, "source": source.name, "text": doc.text,
                                "split_key": doc.split_key or doc.id, "label": doc.label})
                progress.update(len(cleaned))
            progress.close()
            if report.documents_in == 0:
                raise InputError(f"source '{source.name}' ({source.path}): yielded no documents")
            if report.documents_out == 0:
                removed = ", ".join(f"{k} {v}" for k, v in report.removed.most_common())
                raise InputError(
                    f"source '{source.name}': all {report.documents_in} documents were removed ({removed})"
                )
    return reports


def run(cfg: Config, raw_dir: Path, out_dir: Path, metrics_path: Path, splits_dir: Path | None = None,
        kinds: tuple[str, ...] = tuple(KIND_FILES)) -> dict[str, Any]:
    """Clean the sources of `kinds` ingested under `raw_dir` into `out_dir/<kind file>`, write the
    report to `metrics_path` and return it. `splits_dir`: where each kind's split manifest is
    followed and extended (None: none)."""
    clean_cfg = cfg.data.clean
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".clean-") as scratch:
        sets = {kind: OutputSet(clean_cfg.dedup, Path(scratch) / KIND_FILES[kind], kind == "labeled",
                                clean_cfg.row_group_rows, clean_cfg.row_group_bytes) for kind in kinds}
        reports = clean_sources(cfg, raw_dir, sets)
        for kind, out in sets.items():
            manifest_path = splits_dir / KIND_FILES[kind] if splits_dir else None
            manifest = read_split_manifest(manifest_path, clean_cfg.split)
            with atomic_path(out_dir / KIND_FILES[kind]) as tmp:
                summaries[kind] = out.write_split(split_rows(out.keys, manifest, clean_cfg.split), tmp)
            if manifest_path is not None:
                write_split_manifest(manifest_path, manifest, clean_cfg.split)
    quality = summaries["labeled"].pop("quality") if "labeled" in summaries else None
    metrics: dict[str, Any] = {
        "sources": {
            name: {
                "files": r.files,
                "documents_in": r.documents_in,
                "documents_out": r.documents_out,
                "characters_out": r.characters_out,
                "removed": dict(sorted(r.removed.items())),
                "repairs": dict(sorted(r.repairs.items())),
            }
            for name, r in reports.items()
        },
        **summaries,
        **({"quality": quality} if quality is not None else {}),
    }
    write_json(metrics_path, metrics)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def execute(cfg: Config, kind: str) -> str:
    """The stage as DVC runs it: paths from params, one MLflow run, a summary line."""
    from pipeline import tracking

    prepare_stage_process(cfg.data.clean.executor)
    root = project_root()
    stage = "clean" if kind == "corpus" else f"clean_{kind}"
    raw_dir, out_dir = root / cfg.paths.raw, root / cfg.paths.clean
    metrics_path = root / cfg.paths.metrics / f"{stage}.json"
    out_path = out_dir / KIND_FILES[kind]
    if not any(s.kind == kind for s in cfg.data.sources):
        raise InputError(f"data.sources: no {kind} source (a {kind} source is one "
                         f"{'with' if kind == 'labeled' else 'without'} a label_field)")
    with tracking.stage_run(stage, cfg.tracking, cfg.data.model_dump(), {"raw": raw_dir / kind},
                            {"clean": out_path}) as run_log:
        metrics = run(cfg, raw_dir, out_dir, metrics_path, root / cfg.paths.splits, (kind,))
        run_log.log_metrics(tracking.numeric_leaves(metrics))
        run_log.log_artifact(metrics_path)
    table = metrics[kind]
    return (f"{stage}: {table['documents']} documents ({table['characters']:,} chars), "
            f"{metrics['seconds']} s -> {out_path}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("clean", __doc__, execute, argv, choices={"kind": tuple(KIND_FILES)})


if __name__ == "__main__":
    sys.exit(main())
