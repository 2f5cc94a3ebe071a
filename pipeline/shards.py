"""Token shards: fixed-size Arrow IPC files of token ids, memory-mapped, never copied whole.

Layout under a tokens directory: `<split>/<split>-00000.arrow` ... (one `tokens` column, uint16 or
uint32), and `manifest.json` listing every shard with its split, file, sha256, tokens, documents and
dtype. Documents are separated by the end-of-text id. Readers give random fixed-length windows for
training (deterministic for a seed, rank and step, so a run resumes by its step counter alone),
sequential non-overlapping windows for evaluation, and documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.files import InputError, file_digest

MANIFEST = "manifest.json"
COLUMN = "tokens"


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """One shard: a single record batch, so a reader maps it as one contiguous array."""
    batch = pa.record_batch([pa.array(tokens)], names=[COLUMN])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)


def map_shard(path: Path) -> np.ndarray:
    """A zero-copy view of a shard's tokens: pages are read from disk only when touched."""
    source = pa.memory_map(str(path), "r")
    column = pa.ipc.open_file(source).get_batch(0).column(0)
    return column.to_numpy(zero_copy_only=True)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.exists():
        raise InputError(f"{path}: no token manifest (run the tokenize stage)")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class WindowPosition:
    """Where a random-window stream stands: enough to resume it exactly. With `world` processes,
    rank r reads slice r of the global batch, so the ranks together read what one process would."""

    seed: int
    rank: int
    step: int
    world: int = 1


class TokenShards:
    """The shards of one split, memory-mapped in manifest order and read as one token sequence."""

    def __init__(self, directory: Path | str, split: str, verify: bool = True) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        self.entries = [s for s in manifest["shards"] if s["split"] == split]
        if not self.entries:
            raise InputError(f"{self.directory / MANIFEST}: no shards for split '{split}'")
        self.eot_id: int = manifest["eot_id"]
        if verify:
            self.verify()
        self.arrays = [map_shard(self.directory / e["file"]) for e in self.entries]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def verify(self) -> None:
        for entry in self.entries:
            path = self.directory / entry["file"]
            if not path.exists():
                raise InputError(f"{path}: shard listed in the manifest is missing")
            if file_digest(path) != entry["sha256"]:
                raise InputError(f"{path}: sha256 does not match the manifest (file changed or corrupt)")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, copied from at most a few shards."""
        pieces = []
        while length > 0:
            shard = int(np.searchsorted(self.starts, start, side="right")) - 1
            offset = start - int(self.starts[shard])
            piece = self.arrays[shard][offset : offset + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
        return np.concatenate(pieces).astype(np.int64)

    def random_windows(self, length: int, batch_size: int, position: WindowPosition) -> Iterator[np.ndarray]:
        """Batches (batch_size, length + 1) of windows at random offsets; step k's global batch
        (batch_size x world windows) depends only on (seed, k), so every rank reads different windows,
        any world size the same global batch, and a resumed run the same ones."""
        if len(self) <= length + 1:
            raise InputError(f"{self.directory}: {len(self)} tokens cannot fill a window of {length + 1}")
        step = position.step
        while True:
            rng = np.random.default_rng([position.seed, 0, step])
            starts = rng.integers(0, len(self) - length - 1, size=batch_size * position.world)
            starts = starts[position.rank * batch_size : (position.rank + 1) * batch_size]
            yield np.stack([self.slice(int(s), length + 1) for s in starts])
            step += 1

    def sequential_windows(self, length: int, batch_size: int) -> Iterator[np.ndarray]:
        """Non-overlapping windows covering the split once: window i holds tokens
        [i·length, i·length + length + 1), so each token is predicted exactly once."""
        count = (len(self) - 1) // length
        for first in range(0, count, batch_size):
            rows = range(first, min(first + batch_size, count))
            yield np.stack([self.slice(i * length, length + 1) for i in rows])

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's ids (without the end-of-text id), in order."""
        carry = np.empty(0, dtype=np.int64)
        for array in self.arrays:
            ends = np.flatnonzero(array == self.eot_id)
            begin = 0
            for end in ends:
                yield np.concatenate([carry, array[begin:end]]) if len(carry) else array[begin:end]
                carry = np.empty(0, dtype=np.int64)
                begin = end + 1
            carry = np.concatenate([carry, array[begin:]]).astype(np.int64)
        if len(carry):
            yield carry
