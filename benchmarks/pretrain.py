"""Pretraining throughput side by side with nanoGPT's unmodified train.py, on the same tokens.

Both loops train the same GPT (no biases, exact GELU, tied head, learned positions, SDPA causal),
the same batch and context, AdamW and clipping at 1.0: fp32 on the CPU; on a GPU (used whenever one
is visible) bf16 autocast, TF32 and fused AdamW for both, and `--compile` compiles both models.
nanoGPT reads our train split written as its `train.bin`; its per-iteration times are parsed from
its log (iteration 0, which includes its evaluation, is dropped), ours come from the stage's
per-step log. The two never run at the same time: they alternate, and medians are compared. MFU for
both uses the same FLOP formula (6N + 12·L·d·T per token) against the same peak: a measured fp32
matmul on the CPU, the datasheet's dense bf16 figure on a GPU.

    python benchmarks/pretrain.py --nanogpt /path/to/nanoGPT [--iters 12] [--rounds 2] [--compile]

`--quality SECONDS`: time to quality instead. Each loop's step time is measured first (a short run
of each), then each trains for as many steps as fit in SECONDS with the same hyperparameters (its
cosine decay ending at its own last step), one after the other; both final models are scored on the
whole validation split, in the same windows, by their own model code, in bits per byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.models import GPT, GPTConfig  # noqa: E402
from pipeline.shards import TokenShards, read_manifest  # noqa: E402
from pipeline.stages import pretrain  # noqa: E402

ITER_LINE = re.compile(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # what our stage picks too


def nanogpt_device_args(compiled: bool) -> list[str]:
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    return [f"--device={DEVICE}", f"--dtype={dtype}", f"--compile={compiled}"]


class StepTimes:
    """Collects the per-step tokens/s the stage logs (it quacks like a tracking run)."""

    def __init__(self) -> None:
        self.tokens_per_s: list[float] = []

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if "tokens_per_s" in metrics:
            self.tokens_per_s.append(metrics["tokens_per_s"])


def ours(size: dict[str, int], iters: int, work: Path, compiled: bool) -> list[float]:
    cfg = load_config(overrides={
        "tracking.enabled": False, "pretrain.compile": compiled, "pretrain.objective": "clm",
        "pretrain.init_embeddings": "inputs/none", "pretrain.max_steps": iters, "pretrain.eval_every": iters,
        "pretrain.checkpoint_every": iters, "pretrain.eval_windows": 1, "pretrain.resume": "never",
        "pretrain.batch_size": size["batch"], "pretrain.warmup_steps": 1,
        "pretrain.model": {"arch": "gpt", "context": size["context"], "n_layer": size["n_layer"],
                           "n_head": size["n_head"], "n_embd": size["n_embd"], "bias": False, "dropout": 0.0},
    })
    times = StepTimes()
    paths = cfg.paths
    pretrain.run(cfg, ROOT / paths.tokens, ROOT / paths.tokenizer, work / "lm", work / "ckpt", work / "m",
                 times)
    return [size["batch"] * size["context"] / t for t in times.tokens_per_s][1:]  # seconds per step


def nanogpt(source: Path, size: dict[str, int], iters: int, work: Path, compiled: bool) -> list[float]:
    args = ["--dataset=bench", *nanogpt_device_args(compiled), "--bias=False",
            f"--n_layer={size['n_layer']}", f"--n_head={size['n_head']}", f"--n_embd={size['n_embd']}",
            f"--block_size={size['context']}", f"--batch_size={size['batch']}",
            "--gradient_accumulation_steps=1", f"--max_iters={iters}", "--eval_interval=100000",
            "--eval_iters=1", "--log_interval=1", "--dropout=0.0", "--always_save_checkpoint=False",
            f"--out_dir={work / 'out'}", "--warmup_iters=1"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=source, capture_output=True, text=True,
                            check=True)
    times = [float(ms) / 1000 for i, ms in ITER_LINE.findall(result.stdout) if int(i) >= 2]
    assert times, result.stdout[-2000:]
    return times


QUALITY = {"learning_rate": 3e-3, "min_learning_rate": 3e-4, "warmup_steps": 50, "weight_decay": 0.1,
           "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0}


def ours_for_steps(size: dict[str, int], steps: int, work: Path, compiled: bool) -> dict[str, Any]:
    """Our stage trained for `steps`: its metrics (val bits per byte over the whole split) and seconds."""
    cfg = load_config(overrides={
        "tracking.enabled": False, "pretrain.compile": compiled, "pretrain.max_steps": steps,
        "pretrain.eval_every": steps,
        "pretrain.checkpoint_every": steps, "pretrain.eval_windows": 1, "pretrain.resume": "never",
        "pretrain.batch_size": size["batch"], "pretrain.objective": "clm",
        "pretrain.init_embeddings": "inputs/none",
        **{f"pretrain.{k}": v for k, v in QUALITY.items()},
        "pretrain.model": {"arch": "gpt", "context": size["context"], "n_layer": size["n_layer"],
                           "n_head": size["n_head"], "n_embd": size["n_embd"], "bias": False, "dropout": 0.0},
    })
    times = StepTimes()
    paths = cfg.paths
    metrics = pretrain.run(cfg, ROOT / paths.tokens, ROOT / paths.tokenizer, work / "lm", work / "ckpt",
                           work / "m", times)
    seconds = sum(size["batch"] * size["context"] / t for t in times.tokens_per_s)
    return {"steps": steps, "seconds": round(seconds, 1), "val_bits_per_byte": metrics["val_bits_per_byte"]}


def nanogpt_for_steps(source: Path, size: dict[str, int], steps: int, work: Path,
                      compiled: bool) -> dict[str, Any]:
    """nanoGPT's train.py for `steps` with the same hyperparameters; its checkpoint scored by its own
    model code on our validation windows."""
    q = QUALITY
    args = ["--dataset=bench", *nanogpt_device_args(compiled), "--bias=False",
            f"--n_layer={size['n_layer']}", f"--n_head={size['n_head']}", f"--n_embd={size['n_embd']}",
            f"--block_size={size['context']}", f"--batch_size={size['batch']}",
            "--gradient_accumulation_steps=1", f"--max_iters={steps}", f"--lr_decay_iters={steps}",
            f"--eval_interval={steps}", "--eval_iters=1", "--log_interval=1", "--dropout=0.0",
            "--always_save_checkpoint=True", f"--out_dir={work / 'out'}",
            f"--learning_rate={q['learning_rate']}", f"--min_lr={q['min_learning_rate']}",
            f"--warmup_iters={q['warmup_steps']}", f"--weight_decay={q['weight_decay']}",
            f"--beta1={q['beta1']}", f"--beta2={q['beta2']}", f"--grad_clip={q['grad_clip']}"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=source, capture_output=True, text=True,
                            check=True)
    # iteration 0 and the last iteration hold its two evaluations: leave them out, as for ours
    times = [float(ms) / 1000 for i, ms in ITER_LINE.findall(result.stdout) if 1 <= int(i) < steps]
    return {"steps": steps, "seconds": round(sum(times) * steps / max(len(times), 1), 1),
            "val_bits_per_byte": nanogpt_val_bits_per_byte(source, work / "out" / "ckpt.pt", size)}


def nanogpt_val_bits_per_byte(source: Path, checkpoint: Path, size: dict[str, int]) -> float:
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", source / "model.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    saved = torch.load(checkpoint, map_location=DEVICE, weights_only=True)
    model = module.GPT(module.GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.to(DEVICE).eval()
    tokens = ROOT / load_config().paths.tokens
    val = TokenShards(tokens, "val")
    total, count = 0.0, 0
    with torch.no_grad():
        for windows in val.sequential_windows(size["context"], size["batch"]):
            batch = torch.from_numpy(windows).to(DEVICE)
            with torch.autocast("cuda", torch.bfloat16, enabled=DEVICE == "cuda"):  # as our stage scores
                _, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())  # it calls .view
            total, count = total + loss.item() * batch[:, 1:].numel(), count + batch[:, 1:].numel()
    totals = read_manifest(tokens)["totals"]["val"]
    return round(total / count / np.log(2) * totals["tokens"] / totals["text_bytes"], 4)


def quality(source: Path, size: dict[str, int], seconds: float, work: Path, compiled: bool) -> dict[str, Any]:
    """Equal wall-clock: calibrate each loop's step time, then train each for `seconds`."""
    step_time = {"ours": statistics.median(ours(size, 12, work / "cal_ours", compiled)),
                 "nanogpt": statistics.median(nanogpt(source, size, 12, work / "cal_nano", compiled))}
    steps = {name: max(QUALITY["warmup_steps"] + 1, int(seconds / t)) for name, t in step_time.items()}
    result = {"ours": ours_for_steps(size, steps["ours"], work / "q_ours", compiled),
              "nanogpt": nanogpt_for_steps(source, size, steps["nanogpt"], work / "q_nano", compiled)}
    for name, row in result.items():
        print(f"{name:8} {row['steps']:6d} steps in {row['seconds']:7.1f} s -> "
              f"val {row['val_bits_per_byte']} bits/byte")
    ours_bpb, nano_bpb = result["ours"]["val_bits_per_byte"], result["nanogpt"]["val_bits_per_byte"]
    print(f"val bits/byte at {seconds:.0f} s: ours {ours_bpb}, nanoGPT {nano_bpb} (goal: ours <= nanoGPT)")
    return {"seconds_budget": seconds, "hyperparameters": QUALITY, **result}


