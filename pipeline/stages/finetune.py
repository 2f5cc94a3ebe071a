"""Fine-tune stage: a classification head on the pretrained language model, on the labeled train split.

- `finetune.mode`: `full` trains everything (backbone at `learning_rate`, head at
  `head_learning_rate`); `frozen` trains the head only (a linear probe).
- Pooling of the backbone's final hidden states (`finetune.pooling`): the last real token or the mean.
- Loss: cross-entropy, weighted by inverse class frequency of the train split (`class_weights`).
- AdamW (decay on matrices only), warmup then cosine decay, clipping; validation macro-F1 every
  `eval_every` steps; early stopping with `patience`; the best model kept.
- Resumable like pretraining: `paths.finetune_checkpoints` holds the latest weights and training state
  (optimizer, RNG, step; batches are a function of seed and step), resumed when params and inputs match.

Outputs: `paths.classifier/` (model.safetensors, config.json, labels.json, tokenizer.json),
`metrics/finetune.json`, curves in `metrics/plots/finetune_{train,val}.csv`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from pipeline.checkpoint import (
    Fingerprint,
    fingerprint_of,
    load_model,
    read_config,
    restore,
    save_model,
    write_checkpoint,
)
from pipeline.classify import (
    LABELS_FILE,
    TOKENIZER_FILE,
    Examples,
    pad_batch,
    predict_proba,
    read_examples,
    read_labels,
    truncating,
)
from pipeline.config import Config, Finetune, project_root
from pipeline.files import InputError, atomic_dir, file_digest, write_csv, write_json
from pipeline.hf import is_transformers_dir
from pipeline.models import SequenceClassifier, TransformersClassifier, with_dropout
from pipeline.progress import Progress
from pipeline.sourcecode import code_digest
from pipeline.stagecli import stage_main
from pipeline.tracking import path_md5
from pipeline.training import autocast, decay_groups, warmup_cosine

BUCKET_BATCHES = 50


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """n / (classes * count): each class weighs the same in the loss in total."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def head_parameter_names(model: nn.Module) -> set[str]:
    if isinstance(model, TransformersClassifier):
        return model.head_parameter_names()
    return {f"classifier.{name}" for name, _ in model.classifier.named_parameters()}


def optimizer_for(model: nn.Module, cfg: Finetune) -> torch.optim.AdamW:
    """Backbone at `learning_rate` (frozen in mode frozen), head at `head_learning_rate`; embeddings,
    biases and norms without weight decay."""
    head = head_parameter_names(model)
    body = [(n, p) for n, p in model.named_parameters() if n not in head]
    if cfg.mode == "frozen":
        for _, p in body:
            p.requires_grad_(False)
    embeddings = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, nn.Embedding))
    groups = decay_groups(body, cfg.weight_decay, embeddings, lr=cfg.learning_rate, peak_lr=cfg.learning_rate)
    groups += decay_groups([(n, p) for n, p in model.named_parameters() if n in head], cfg.weight_decay,
                           (), lr=cfg.head_learning_rate, peak_lr=cfg.head_learning_rate)
    return torch.optim.AdamW([g for g in groups if g["params"]])


@dataclass
class Start:
    """What fine-tuning starts from: the classifier (backbone + fresh head), the examples in its
    tokenizer's ids, and how to write that tokenizer beside the result."""

    model: nn.Module
    train: Examples
    val: Examples
    pad_id: int
    max_length: int
    add_special_tokens: bool
    base_digest: str
    write_tokenizer: Callable[[Path], None]


def pipeline_start(cfg: Config, base: Path, tokens_dir: Path, labels: dict[str, int]) -> Start:
    f = cfg.finetune
    backbone, lm_config = load_model(base)
    if f.dropout is not None:
        backbone = with_dropout(backbone, f.dropout)
    max_length = min(cfg.tokenize.max_length, lm_config["model"]["context"])  # a GPT sees no further
    labeled = tokens_dir / "labeled"
    train = read_examples(labeled, "train").sample(f.max_examples, f.seed).truncated(max_length)
    val = read_examples(labeled, "val").truncated(max_length)
    torch.manual_seed(f.seed)
    model = SequenceClassifier(backbone, len(labels), f.pooling)
    pad_id = json.loads((labeled / "summary.json").read_text())["pad_id"]
    return Start(model, train, val, pad_id, max_length, False, lm_config["sha256"],
                 lambda out: shutil.copy(base / TOKENIZER_FILE, out / TOKENIZER_FILE))


