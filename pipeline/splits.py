"""The split manifest: which split (train, val, test) each document of a source is in, kept across
runs so that no document changes split as its source grows (`paths.splits/<kind>.parquet`: source,
key, split; its metadata records the ratios and salt it was drawn with). New documents, taken in the
order of a salted hash of their key, each go to the split furthest below its ratio."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Split
from pipeline.files import atomic_path

SPLITS = ("train", "val", "test")


def split_order(key: str, cfg: Split) -> bytes:
    return hashlib.sha256(f"{cfg.salt}:{key}".encode()).digest()


def assign_splits(keys: Iterable[str], known: dict[str, str], cfg: Split) -> dict[str, str]:
    """The split of each key of one source: `known` ones keep theirs; new ones, in salted-hash order,
    go each to the split with the largest deficit ratio * total - count (ties: train, val, test)."""
    ratios = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    keys = set(keys)
    splits = {k: known[k] for k in keys if k in known}
    counts = Counter(splits.values())
    total = len(splits)
    for key in sorted(keys - splits.keys(), key=lambda k: split_order(k, cfg)):
        total += 1
        split = max(SPLITS, key=lambda s: ratios[s] * total - counts[s])
        counts[split] += 1
        splits[key] = split
    return splits


def split_draw(cfg: Split) -> bytes:
    """What a split manifest was drawn with: a manifest drawn otherwise is redrawn, not followed."""
    return json.dumps(cfg.model_dump(), sort_keys=True).encode()


def read_split_manifest(path: Path | None, cfg: Split) -> dict[tuple[str, str], str]:
    """(source, key) -> split from an earlier run, or {} when there is none or it used other ratios/salt."""
    if path is None or not path.exists():
        return {}
    table = pq.read_table(path)
    if (table.schema.metadata or {}).get(b"draw") != split_draw(cfg):
        return {}
    columns = table.to_pydict()
    return dict(zip(zip(columns["source"], columns["key"], strict=True), columns["split"], strict=True))


def write_split_manifest(path: Path, splits: dict[tuple[str, str], str], cfg: Split) -> None:
    rows = sorted(splits.items())
    table = pa.table({"source": [s for (s, _), _ in rows], "key": [k for (_, k), _ in rows],
                      "split": [v for _, v in rows]}, schema=pa.schema(
        [("source", pa.string()), ("key", pa.string()), ("split", pa.string())],
        metadata={"draw": split_draw(cfg)}))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def split_rows(keys: list[tuple[str, str]], manifest: dict[tuple[str, str], str], cfg: Split) -> list[str]:
    """The split of each (source, split key) row, source by source; new assignments go into `manifest`."""
    for source in dict.fromkeys(s for s, _ in keys):
        known = {k: v for (s, k), v in manifest.items() if s == source}
        manifest.update({(source, k): v for k, v in
                         assign_splits((k for s, k in keys if s == source), known, cfg).items()})
    return [manifest[key] for key in keys]
