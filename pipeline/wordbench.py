"""Word-vector benchmarks: word-pair similarity (Spearman) and analogies (3CosAdd), with coverage.

Evaluated the way gensim's `evaluate_word_pairs` and `evaluate_word_analogies` do: words are
lowercased, a pair or question with a word outside the vocabulary is skipped (and counted against
coverage), analogy answers exclude the three question words, and accuracy is over covered questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from pipeline.files import InputError, resolve_package_path


@dataclass(frozen=True)
class WordVectors:
    words: list[str]
    vectors: np.ndarray  # (words, dim)

    def unit(self) -> np.ndarray:
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        return self.vectors / np.maximum(norms, 1e-12)

    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


def benchmark_files(specs: dict[str, str], root: Path) -> list[Path]:
    """The evaluation files (`word_eval.benchmarks`: `pkg://` or project paths), checked to exist
    before any training."""
    files = [resolve_package_path(s) if s.startswith("pkg://") else root / s for s in specs.values()]
    for path in files:
        if not path.exists():
            raise InputError(f"{path}: evaluation file not found (word_eval.benchmarks)")
    return files


def _lines(path: Path) -> list[str]:
    if not path.exists():
        raise InputError(f"{path}: evaluation file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln for ln in lines if ln.strip() and not ln.startswith("#")]


def read_pairs(path: Path) -> list[tuple[str, str, float]]:
    """`word1<TAB>word2<TAB>score` lines; `#` lines are comments."""
    pairs = []
    for line in _lines(path):
        parts = line.split("\t")
        try:
            pairs.append((parts[0].lower(), parts[1].lower(), float(parts[2])))
        except (IndexError, ValueError):
            raise InputError(f"{path}: not a word-pair line: {line!r}") from None
    return pairs


def read_analogies(path: Path) -> list[tuple[str, str, str, str]]:
    """`a b c d` lines (a is to b as c is to d); `: section` lines are headers."""
    questions = []
    for line in _lines(path):
        if line.startswith(":"):
            continue
        words = line.lower().split()
        if len(words) != 4:
            raise InputError(f"{path}: not an analogy line: {line!r}")
        questions.append((words[0], words[1], words[2], words[3]))
    return questions


def pair_similarity(vectors: WordVectors, path: Path) -> dict[str, float]:
    """Spearman correlation of cosine similarity with the human scores, over covered pairs."""
    pairs = read_pairs(path)
    index, unit = vectors.index(), vectors.unit()
    covered = [(index[a], index[b], s) for a, b, s in pairs if a in index and b in index]
    if len(covered) < 2:
        return {"spearman": float("nan"), "coverage": len(covered) / len(pairs), "pairs": len(covered)}
    cosines = [float(unit[i] @ unit[j]) for i, j, _ in covered]
    rho = spearmanr(cosines, [s for _, _, s in covered]).statistic
    return {"spearman": round(float(rho), 4), "coverage": round(len(covered) / len(pairs), 4),
            "pairs": len(covered)}


def analogy_accuracy(vectors: WordVectors, path: Path, batch: int = 1024) -> dict[str, float]:
    """3CosAdd: the answer is the word nearest to b - a + c (unit vectors), a, b, c excluded."""
    questions = read_analogies(path)
    index, unit = vectors.index(), vectors.unit()
    covered = np.array([[index[w] for w in q] for q in questions if all(w in index for w in q)],
                       dtype=np.int64).reshape(-1, 4)
    correct = 0
    for start in range(0, len(covered), batch):
        chunk = covered[start:start + batch]
        scores = (unit[chunk[:, 1]] - unit[chunk[:, 0]] + unit[chunk[:, 2]]) @ unit.T
        rows = np.arange(len(chunk))
        for column in range(3):
            scores[rows, chunk[:, column]] = -np.inf
        correct += int((scores.argmax(axis=1) == chunk[:, 3]).sum())
    accuracy = correct / len(covered) if len(covered) else float("nan")
    return {"accuracy": round(accuracy, 4), "coverage": round(len(covered) / len(questions), 4),
            "questions": len(covered)}


def nearest_neighbours(vectors: WordVectors, words: list[str], k: int) -> dict[str, list[str]]:
    index, unit = vectors.index(), vectors.unit()
    found = {}
    for word in words:
        if word not in index:
            continue
        scores = unit @ unit[index[word]]
        scores[index[word]] = -np.inf
        found[word] = [vectors.words[i] for i in np.argsort(-scores, kind="stable")[:k]]
    return found


def evaluate(vectors: WordVectors, wordsim: Path, simlex: Path, analogy: Path) -> dict[str, Any]:
    return {
        "wordsim353": pair_similarity(vectors, wordsim),
        "simlex999": pair_similarity(vectors, simlex),
        "analogy": analogy_accuracy(vectors, analogy),
    }
