"""The training stages on the device torch sees (a GPU whenever one is visible: bf16 autocast, TF32,
fused AdamW), on the project's own shards (run `make run` or the tokenize stages first):

- pretrain, causal and masked objectives: tokens/s, MFU, bits/byte (clm), masked accuracy (mlm);
- exact resume there: a run stopped after a checkpoint and resumed, against the same run unbroken
  (on a GPU some kernels are not deterministic, so the weights' largest difference is printed too);
- finetune from the causal model, unbroken and resumed alike.

    python benchmarks/device.py [--steps 200] [--out DIR]

Prints one JSON object; with --out, the stages' outputs stay there.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.stages import finetune, pretrain  # noqa: E402


class Stopped(Exception):
    pass


class StopAt:
    """A tracker that stops a training run when a given step logs its loss."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if step == self.step and "train_loss" in metrics:
            raise Stopped


def weights_difference(a: Path, b: Path) -> dict[str, Any]:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    largest = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
    same = (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    return {"bit_identical": same, "max_abs_difference": largest}


def pretrain_twice(cfg: Config, work: Path, steps: int) -> dict[str, Any]:
    """Unbroken, then stopped just after the midway checkpoint and resumed; both to `steps`."""
    tokens, tokenizer = ROOT / cfg.paths.tokens, ROOT / cfg.paths.tokenizer
    started = time.perf_counter()
    metrics = pretrain.run(cfg, tokens, tokenizer, work / "lm", work / "ckpt", work / "metrics")
    seconds = time.perf_counter() - started
    with contextlib.suppress(Stopped):
        stop = StopAt(steps // 2 + 1)
        pretrain.run(cfg, tokens, tokenizer, work / "lm2", work / "ckpt2", work / "m2", stop)
    pretrain.run(cfg, tokens, tokenizer, work / "lm2", work / "ckpt2", work / "m2")
    return {**metrics, "seconds": round(seconds, 1), "resume": weights_difference(work / "lm", work / "lm2")}


def finetune_twice(cfg: Config, work: Path, stop: int) -> dict[str, Any]:
    tokens, lm = ROOT / cfg.paths.tokens, work / "lm"
    metrics = finetune.run(cfg, lm, tokens, work / "classifier", work / "fckpt", work / "metrics")
    with contextlib.suppress(Stopped):
        finetune.run(cfg, lm, tokens, work / "classifier2", work / "fckpt2", work / "m2", StopAt(stop))
    finetune.run(cfg, lm, tokens, work / "classifier2", work / "fckpt2", work / "m2")
    return {**metrics, "resume": weights_difference(work / "classifier", work / "classifier2")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps per run")
    parser.add_argument("--finetune-stop", type=int, default=150, help="the step finetune is stopped at")
    parser.add_argument("--out", type=Path, help="keep the outputs here (default: a temporary folder)")
    args = parser.parse_args()
    common = {"tracking.enabled": False, "pretrain.max_steps": args.steps, "pretrain.resume": "auto",
              "pretrain.checkpoint_every": args.steps // 2, "pretrain.eval_every": args.steps // 2,
              "pretrain.init_embeddings": "inputs/none", "pretrain.patience": 1000}
    tuning = {"tracking.enabled": False, "finetune.epochs": 1, "finetune.resume": "auto",
              "finetune.eval_every": 100, "finetune.checkpoint_every": 100}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {"torch": torch.__version__, "device": device}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        for objective in ("mlm", "clm"):  # clm last: finetune starts from it
            cfg = load_config(overrides={**common, "pretrain.objective": objective})
            result[f"pretrain_{objective}"] = pretrain_twice(cfg, work / objective, args.steps)
            print(json.dumps({objective: result[f"pretrain_{objective}"]}), flush=True)
        result["finetune"] = finetune_twice(load_config(overrides=tuning), work / "clm", args.finetune_stop)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
