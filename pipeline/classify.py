"""Labeled examples and a trained classifier: reading the encoded splits, batching, predicting.

A classifier directory (`paths.classifier`) holds `model.safetensors` + `config.json` (a
`SequenceClassifier`, see pipeline/models), `labels.json` (label name -> class index) and the
`tokenizer.json` its ids come from, so it is usable on its own: `Classifier.load(dir).predict(texts)`.
The model is either ours or a transformers model fine-tuned from a local directory
(`TransformersClassifier`, with that directory's tokenizer and its special tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer
from torch import nn

from pipeline.checkpoint import load_model
from pipeline.files import InputError
from pipeline.models import SequenceClassifier, TransformersClassifier
from pipeline.training import autocast

LABELS_FILE = "labels.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Examples:
    ids: list[np.ndarray]
    labels: np.ndarray  # int64 class indices
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def truncated(self, max_length: int) -> Examples:
        return Examples([ids[:max_length] for ids in self.ids], self.labels, self.texts)

    def sample(self, count: int | None, seed: int) -> Examples:
        """`count` examples drawn without replacement (all of them when None), in a seeded order."""
        if count is None or count >= len(self):
            return self
        chosen = np.sort(np.random.default_rng(seed).permutation(len(self))[:count])
        return Examples([self.ids[i] for i in chosen], self.labels[chosen], [self.texts[i] for i in chosen])

    def encoded(self, tokenizer: Tokenizer, add_special_tokens: bool) -> Examples:
        """The same texts and labels with ids from another tokenizer (its truncation applies)."""
        return Examples(encode(tokenizer, self.texts, add_special_tokens), self.labels, self.texts)


def encode(tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[np.ndarray]:
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
    return [np.asarray(e.ids, dtype=np.int64) for e in encodings]


def read_labels(path: Path) -> dict[str, int]:
    if not path.exists():
        raise InputError(f"{path}: label mapping not found (run the tokenize stage)")
    return json.loads(path.read_text())


def read_examples(labeled_dir: Path, split: str) -> Examples:
    """The encoded examples of one split (`labeled/<split>.arrow` from the tokenize stage)."""
    path = labeled_dir / f"{split}.arrow"
    if not path.exists():
        raise InputError(f"{path}: labeled split not found (run the tokenize stage)")
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    if table.num_rows == 0:
        raise InputError(f"{path}: the labeled {split} split is empty")
    column = table.column("ids")
    ids = [np.asarray(column[i].values, dtype=np.int64) for i in range(table.num_rows)]
    return Examples(ids, table.column("label").to_numpy().astype(np.int64), table.column("text").to_pylist())

def pad_batch(
    sequences: list[np.ndarray], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, longest) and lengths; an empty text becomes one pad token."""
    lengths = [max(len(s), 1) for s in sequences]
    ids = np.full((len(sequences), max(lengths)), pad_id, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
    return torch.from_numpy(ids).to(device), torch.tensor(lengths, device=device)


@torch.no_grad()
def predict_proba(model: nn.Module, sequences: list[np.ndarray], pad_id: int, batch_size: int,
                  device: torch.device) -> np.ndarray:
    """Class probabilities (N, classes), in the order given (batched by length, to pad little)."""
    was_training = model.training
    model.eval()
    order = np.argsort([len(s) for s in sequences], kind="stable")
    out = []
    for start in range(0, len(sequences), batch_size):
        ids, lengths = pad_batch([sequences[i] for i in order[start : start + batch_size]], pad_id, device)
        with autocast(device):
            logits = model(ids, lengths)
        out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    model.train(was_training)
    probs = np.concatenate(out) if out else np.empty((0, 0))
    unsorted = np.empty_like(probs)
    unsorted[order] = probs
    return unsorted


def truncating(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """`tokenizer` cutting every text at `max_length` ids (special tokens kept)."""
    tokenizer.enable_truncation(max_length)
    return tokenizer


@dataclass
class Classifier:
    """A trained classifier with its tokenizer and label names, for raw texts."""

    model: nn.Module  # SequenceClassifier | TransformersClassifier: forward(ids, lengths) -> logits
    tokenizer: Tokenizer  # truncating at the classifier's max_length
    labels: list[str]  # by class index
    pad_id: int
    add_special_tokens: bool  # a transformers model's own ([CLS] ... [SEP]); ours has none

    @classmethod
    def load(cls, directory: Path) -> Classifier:
        model, config = load_model(directory)
        if not isinstance(model, SequenceClassifier | TransformersClassifier):
            raise InputError(f"{directory}: holds a language model, not a classifier")
        tokenizer_path = directory / TOKENIZER_FILE
        if not tokenizer_path.exists():
            raise InputError(f"{tokenizer_path}: tokenizer missing beside the classifier")
        mapping = read_labels(directory / LABELS_FILE)
        labels = [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]
        tokenizer = truncating(Tokenizer.from_file(str(tokenizer_path)), config["max_length"])
        return cls(model.eval(), tokenizer, labels, config["pad_id"], config.get("add_special_tokens", False))

    def predict(self, texts: list[str], batch_size: int = 64) -> tuple[list[str], np.ndarray]:
        """Label names and class probabilities (N, classes) for raw texts."""
        ids = encode(self.tokenizer, texts, self.add_special_tokens)
        probs = predict_proba(self.model, ids, self.pad_id, batch_size, torch.device("cpu"))
        return [self.labels[i] for i in probs.argmax(1)], probs
