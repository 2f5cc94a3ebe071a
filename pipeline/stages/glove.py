"""GloVe stage: word (or token) vectors from the co-occurrence triples, trained with PyTorch.

Objective: sum over nonzero X_ij of f(X_ij) (w_i . w~_j + b_i + b~_j - log X_ij)^2 with
f(x) = min(1, (x / x_max)^alpha). The update is the reference C code's AdaGrad (see
../shared/reference/glove-c-algorithm.md), applied to shuffled mini-batches instead of Hogwild threads:
- vectors: g = eta * clip(f diff * other vector, +-grad_clip); w -= g / sqrt(G); then G += g^2, with G
  starting at 1 (so the step is g / sqrt(1/eta^2 + sum of previous squared gradients), not
  torch.optim.Adagrad's);
- biases: b -= f diff / sqrt(G); G += (f diff)^2: no eta and no clipping, as in C.
All records of a batch read the parameters as the batch found them (as Hogwild threads read stale rows).

Two stages: `glove` on the word counts, `glove_token` (`--unit token`) on the token counts, whose
vectors can start the language model's embedding. Outputs in `paths.glove/` (`paths.glove_token/`):
`vectors.safetensors` (`vectors` = w + w~, float32, row i = vocabulary unit i; `token_ids` for the
token unit), `vectors.txt` (GloVe text format: `unit v1 v2 ...`), and `metrics/glove.json`
(`glove_token.json`; loss per epoch, seconds per epoch, word benchmarks with coverage, nearest
neighbours of the probe words) with the loss curve in `metrics/plots/glove_loss.csv`
(`glove_token_loss.csv`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from pipeline import wordbench
from pipeline.config import Config, project_root
from pipeline.configfamilies import Glove
from pipeline.files import InputError, atomic_dir, write_csv, write_json
from pipeline.progress import Progress
from pipeline.stagecli import stage_main
from pipeline.vectors import (
    COOCCUR_FILE,
    TEXT_FILE,
    VECTORS_FILE,
    VOCAB_FILE,
    read_vocabulary,
    write_text_vectors,
)


@dataclass
class Triples:
    rows: torch.Tensor  # int64
    cols: torch.Tensor  # int64
    log_x: torch.Tensor  # float32
    weight: torch.Tensor  # f(x), float32

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Parameters:
    """The C code's W and its AdaGrad sums side by side, so one gather and one scatter serve both:
    `state` row r is [W_r (dim vector + bias last) | G_r (starting at 1)]. Rows 0..V-1 are words,
    rows V..2V-1 contexts."""

    state: torch.Tensor  # (2V, 2 (dim + 1))

    @classmethod
    def initial(cls, vocab_size: int, dim: int, seed: int, device: torch.device) -> Parameters:
        generator = torch.Generator().manual_seed(seed)
        table = (torch.rand(2 * vocab_size, dim + 1, generator=generator) - 0.5) / dim  # biases too, as C
        return cls(torch.cat([table, torch.ones_like(table)], 1).to(device))

    @property
    def vocab_size(self) -> int:
        return len(self.state) // 2

    @property
    def width(self) -> int:
        return self.state.shape[1] // 2

    @property
    def table(self) -> torch.Tensor:
        return self.state[:, : self.width]

    @property
    def squares(self) -> torch.Tensor:
        return self.state[:, self.width :]

    def vectors(self) -> torch.Tensor:
        """w + w~, what the C code saves by default (biases dropped)."""
        table, vocab = self.table, self.vocab_size
        return table[:vocab, :-1] + table[vocab:, :-1]


def select_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("glove.device is cuda but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def read_triples(path: Path, cfg: Glove, device: torch.device) -> Triples:
    if not path.exists():
        raise InputError(f"{path}: co-occurrence triples not found (run the cooccur stage)")
    table = pq.read_table(path)
    x = torch.tensor(table.column("value").to_numpy(), device=device)
    if not len(x):
        raise InputError(f"{path}: the co-occurrence matrix is empty")
    return Triples(
        rows=torch.from_numpy(table.column("row").to_numpy().astype(np.int64)).to(device),
        cols=torch.from_numpy(table.column("col").to_numpy().astype(np.int64)).to(device),
        log_x=torch.log(x).float(),
        weight=torch.clamp((x / cfg.x_max) ** cfg.alpha, max=1.0).float(),
    )


def train_epoch(params: Parameters, triples: Triples, order: torch.Tensor, cfg: Glove) -> float:
    """One pass over the records in `order`; returns the C code's cost, sum 0.5 f diff^2 / records.

    Each record's step is the C code's, computed from the parameters as the batch found them: the
    record's word row i and context row V + j are gathered as a pair (with their AdaGrad sums); each
    row's step is made from the other row, so it is scattered back through the swapped pair."""
    vocab, width, n = params.vocab_size, params.width, len(order)
    words, contexts = triples.rows.index_select(0, order), triples.cols.index_select(0, order) + vocab
    pairs, swapped = torch.stack([words, contexts], 1), torch.stack([contexts, words], 1)
    log_x, weight = triples.log_x.index_select(0, order), triples.weight.index_select(0, order)
    costs = torch.empty(n, device=order.device)
    for start in range(0, n, cfg.batch_size):
        stop = min(start + cfg.batch_size, n)
        gathered = params.state.index_select(0, pairs[start:stop].view(-1)).view(stop - start, 2, 2 * width)
        vector, square = gathered[:, :, :width], gathered[:, :, width:]  # bias: the vector's last column
        diff = (vector[:, 0, :-1] * vector[:, 1, :-1]).sum(1)
        diff.add_(vector[:, 0, -1]).add_(vector[:, 1, -1]).sub_(log_x[start:stop])
        weighted = weight[start:stop] * diff
        torch.mul(weighted, diff, out=costs[start:stop])
        # vectors: g = eta * clip(f diff * the other vector); biases: f diff, unclipped, no eta (as in C)
        update = torch.empty_like(gathered)
        step = update[:, :, width:]
        torch.mul(vector, weighted[:, None, None], out=step)
        step[:, :, :-1].clamp_(-cfg.grad_clip, cfg.grad_clip).mul_(cfg.learning_rate)
        step[:, :, -1] = weighted[:, None]
        torch.mul(step, square.flip(1).rsqrt_(), out=update[:, :, :width]).neg_()  # -g / sqrt(G), then
        step.square_()  # G += g^2
        params.state.index_add_(0, swapped[start:stop].view(-1), update.view(-1, 2 * width))
    return 0.5 * float(costs.sum(dtype=torch.float64)) / n


