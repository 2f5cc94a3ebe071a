"""Word and token vectors: the files the embedding stages share, and the train text they read.

`cooccur` writes a vocabulary and co-occurrence triples, `glove` reads them; both embedding families
(`glove`, `word2vec`) write `vectors.safetensors` (`vectors` float32 (units, dim), plus `token_ids`
int64 for token units) and `vectors.txt` (GloVe's text format: a unit and its values per line).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import TEXT_ROWS_PER_READ, InputError, atomic_path, streamed_parquet

COOCCUR_FILE = "cooccur.parquet"
VOCAB_FILE = "vocab.parquet"
VECTORS_FILE = "vectors.safetensors"
TEXT_FILE = "vectors.txt"
CORPUS_FILE = "corpus.parquet"
LABELED_FILE = "labeled.parquet"


@dataclass(frozen=True)
class Vocabulary:
    units: list[str]
    counts: np.ndarray  # int64, one per unit, descending
    token_ids: np.ndarray | None = None  # int64, unit: token only
    provisional: np.ndarray | None = None  # int64, unit: word only, while counting (WordIds ids)

    def __len__(self) -> int:
        return len(self.units)


def write_vocabulary(vocab: Vocabulary, path: Path) -> None:
    columns: dict[str, Any] = {"unit": pa.array(vocab.units, pa.string()), "count": pa.array(vocab.counts)}
    if vocab.token_ids is not None:
        columns["token_id"] = pa.array(vocab.token_ids)
    pq.write_table(pa.table(columns), path)


def read_vocabulary(path: Path) -> Vocabulary:
    if not path.exists():
        raise InputError(f"{path}: vocabulary not found (run the cooccur stage)")
    table = pq.read_table(path).to_pydict()
    token_ids = np.array(table["token_id"], dtype=np.int64) if "token_id" in table else None
    return Vocabulary(table["unit"], np.array(table["count"], dtype=np.int64), token_ids)


def write_text_vectors(path: Path, units: list[str], vectors: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for unit, row in zip(units, vectors, strict=True):
            out.write(unit + " " + " ".join(f"{v:.6f}" for v in row) + "\n")


def read_text_vectors(path: Path) -> tuple[list[str], np.ndarray]:
    units, rows = [], []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            unit, *values = line.rstrip("\n").split(" ")
            units.append(unit)
            rows.append(np.array(values, dtype=np.float32))
    return units, np.stack(rows)


# ---------------------------------------------------------------- train words of the clean tables


def train_texts(*tables: Path, part: int = 0, parts: int = 1) -> Iterator[str]:
    """The train texts of each clean table (Parquet with `text` and `split`), in order; of the rows
    of all tables, only rows `part`, `part + parts`, ..."""
    first_row = 0
    for table in tables:
        for batch in streamed_parquet(table).iter_batches(columns=["text", "split"],
                                                        batch_size=TEXT_ROWS_PER_READ):
            mine = slice((part - first_row) % parts, None, parts)  # no pa.array: it imports pandas
            first_row += batch.num_rows
            texts, splits = batch.column(0).to_pylist()[mine], batch.column(1).to_pylist()[mine]
            for text, split in zip(texts, splits, strict=True):
                if split == "train":
                    yield text


def word_tables(clean_dir: Path, include_labeled_train: bool) -> list[Path]:
    """The clean tables whose train texts word units come from: the corpus, then the labeled set."""
    tables = [clean_dir / CORPUS_FILE] + ([clean_dir / LABELED_FILE] if include_labeled_train else [])
    for table in tables:
        if not table.exists():
            raise InputError(f"{table}: clean output not found (run the clean stages)")
    return tables


def word_documents(tables: list[Path], pattern: str, part: int = 0, parts: int = 1) -> Iterator[list[str]]:
    """Each train text as its lowercased `pattern` matches (of rows `part`, `part + parts`, ...)."""
    word = re.compile(pattern)
    for text in train_texts(*tables, part=part, parts=parts):
        yield word.findall(text.lower())
