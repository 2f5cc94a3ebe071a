"""Readers for raw sources: each yields `RawDoc`s in file order, streaming, raw inputs untouched.

Formats: `mediawiki` (XML dump, plain, .bz2 or .gz; one document per article page), `text` (one
document per file), `jsonl` (one per line), `csv` (one per row), `parquet` (one per row). Every
error is raised as `InputError` naming the file and, where known, the line, page or field.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import charset_normalizer
from ftfy.badness import badness

from pipeline.config import Source
from pipeline.files import InputError, streamed_parquet

ENCODING_SAMPLE_BYTES = 1 << 20
FALLBACK_ENCODINGS = ("cp1252", "mac_roman", "latin-1")


@dataclass(frozen=True, slots=True)
class RawDoc:
    text: str
    label: str | None
    where: str  # file and position, for error messages and the report
    kind: str = "text"  # "wikitext" needs markup stripping; "text" is already prose
    split_key: str | None = None  # what the split hashes when stabler than the text (a page title)


def open_binary(path: Path) -> IO[bytes]:
    """Open a file, decompressing .bz2, .gz and .xz transparently."""
    suffix = path.suffix.lower()
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def detect_encoding(sample: bytes) -> str:
    """UTF-8 when the bytes are valid UTF-8; else the candidate decoding that reads least like
    mojibake (ftfy's badness), among charset-normalizer's guesses and the common legacy codecs."""
    try:
        sample.decode("utf-8")
        return "utf-8-sig" if sample.startswith(b"\xef\xbb\xbf") else "utf-8"
    except UnicodeDecodeError as exc:
        if exc.start >= len(sample) - 4:  # a multibyte character cut by the sample's end
            return "utf-8"
    guesses = [m.encoding for m in charset_normalizer.from_bytes(sample)][:3]
    scored = []
    for encoding in dict.fromkeys([*guesses, *FALLBACK_ENCODINGS]):
        try:
            scored.append((badness(sample.decode(encoding)), encoding))
        except (UnicodeDecodeError, LookupError):
            continue
    return min(scored)[1] if scored else "latin-1"


def read_text_file(path: Path, encoding: str) -> str:
    with open_binary(path) as f:
        data = f.read()
    if encoding == "auto":
        encoding = detect_encoding(data[:ENCODING_SAMPLE_BYTES])
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: byte {exc.start} is not valid {encoding}: {exc.reason}") from None
    except LookupError:
        raise InputError(f"{path}: unknown encoding '{encoding}'") from None


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def read_mediawiki(path: Path) -> Iterator[RawDoc]:
    """Stream a MediaWiki XML dump page by page: article namespace only, redirects skipped."""
    title = "<before the first page>"
    try:
        with open_binary(path) as stream:
            context = ET.iterparse(stream, events=("start", "end"))
            _, root = next(context)
            for event, elem in context:
                if event != "end":
                    continue
                name = _local(elem.tag)
                if name == "title":
                    title = elem.text or ""
                elif name == "page":
                    ns = next((c.text for c in elem if _local(c.tag) == "ns"), "0")
                    redirect = any(_local(c.tag) == "redirect" for c in elem)
                    text = next((t.text for t in elem.iter() if _local(t.tag) == "text"), None)
                    if ns == "0" and not redirect and text:
                        yield RawDoc(text, None, f"{path} page '{title}'", "wikitext", f"title:{title}")
                    root.clear()  # keep memory flat: drop every finished page
    except ET.ParseError as exc:
        line, column = exc.position
        raise InputError(
            f"{path}: malformed XML at line {line}, column {column} (after page '{title}')"
        ) from None
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: corrupt or truncated file after page '{title}': {exc}") from None


def read_text(path: Path, encoding: str) -> Iterator[RawDoc]:
    yield RawDoc(read_text_file(path, encoding), None, str(path))


def _field(record: dict[str, object], field: str, where: str) -> object:
    if field not in record:
        raise InputError(f"{where}: no field '{field}' (fields: {', '.join(map(str, record))})")
    return record[field]


def _doc(record: dict[str, object], source: Source, where: str) -> RawDoc:
    assert source.text_field is not None
    text = _field(record, source.text_field, where)
    label = _field(record, source.label_field, where) if source.label_field else None
    return RawDoc(
        "" if text is None else str(text),
        None if label is None or label == "" else str(label),
        where,
    )


def read_jsonl(path: Path, source: Source) -> Iterator[RawDoc]:
    content = read_text_file(path, source.encoding)
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object")
        yield _doc(record, source, where)


def read_csv(path: Path, source: Source) -> Iterator[RawDoc]:
    content = read_text_file(path, source.encoding)
    reader = csv.DictReader(io.StringIO(content, newline=""))
    columns = reader.fieldnames or []
    for field in (source.text_field, source.label_field):
        if field and field not in columns:
            raise InputError(f"{path}: no column '{field}' (columns: {', '.join(columns)})")
    try:
        for row in reader:
            yield _doc(row, source, f"{path} line {reader.line_num}")
    except csv.Error as exc:
        raise InputError(f"{path} line {reader.line_num}: malformed CSV: {exc}") from None


def read_parquet(path: Path, source: Source) -> Iterator[RawDoc]:
    try:
        table = streamed_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{path}: not a readable Parquet file: {exc}") from None
    columns = [c for c in (source.text_field, source.label_field) if c]
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        raise InputError(f"{path}: no column '{missing[0]}' (columns: {', '.join(table.schema_arrow.names)})")
    row = 0
    for batch in table.iter_batches(columns=columns, batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield _doc(record, source, f"{path} row {row}")


def read_source(source: Source, path: Path) -> Iterator[RawDoc]:
    if source.format == "mediawiki":
        return read_mediawiki(path)
    if source.format == "text":
        return read_text(path, source.encoding)
    if source.format == "jsonl":
        return read_jsonl(path, source)
    if source.format == "csv":
        return read_csv(path, source)
    if source.format == "parquet":
        return read_parquet(path, source)
    raise InputError(f"source '{source.name}': unknown format '{source.format}'")
