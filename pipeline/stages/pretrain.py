"""Pretrain stage: a language model on random windows of the train shards. `objective: clm` trains
a GPT decoder (or an LSTM/GRU) on the next token; `objective: mlm` a BERT-style encoder of the same
shape on masked tokens (dynamic masking, `mask_rate` of the non-special tokens, 80/10/10
mask/random/keep, the masks a function of seed, rank and step), validated by masked-token loss and
accuracy on fixed masks.

AdamW (weight decay on matrices only: not on biases, norm gains or the token/position embeddings,
which the output head shares), linear warmup then cosine decay, gradient clipping and accumulation,
early stopping on validation loss. fp32 on CPU, bf16 autocast and TF32 on CUDA. Launched with
`torchrun --nproc_per_node=N` it trains data-parallel (NCCL on GPUs, gloo on CPU), with DDP or, with
`parallel: fsdp`, FSDP2 (parameters, gradients and optimizer state sharded over the ranks); rank r
reads slice r of the step's global batch (so any world size reads the same data) and only rank 0
writes, a sharded model's state gathered first.

Resumable exactly: every `checkpoint_every` steps the weights (safetensors) and a training state
(optimizer, step, RNG, early-stopping state; the sampler's position is the step) are written
atomically to `paths.checkpoints`; `resume: auto` continues from there when the run's fingerprint
(params and tokenizer) matches, so a killed run finishes with the same weights as an unbroken one.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.checkpoint import Fingerprint, fingerprint_of, load_model, restore, save_model, write_checkpoint
from pipeline.config import Config, Pretrain, project_root
from pipeline.distributed import gather, gather_model, join, mean_over_ranks, scatterer, shard
from pipeline.files import InputError, atomic_dir, file_digest, write_csv, write_json
from pipeline.hf import is_transformers_dir
from pipeline.models import GPT, build_model
from pipeline.models import model_config as config_of
from pipeline.ngram import unigram_bits_per_token
from pipeline.progress import Progress
from pipeline.shards import TokenShards, WindowPosition, read_manifest
from pipeline.sourcecode import code_digest
from pipeline.stagecli import stage_main
from pipeline.tracking import path_md5
from pipeline.training import (
    batch_loss,
    decay_groups,
    mask_tokens,
    masked_eval,
    masked_loss,
    masking_generator,
    mean_loss,
    warmup_cosine,
)

# Dense bf16 peak FLOP/s by device name (vendor datasheets); a CPU's peak is measured instead.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last good checkpoint stays."""


def lr_at(step: int, cfg: Pretrain) -> float:
    return warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.learning_rate, cfg.min_learning_rate)


def optimizer_for(model: nn.Module, cfg: Pretrain) -> torch.optim.AdamW:
    """Decay matrices only; embeddings (and the head tied to them), biases and norms are exempt."""
    groups = decay_groups(model.named_parameters(), cfg.weight_decay, ("wte.", "wpe."))
    fused = next(model.parameters()).is_cuda  # one kernel for every parameter on a GPU
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def model_config(cfg: Pretrain, vocab_size: int) -> dict[str, Any]:
    m = cfg.model
    shape = {"arch": m.arch, "vocab_size": vocab_size, "context": m.context, "n_layer": m.n_layer,
             "n_embd": m.n_embd, "dropout": m.dropout}
    if m.arch == "gpt":
        shape.update(n_head=m.n_head, bias=m.bias, positions=m.positions, causal=cfg.objective == "clm")
    return shape