def prepare_nanogpt(path: Path, work: Path, vocab: int) -> Path:
    """A scratch copy of nanoGPT with our train/val tokens as its dataset (its code untouched)."""
    copy = work / "nanogpt"
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns(".git", "data"))
    data = copy / "data" / "bench"
    data.mkdir(parents=True)
    for split in ("train", "val"):
        shards = TokenShards(ROOT / load_config().paths.tokens, split)
        shards.slice(0, len(shards)).astype(np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": vocab}))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True,
                        help="a local nanoGPT checkout (never committed)")
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--quality", type=float, metavar="SECONDS",
                        help="time to quality: train each for SECONDS of wall-clock, compare val bits/byte")
    args = parser.parse_args()
    size = {"n_layer": args.n_layer, "n_head": args.n_layer, "n_embd": args.n_embd, "context": args.context,
            "batch": args.batch}
    vocab = read_manifest(ROOT / load_config().paths.tokens)["vocab_size"]
    model = GPT(GPTConfig(vocab_size=vocab, context=size["context"], n_layer=size["n_layer"],
                          n_head=size["n_head"], n_embd=size["n_embd"]))
    flops_per_step = model.flops_per_token() * size["batch"] * size["context"]
    peak = pretrain.peak_flops(torch.device(DEVICE))
    times: dict[str, list[float]] = {"ours": [], "nanogpt": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = prepare_nanogpt(args.nanogpt, work, vocab)
        if args.quality:
            print(json.dumps({"size": size, "vocab": vocab, "device": DEVICE, "compiled": args.compile,
                              **quality(source, size, args.quality, work, args.compile)}))
            return
        for r in range(args.rounds):
            times["ours"] += ours(size, args.iters, work / f"ours{r}", args.compile)
            times["nanogpt"] += nanogpt(source, size, args.iters, work / f"nano{r}", args.compile)
    result: dict[str, Any] = {"size": size, "vocab": vocab, "flops_per_token": model.flops_per_token(),
                              "device": DEVICE, "compiled": args.compile, "peak_gflops": round(peak / 1e9, 1)}
    for name, series in times.items():
        median = statistics.median(series)
        result[name] = {"ms_per_iter": round(median * 1000, 1),
                        "tokens_per_s": round(size["batch"] * size["context"] / median, 1),
                        "mfu": round(flops_per_step / median / peak, 3), "iters_timed": len(series)}
        print(f"{name:8} {median * 1000:9.1f} ms/iter {result[name]['tokens_per_s']:9.1f} tokens/s "
              f"MFU {result[name]['mfu']:.1%}")
    ratio = result["ours"]["tokens_per_s"] / result["nanogpt"]["tokens_per_s"]
    result["ratio_ours_over_nanogpt"] = round(ratio, 3)
    print(f"tokens/s ours / nanoGPT: {result['ratio_ours_over_nanogpt']} (goal >= 1.0)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