def train(
    triples: Triples, vocab_size: int, cfg: Glove, device: torch.device, stage: str = "glove"
) -> tuple[Parameters, list[dict]]:
    """`epochs` passes, each over a fresh permutation drawn from `seed`; returns parameters and history."""
    params = Parameters.initial(vocab_size, cfg.dim, cfg.seed, device)
    shuffle = torch.Generator().manual_seed(cfg.seed + 1)
    history = []
    bar = Progress(stage, cfg.epochs, "epoch")
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(len(triples), generator=shuffle).to(device)
        loss = train_epoch(params, triples, order, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if not np.isfinite(loss):
            raise FloatingPointError(f"glove: the loss is {loss} at epoch {epoch}; lower glove.learning_rate")
        history.append({"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - started})
        bar.update(1, loss=loss)
    bar.close()
    return params, history


def run(cfg: Config, cooccur_dir: Path, out_dir: Path, metrics_dir: Path,
        stage: str = "glove") -> dict[str, Any]:
    """Train the vectors, save them, evaluate word vectors; returns the metrics written (to
    `metrics/<stage>.json`, the loss curve to `metrics/plots/<stage>_loss.csv`)."""
    gcfg = cfg.glove
    vocab = read_vocabulary(cooccur_dir / VOCAB_FILE)
    benchmarks = cfg.word_eval.benchmarks.model_dump()
    files = wordbench.benchmark_files(benchmarks, project_root()) if vocab.token_ids is None else []
    device = select_device(gcfg.device)
    triples = read_triples(cooccur_dir / COOCCUR_FILE, gcfg, device)
    if int(triples.rows.max()) >= len(vocab):
        raise InputError(f"{cooccur_dir}: triples index past the vocabulary ({len(vocab)} units)")
    params, history = train(triples, len(vocab), gcfg, device, stage)
    vectors = params.vectors().float().cpu().contiguous()
    with atomic_dir(out_dir) as tmp:
        tensors = {"vectors": vectors}
        if vocab.token_ids is not None:
            tensors["token_ids"] = torch.from_numpy(vocab.token_ids)
        save_file(tensors, str(tmp / VECTORS_FILE), metadata={"unit": "token" if vocab.token_ids is not None
                                                               else "word"})
        write_text_vectors(tmp / TEXT_FILE, vocab.units, vectors.numpy())
    word_vectors = wordbench.WordVectors(vocab.units, vectors.numpy())
    metrics: dict[str, Any] = {
        "unit": "token" if vocab.token_ids is not None else "word", "vocab_size": len(vocab),
        "records": len(triples), "dim": gcfg.dim, "epochs": gcfg.epochs, "device": device.type,
        "loss": round(history[-1]["loss"], 6),
        "seconds_per_epoch": round(float(np.median([h["seconds"] for h in history])), 3),
        "neighbours": wordbench.nearest_neighbours(word_vectors, cfg.word_eval.probe_words,
                                                   cfg.word_eval.neighbours),
    }
    if vocab.token_ids is None:
        metrics.update(wordbench.evaluate(word_vectors, *files))
    write_json(metrics_dir / f"{stage}.json", metrics)
    write_csv(metrics_dir / "plots" / f"{stage}_loss.csv", ["epoch", "loss"],
              [(h["epoch"], h["loss"]) for h in history])
    metrics["history"] = history
    return metrics


def execute(cfg: Config, unit: str = "word") -> str:
    """The stage as DVC runs it: `glove` on the word counts, `glove_token` (`--unit token`) on the tokens'."""
    from pipeline import tracking

    word = unit == "word"
    stage = "glove" if word else "glove_token"
    root = project_root()
    cooccur_dir = root / (cfg.paths.cooccur if word else cfg.paths.cooccur_token)
    out_dir = root / (cfg.paths.glove if word else cfg.paths.glove_token)
    metrics_dir = root / cfg.paths.metrics
    with tracking.stage_run(stage, cfg.tracking, cfg.glove.model_dump(), {"cooccur": cooccur_dir},
                            {"glove": out_dir}) as run_log:
        metrics = run(cfg, cooccur_dir, out_dir, metrics_dir, stage)
        for h in metrics.pop("history"):
            run_log.log_metrics({"loss": h["loss"], "epoch_seconds": h["seconds"]}, step=h["epoch"])
        run_log.log_metrics(tracking.numeric_leaves({k: v for k, v in metrics.items() if k != "neighbours"}))
        run_log.log_artifact(out_dir / VECTORS_FILE, "embeddings")
    scores = ", ".join(f"{k} {metrics[k].get('spearman', metrics[k].get('accuracy'))}"
                       for k in ("wordsim353", "simlex999", "analogy") if k in metrics)
    scores = f", {scores}" if scores else ""
    return f"{stage}: loss {metrics['loss']}, {metrics['seconds_per_epoch']} s/epoch{scores} -> {out_dir}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("glove", __doc__, execute, argv, errors=(FloatingPointError,),
                      choices={"unit": ("word", "token")})


if __name__ == "__main__":
    sys.exit(main())