def glove_embedding(glove_dir: Path, initial: torch.Tensor) -> torch.Tensor:
    """The embedding table with each GloVe-covered token's row replaced by its vector, mapped to the
    model width: centred, then its top principal directions when GloVe is wider, or the first columns
    (the rest keep their random init) when narrower; scaled to the table's initial standard deviation.
    Tokens GloVe never saw (rare tokens, specials) keep their random rows."""
    from safetensors.torch import load_file

    path = glove_dir / "vectors.safetensors"
    if not path.exists():
        raise InputError(f"{path}: token vectors not found (pretrain.init_embeddings: run glove_token)")
    saved = load_file(path)
    if "token_ids" not in saved:
        raise InputError(f"{path}: word vectors; pretrain.init_embeddings needs token vectors "
                         "(the glove_token stage)")
    ids, vectors = saved["token_ids"].long(), saved["vectors"].double()
    if int(ids.max()) >= len(initial):
        raise InputError(f"{path}: token ids past the model vocabulary ({len(initial)}): another tokenizer?")
    vectors = vectors - vectors.mean(0)
    width = initial.shape[1]
    if vectors.shape[1] > width:
        _, _, directions = torch.linalg.svd(vectors, full_matrices=False)
        vectors = vectors @ directions[:width].T
    vectors = vectors * (initial.std().item() / vectors.std().item())
    table = initial.clone()
    table[ids, : vectors.shape[1]] = vectors.to(table.dtype)
    return table


def fingerprint(cfg: Pretrain, data_digest: str) -> Fingerprint:
    """What a checkpoint must match to be resumed: the params (bar resume itself), the data and the code."""
    return fingerprint_of(params=cfg.model_dump(exclude={"resume"}), data=data_digest,
                          code=code_digest("pipeline.stages.pretrain"))