def transformers_start(cfg: Config, base: Path, tokens_dir: Path, labels: dict[str, int]) -> Start:
    """A local transformers model with its own tokenizer (its special tokens added, as it was
    trained); the labeled texts re-encoded with it."""
    from transformers import AutoTokenizer

    f = cfg.finetune
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
        torch.manual_seed(f.seed)
        model = TransformersClassifier.from_pretrained(base, labels)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{base}: not a usable transformers model directory: {first_line}") from None
    print(f"finetune: {type(model.model).__name__} from {base}; new: {', '.join(model.head)}",
          file=sys.stderr)
    if f.dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = f.dropout
    hf_config = model.model.config
    positions = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    max_length = min(cfg.tokenize.max_length, positions or cfg.tokenize.max_length)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    hf_config.pad_token_id = pad_id  # a decoder's head reads the last non-pad token
    backend = truncating(tokenizer.backend_tokenizer, max_length)
    labeled = tokens_dir / "labeled"
    train = read_examples(labeled, "train").sample(f.max_examples, f.seed).encoded(backend, True)
    val = read_examples(labeled, "val").encoded(backend, True)
    return Start(model, train, val, pad_id, max_length, True, path_md5(base),
                 lambda out: tokenizer.save_pretrained(str(out)))


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches, a function of seed and epoch: shuffled, then sorted by length within
    windows of BUCKET_BATCHES batches (so a batch pads little), then the batch order shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * BUCKET_BATCHES
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        order[start : start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def macro_f1(model: nn.Module, examples: Examples, pad_id: int, batch_size: int,
             device: torch.device) -> float:
    probs = predict_proba(model, examples.ids, pad_id, batch_size, device)
    return float(f1_score(examples.labels, probs.argmax(1), average="macro"))


def fresh_progress() -> dict[str, Any]:
    return {"step": 0, "best_f1": -1.0, "best_saved": False, "bad_evals": 0, "train_curve": [],
            "val_curve": [], "seconds_training": 0.0}


def fingerprint(cfg: Finetune, base_digest: str, labeled_sha256: str) -> Fingerprint:
    """What a checkpoint must match to be resumed: the params, the base model (by its bytes, not its
    path), the labeled train set and the code."""
    return fingerprint_of(params=cfg.model_dump(exclude={"resume", "base"}), **{"base model": base_digest},
                          data=labeled_sha256, code=code_digest("pipeline.stages.finetune"))


def write_curves(plots: Path, progress: dict[str, Any]) -> None:
    for name, column in (("train", "loss"), ("val", "macro_f1")):
        write_csv(plots / f"finetune_{name}.csv", ["step", column], progress[f"{name}_curve"])


def run(cfg: Config, base: Path, tokens_dir: Path, out_dir: Path, checkpoints: Path, metrics_dir: Path,
        tracked: Any = None) -> dict[str, Any]:
    """Train the classifier on `base` (this pipeline's LM or a local transformers model); the best by
    validation macro-F1 goes to `out_dir`. Returns the metrics."""
    f = cfg.finetune
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labeled = tokens_dir / "labeled"
    mapping = read_labels(labeled / LABELS_FILE)
    if not (base / "config.json").exists():
        raise InputError(f"{base}: no model here (config.json missing): run pretrain, or set finetune.base")
    begin = transformers_start if is_transformers_dir(base) else pipeline_start
    start = begin(cfg, base, tokens_dir, mapping)
    train, val, pad_id = start.train, start.val, start.pad_id
    unseen = set(np.unique(val.labels)) - set(np.unique(train.labels))
    if unseen:
        names = sorted(n for n, i in mapping.items() if i in unseen)
        raise InputError(f"{labeled}: labels {names} appear in val but not in the train examples used")
    model = start.model.to(device).train()  # transformers loads models in eval mode
    optimizer = optimizer_for(model, f)
    weights = class_weights(train.labels, len(mapping)).to(device) if f.class_weights else None
    steps_per_epoch = math.ceil(len(train) / f.batch_size)
    max_steps = f.epochs * steps_per_epoch
    example_lengths = np.array([len(ids) for ids in train.ids])
    plan: tuple[int, list[np.ndarray]] = (-1, [])
    run_fingerprint = fingerprint(f, start.base_digest, file_digest(labeled / "train.arrow"))
    progress = restore(checkpoints, run_fingerprint, model, optimizer, fresh_progress(), "finetune") \
        if f.resume == "auto" else fresh_progress()
    extra = {"pad_id": pad_id, "max_length": start.max_length, "labels": mapping,
             "add_special_tokens": start.add_special_tokens, "base_digest": start.base_digest}
    stopped_early = False
    bar = Progress("finetune", max_steps, "step", progress["step"], ("examples", f.batch_size))
    while progress["step"] < max_steps and not stopped_early:
        started = time.perf_counter()
        step = progress["step"]
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, f.warmup_steps, max_steps, group["peak_lr"],
                                        group["peak_lr"] * f.min_lr_ratio)
        epoch, offset = divmod(step, steps_per_epoch)
        if plan[0] != epoch:
            plan = (epoch, epoch_batches(example_lengths, f.batch_size, f.seed, epoch))
        chosen = plan[1][offset]
        ids, lengths = pad_batch([train.ids[i] for i in chosen], pad_id, device)
        targets = torch.from_numpy(train.labels[chosen]).to(device)
        with autocast(device):
            logits = model(ids, lengths)
        loss = F.cross_entropy(logits.float(), targets, weight=weights)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"finetune: loss is {loss.item()} at step {step + 1}")
        loss.backward()
        if f.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), f.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress["step"] = step = step + 1
        progress["seconds_training"] += time.perf_counter() - started
        progress["train_curve"].append((step, loss.item()))
        bar.update(1, loss=loss.item())
        if tracked is not None:
            tracked.log_metrics({"train_loss": loss.item()}, step=step)
        if step % f.eval_every == 0 or step == max_steps:
            score = macro_f1(model, val, pad_id, 2 * f.batch_size, device)
            progress["val_curve"].append((step, score))
            bar.update(0, val_macro_f1=score)
            if tracked is not None:
                tracked.log_metrics({"val_macro_f1": score}, step=step)
            if score > progress["best_f1"]:
                progress["best_f1"], progress["bad_evals"], progress["best_saved"] = score, 0, True
                save_model(checkpoints / "best", model, {**extra, "step": step, "val_macro_f1": score})
            else:
                progress["bad_evals"] += 1
                stopped_early = progress["bad_evals"] >= f.patience
        if step % f.checkpoint_every == 0 or step == max_steps or stopped_early:
            write_checkpoint(checkpoints, model, optimizer, progress, run_fingerprint)
    bar.close()
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(checkpoints / "best", tmp, dirs_exist_ok=True)
        start.write_tokenizer(tmp)
        write_json(tmp / LABELS_FILE, mapping)
    best = read_config(out_dir)
    metrics = {
        "val_macro_f1": round(best["val_macro_f1"], 4), "best_step": best["step"], "steps": progress["step"],
        "stopped_early": stopped_early, "train_examples": len(train), "mode": f.mode,
        "pooling": f.pooling if isinstance(model, SequenceClassifier) else "transformers",
        "examples_per_s": round(progress["step"] * f.batch_size / max(progress["seconds_training"], 1e-9), 1),
    }
    write_json(metrics_dir / "finetune.json", metrics)
    write_curves(metrics_dir / "plots", progress)
    return metrics


def execute(cfg: Config) -> str:
    from pipeline import tracking

    paths = {name: project_root() / getattr(cfg.paths, name)
             for name in ("tokens", "classifier", "finetune_checkpoints", "metrics")}
    paths["base"] = project_root() / cfg.finetune.base
    inputs = {"base": paths["base"], "labeled": paths["tokens"] / "labeled"}
    with tracking.stage_run("finetune", cfg.tracking, cfg.finetune.model_dump(), inputs,
                            {"classifier": paths["classifier"]}) as run_log:
        metrics = run(cfg, paths["base"], paths["tokens"], paths["classifier"], paths["finetune_checkpoints"],
                      paths["metrics"], run_log)
        run_log.log_metrics(tracking.numeric_leaves(metrics))
        version = tracking.register_model(run_log, paths["classifier"], cfg.tracking.classifier_model,
                                          "classifier")
        run_log.set_tags({"registered_version": version or "-"})
    return (f"finetune: val macro-F1 {metrics['val_macro_f1']} (step {metrics['best_step']} of "
            f"{metrics['steps']}) -> {paths['classifier']}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("finetune", __doc__, execute, argv, errors=(FloatingPointError,))


if __name__ == "__main__":
    sys.exit(main())
