"""Backbones side by side at equal wall-clock: the GPT decoder (clm), an encoder of the same shape (mlm),
an LSTM and a GRU (clm), each pretrained for the same seconds on the project's train shards, then
fine-tuned with the same `finetune` params. Reports validation bits per byte (causal models) or
masked-token accuracy (the encoder), and the classifier's validation and test macro-F1.

Each model's step time is measured first (a short run), then it trains for as many steps as fit in
`--seconds` (its cosine decay ending at its last step). Writes `metrics/backbones.json`, which the
evaluate stage shows in the report.

    python benchmarks/backbones.py [--seconds 180] [--finetune-epochs 2] [--finetune-examples N]
                                   [--only gpt encoder]
    # after `make run` (reads data/tokens); one heavy process at a time
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.pretrain import StepTimes  # noqa: E402
from pipeline.classify import read_labels  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.files import write_json  # noqa: E402
from pipeline.stages import finetune, pretrain  # noqa: E402
from pipeline.stages.evaluate import classifier_metrics  # noqa: E402

BACKBONES = {"gpt": ("gpt", "clm"), "encoder": ("gpt", "mlm"), "lstm": ("lstm", "clm"), "gru": ("gru", "clm")}


def config_for(name: str, steps: int, epochs: int, examples: int | None) -> Config:
    arch, objective = BACKBONES[name]
    base = load_config()
    model = {**base.pretrain.model.model_dump(), "arch": arch}
    return load_config(overrides={
        "tracking.enabled": False, "pretrain.objective": objective, "pretrain.model": model,
        "pretrain.max_steps": steps, "pretrain.eval_every": max(1, steps // 4), "pretrain.resume": "never",
        "pretrain.checkpoint_every": steps, "pretrain.init_embeddings": "inputs/none",
        "pretrain.warmup_steps": min(base.pretrain.warmup_steps, max(1, steps // 10)),
        "finetune.epochs": epochs, "finetune.resume": "never", "finetune.max_examples": examples,
    })


def train(cfg: Config, work: Path) -> tuple[dict[str, Any], list[float]]:
    times = StepTimes()
    tokens = ROOT / cfg.paths.tokens
    metrics = pretrain.run(cfg, tokens, ROOT / cfg.paths.tokenizer, work / "lm", work / "ckpt", work / "m",
                           times)
    tokens_per_step = cfg.pretrain.batch_size * cfg.pretrain.grad_accum * cfg.pretrain.model.context
    return metrics, [tokens_per_step / t for t in times.tokens_per_s]


def measure(name: str, seconds: float, epochs: int, examples: int | None, work: Path) -> dict[str, Any]:
    _, step_times = train(config_for(name, 8, epochs, examples), work / "calibrate")
    steps = max(2, int(seconds / statistics.median(step_times[1:])))
    cfg = config_for(name, steps, epochs, examples)
    metrics, step_times = train(cfg, work / "run")
    tokens = ROOT / cfg.paths.tokens
    tuned = finetune.run(cfg, work / "run" / "lm", tokens, work / "classifier", work / "ft", work / "m")
    mapping = read_labels(tokens / "labeled" / "labels.json")
    labels = [label for label, _ in sorted(mapping.items(), key=lambda item: item[1])]
    test, _ = classifier_metrics(work / "classifier", tokens, labels)
    quality = {k: metrics[k] for k in ("val_bits_per_byte", "val_mlm_accuracy") if k in metrics}
    return {"arch": BACKBONES[name][0], "objective": BACKBONES[name][1], "steps": steps,
            "pretrain_seconds": round(sum(step_times), 1), "parameters": metrics["parameters"], **quality,
            "val_macro_f1": tuned["val_macro_f1"], "test_macro_f1": test["macro_f1"],
            "finetune_examples_per_s": tuned["examples_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="pretraining wall-clock per backbone")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: finetune.epochs")
    parser.add_argument("--finetune-examples", type=int, default=None,
                        help="fine-tune on this many train examples (default: finetune.max_examples)")
    parser.add_argument("--only", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "backbones.json")
    args = parser.parse_args()
    epochs = args.finetune_epochs or load_config().finetune.epochs
    examples = args.finetune_examples or load_config().finetune.max_examples
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            rows[name] = measure(name, args.seconds, epochs, examples, Path(tmp) / name)
            print(json.dumps({name: rows[name]}), flush=True)
    write_json(args.out, {"seconds": args.seconds, "finetune_epochs": epochs, "finetune_examples": examples,
                          "backbones": rows})
    print(f"{'backbone':9} {'steps':>6} {'val bpb':>8} {'mlm acc':>8} {'val F1':>7} {'test F1':>7}")
    for name, row in rows.items():
        print(f"{name:9} {row['steps']:6d} {row.get('val_bits_per_byte', '-'):>8} "
              f"{row.get('val_mlm_accuracy', '-'):>8} {row['val_macro_f1']:7.4f} {row['test_macro_f1']:7.4f}")


if __name__ == "__main__":
    main()