def peak_flops(device: torch.device) -> float:
    """The device's peak: a datasheet figure for known GPUs, a measured fp32 matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)
    # best of several timed trials after a warm-up: a single cold timing reads far too low
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(4):
        a @ b
    best = float("inf")
    for _ in range(12):
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, time.perf_counter() - started)
    return 4 * 2 * 1024**3 / best


def starting_weights(init_dir: Path, model: nn.Module, tokenizer_dir: Path) -> dict[str, torch.Tensor] | None:
    """The weights in `init_dir` for `model` (ours, or a transformers GPT-2's mapped onto it), or
    None when it holds no model (the default directory holds only a README)."""
    if not (init_dir / "config.json").exists():
        return None
    if is_transformers_dir(init_dir):
        from tokenizers import Tokenizer

        from pipeline.hf import gpt_weights_from_gpt2

        if not isinstance(model, GPT):
            raise InputError(f"{init_dir}: a transformers model initialises a GPT only (pretrain.model.arch)")
        vocabulary = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab()
        return gpt_weights_from_gpt2(init_dir, model, vocabulary)
    saved, _ = load_model(init_dir)
    shape = {k: v for k, v in config_of(saved).items() if k != "dropout"}
    if shape != {k: v for k, v in config_of(model).items() if k != "dropout"}:
        raise InputError(f"{init_dir}: its model {shape} is not pretrain.model's shape")
    return saved.state_dict()


def fresh_progress() -> dict[str, Any]:
    # timing is cumulative over every process that trained this run, so a resumed run reports it all
    return {"step": 0, "best_val": float("inf"), "best_saved": False, "bad_evals": 0, "train_curve": [],
            "val_curve": [], "seconds_training": 0.0, "seconds_waiting": 0.0, "peak_flops": 0.0}


def write_curves(plots: Path, progress: dict[str, Any]) -> None:
    for name in ("train", "val"):
        write_csv(plots / f"pretrain_{name}.csv", ["step", "loss"], progress[f"{name}_curve"])


def special_ids(manifest: dict[str, Any], tokens_dir: Path) -> torch.Tensor:
    """The ids masking never chooses (end-of-text, padding, the mask itself)."""
    if manifest.get("mask_id") is None:
        raise InputError(f"{tokens_dir}: the tokenizer has no mask token; pretrain.objective mlm needs "
                         "tokenize.mask_token in it (retrain the tokenizer or add the token)")
    return torch.tensor([manifest["eot_id"], manifest["pad_id"], manifest["mask_id"]])


def validation_loss(model: nn.Module, windows: np.ndarray, cfg: Pretrain, device: torch.device,
                    manifest: dict[str, Any], specials: torch.Tensor) -> tuple[float, float]:
    """(loss, masked-token accuracy) for mlm on masks fixed by the seed; (next-token loss, nan) for clm."""
    if cfg.objective == "mlm":
        return masked_eval(model, windows, cfg.batch_size, device, manifest["mask_id"], specials,
                           cfg.mask_rate, cfg.seed)
    return mean_loss(model, windows, cfg.batch_size, device), math.nan


def final_validation(model: nn.Module, windows: np.ndarray, cfg: Pretrain, device: torch.device,
                     manifest: dict[str, Any], specials: torch.Tensor, train: TokenShards,
                     val: TokenShards) -> dict[str, Any]:
    """The best model on the whole val split: masked-token loss and accuracy for mlm (never bits per
    byte: it does not predict text left to right), else loss, perplexity and bits per byte beside a
    unigram model of the train split."""
    loss, accuracy = validation_loss(model, windows, cfg, device, manifest, specials)
    if cfg.objective == "mlm":
        return {"val_mlm_loss": round(loss, 4), "val_mlm_accuracy": round(accuracy, 4)}
    bytes_per_token = manifest["totals"]["val"]["text_bytes"] / manifest["totals"]["val"]["tokens"]
    unigram_bits = unigram_bits_per_token(train, val, manifest["vocab_size"])
    return {"val_loss": round(loss, 4), "val_perplexity": round(math.exp(loss), 2),
            "val_bits_per_byte": round(loss / math.log(2) / bytes_per_token, 4),
            "unigram_val_bits_per_byte": round(unigram_bits / bytes_per_token, 4)}


def run(cfg: Config, tokens_dir: Path, tokenizer_dir: Path, lm_dir: Path, checkpoints: Path,
        metrics_dir: Path, tracked: Any = None, glove_dir: Path | None = None,
        init_dir: Path | None = None) -> dict[str, Any]:
    """Train until max_steps or early stopping; rank 0 writes the best model (by validation loss,
    kept in `checkpoints/best` as training goes) to `lm_dir` at the end."""
    p = cfg.pretrain
    rank, world, device = join()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    manifest = read_manifest(tokens_dir)
    if not (tokenizer_dir / "tokenizer.json").exists():  # copied beside the model at the end
        raise InputError(f"{tokenizer_dir / 'tokenizer.json'}: tokenizer not found (run the tokenize stage)")
    train, val = TokenShards(tokens_dir, "train"), TokenShards(tokens_dir, "val")
    masked = p.objective == "mlm"
    specials = special_ids(manifest, tokens_dir) if masked else torch.empty(0, dtype=torch.long)
    torch.manual_seed(p.seed)
    model = build_model(model_config(p, manifest["vocab_size"])).to(device)
    data_digest = manifest["tokenizer_sha256"]
    if cfg.paths.given(p.init_embeddings):
        glove_dir = glove_dir or project_root() / cfg.paths.glove_token
        with torch.no_grad():
            model.wte.weight.copy_(glove_embedding(glove_dir, model.wte.weight.detach().cpu()))
        data_digest += file_digest(glove_dir / "vectors.safetensors")  # other vectors: no resume
    init_dir = init_dir or project_root() / p.init_from
    start = starting_weights(init_dir, model, tokenizer_dir)
    if start is not None:  # every weight, the embedding included, from that model
        missing, unexpected = model.load_state_dict(start, strict=False)
        if unexpected or [k for k in missing if k != "head.weight"]:
            raise InputError(f"{init_dir}: weights do not fit pretrain.model ({missing or unexpected})")
        data_digest += path_md5(init_dir)
    fsdp = p.parallel == "fsdp"  # its checkpoints hold the gathered state, at any world size
    if fsdp and not isinstance(model, GPT):
        raise InputError("pretrain.parallel fsdp shards a transformer's blocks; an LSTM/GRU trains with ddp")
    if fsdp and world > 1:
        shard(model, model.blocks, world, device)
    optimizer = optimizer_for(model, p)
    run_fingerprint = fingerprint(p, data_digest)
    resuming = p.resume == "auto"
    load = scatterer(model, optimizer) if fsdp else None
    progress = restore(checkpoints, run_fingerprint, model, optimizer, fresh_progress(), "pretrain", load) \
        if resuming else fresh_progress()
    trained: nn.Module = DistributedDataParallel(model) if world > 1 and not fsdp else model
    step_loss = batch_loss
    if p.compile and world == 1:  # the model and its loss in one graph: no fp32 logits written out
        step_loss = torch.compile(batch_loss)
    elif p.compile:  # a wrapped model compiles as a module (DDP splits the graph at its buckets)
        trained = torch.compile(trained)  # type: ignore[assignment]
    val_windows = next(val.sequential_windows(p.model.context, p.eval_windows))  # fixed for the run
    stream = train.random_windows(p.model.context, p.batch_size,
                                  WindowPosition(p.seed, rank, progress["step"] * p.grad_accum, world))
    tokens_per_step = p.batch_size * p.grad_accum * p.model.context * world
    flops_per_step = model.flops_per_token() * tokens_per_step  # type: ignore[operator]
    if masked:  # the head runs on the masked positions only
        flops_per_step -= 6 * model.wte.weight.numel() * (1 - p.mask_rate) * tokens_per_step
    if not progress["peak_flops"]:  # measured once per run: a resumed run reports the same MFU
        progress["peak_flops"] = peak_flops(device) * world
    peak = progress["peak_flops"]
    stopped_early = False
    bar = Progress("pretrain", p.max_steps, "step", progress["step"], ("tokens", tokens_per_step),
                   enabled=rank == 0)
    while progress["step"] < p.max_steps and not stopped_early:
        step_started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress["step"], p)
        loss_sum = 0.0
        for micro in range(p.grad_accum):
            fetch_started = time.perf_counter()
            batch = torch.from_numpy(next(stream)).to(device, non_blocking=True)
            progress["seconds_waiting"] += time.perf_counter() - fetch_started
            last = micro == p.grad_accum - 1
            if fsdp and world > 1:
                model.set_requires_gradient_sync(last)  # type: ignore[operator]
            with contextlib.nullcontext() if world == 1 or fsdp or last else trained.no_sync():
                if masked:
                    generator = masking_generator(p.seed, rank, progress["step"], micro)
                    inputs, targets = mask_tokens(batch[:, :-1].cpu(), manifest["mask_id"], specials,
                                                  manifest["vocab_size"], p.mask_rate, generator)
                    loss = masked_loss(trained, inputs.to(device), targets.to(device), device)[0]
                else:
                    loss = step_loss(trained, batch, device)
                loss = loss / p.grad_accum
                loss.backward()
            loss_sum += loss.item()
        loss_sum = mean_over_ranks(loss_sum, world, device)
        if not math.isfinite(loss_sum):
            raise TrainingError(f"loss is {loss_sum} at step {progress['step'] + 1}; "
                                f"the last good checkpoint is kept in {checkpoints}")
        if p.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress["step"] += 1
        step = progress["step"]
        seconds = time.perf_counter() - step_started
        progress["seconds_training"] += seconds
        progress["train_curve"].append((step, loss_sum))
        bar.update(1, loss=loss_sum)
        if tracked is not None and rank == 0:
            tracked.log_metrics({"train_loss": loss_sum, "lr": lr_at(step - 1, p),
                                 "tokens_per_s": tokens_per_step / seconds}, step=step)
        if step % p.eval_every == 0 or step == p.max_steps:
            val_loss = validation_loss(model, val_windows, p, device, manifest, specials)[0]
            progress["val_curve"].append((step, val_loss))
            bar.update(0, val_loss=val_loss)
            if tracked is not None and rank == 0:
                tracked.log_metrics({"val_loss": val_loss}, step=step)
            if val_loss < progress["best_val"]:
                progress["best_val"], progress["bad_evals"], progress["best_saved"] = val_loss, 0, True
                weights = gather_model(model, world) if fsdp else None  # every rank takes part
                if rank == 0:
                    extra = {"step": step, "val_loss": val_loss, "eot_id": manifest["eot_id"]}
                    save_model(checkpoints / "best", model, extra, weights)
            else:
                progress["bad_evals"] += 1
                stopped_early = progress["bad_evals"] >= p.patience
        if step % p.checkpoint_every == 0 or step == p.max_steps or stopped_early:
            full = gather(model, optimizer, world) if fsdp else None
            if rank == 0:
                write_checkpoint(checkpoints, model, optimizer, progress, run_fingerprint, full)
    bar.close()
    metrics: dict[str, Any] = {}
    if rank == 0:
        with atomic_dir(lm_dir) as tmp:  # DVC clears lm_dir before a rerun; the best model persists
            shutil.copytree(checkpoints / "best", tmp, dirs_exist_ok=True)
            shutil.copy(tokenizer_dir / "tokenizer.json", tmp / "tokenizer.json")
        best, _ = load_model(lm_dir)
        full_val = np.concatenate(list(val.sequential_windows(p.model.context, p.batch_size)))
        steps_run, elapsed = len(progress["train_curve"]), progress["seconds_training"]
        metrics = {
            "objective": p.objective, "steps": progress["step"], "stopped_early": stopped_early,
            **final_validation(best.to(device), full_val, p, device, manifest, specials, train, val),
            "parameters": sum(t.numel() for t in model.parameters()),
            "tokens_per_s": round(tokens_per_step * steps_run / elapsed, 1) if elapsed else 0.0,
            "mfu": round(flops_per_step * steps_run / elapsed / peak, 4) if elapsed and peak else 0.0,
            "data_wait_share": round(progress["seconds_waiting"] / elapsed, 4) if elapsed else 0.0,
            "world_size": world, "parallel": p.parallel if world > 1 else "none", "device": device.type,
        }
        write_json(metrics_dir / "pretrain.json", metrics)
        write_curves(metrics_dir / "plots", progress)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def execute(cfg: Config) -> str:
    """The stage as DVC (or torchrun) runs it: paths from params, one MLflow run on rank 0."""
    from pipeline import tracking

    paths = {name: project_root() / getattr(cfg.paths, name)
             for name in ("tokens", "tokenizer", "glove_token", "lm", "checkpoints", "metrics")}
    init_dir = project_root() / cfg.pretrain.init_from
    leader = int(os.environ.get("RANK", 0)) == 0
    inputs = {"tokens": paths["tokens"]}
    if cfg.paths.given(cfg.pretrain.init_embeddings):
        inputs["glove"] = paths["glove_token"]
    if (init_dir / "config.json").exists():
        inputs["init"] = init_dir
    tracking_cfg = cfg.tracking if leader else cfg.tracking.model_copy(update={"enabled": False})
    with tracking.stage_run("pretrain", tracking_cfg, cfg.pretrain.model_dump(),
                            inputs, {"lm": paths["lm"]}) as run_log:
        metrics = run(cfg, paths["tokens"], paths["tokenizer"], paths["lm"], paths["checkpoints"],
                      paths["metrics"], run_log, paths["glove_token"], init_dir)
        if leader:
            run_log.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
            tracking.register_model(run_log, paths["lm"], cfg.tracking.lm_model, "lm")
    if not metrics:
        return ""
    masked = metrics["objective"] == "mlm"
    quality = (f"val masked-token accuracy {metrics['val_mlm_accuracy']}" if masked else
               f"val bits/byte {metrics['val_bits_per_byte']} "
               f"(unigram {metrics['unigram_val_bits_per_byte']})")
    return (f"pretrain ({metrics['objective']}): {metrics['steps']} steps, {quality}, "
            f"{metrics['tokens_per_s']} tokens/s, "
            f"MFU {metrics['mfu']:.1%} -> {paths['lm']}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain", __doc__, execute, argv, errors=(TrainingError,))


if __name__ == "__main__":
    sys.exit(main())
