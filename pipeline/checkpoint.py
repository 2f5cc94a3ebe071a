"""Checkpoints: weights as safetensors plus a JSON config (with the weights' sha256), and a separate
training-state file for exact resume. Loading verifies the sha256 and never unpickles code: weights
come from safetensors, training state through `torch.load(weights_only=True)`."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.files import InputError, atomic_dir, atomic_path, file_digest
from pipeline.models import build_model, model_config

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"

Fingerprint = dict[str, str]  # what a training run is, part by part (params, data, code...): digests


def fingerprint_of(**parts: Any) -> Fingerprint:
    """Each part (a JSON value) by its sha256. A checkpoint resumes only a run equal in every part;
    `restore` names the parts that differ."""
    return {name: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
            for name, value in parts.items()}


def is_tied_head(key: str) -> bool:
    """The language-model head, tied to the token embedding (also inside a classifier's backbone)."""
    return key == "head.weight" or key.endswith(".head.weight")


def save_model(directory: Path, model: nn.Module, extra: dict[str, Any] | None = None,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """Weights (`state`, or the model's own) + config.json, written atomically as one directory."""
    with atomic_dir(directory) as tmp:
        # tied weights share storage: safetensors stores each tensor once, so drop the alias
        state = state if state is not None else model.state_dict()
        weights = {k: v.detach().cpu().contiguous() for k, v in state.items() if not is_tied_head(k)}
        save_file(weights, str(tmp / WEIGHTS))
        config = {"model": model_config(model), "sha256": file_digest(tmp / WEIGHTS), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.exists():
        raise InputError(f"{directory}: no checkpoint here ({CONFIG} missing)")
    return json.loads(path.read_text())


def load_model(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model saved in `directory`, after checking its weights against the recorded sha256."""
    config = read_config(directory)
    weights = directory / WEIGHTS
    if not weights.exists():
        raise InputError(f"{weights}: checkpoint weights missing")
    if file_digest(weights) != config["sha256"]:
        raise InputError(f"{weights}: sha256 does not match {CONFIG} (file changed or corrupt)")
    model = build_model(config["model"])
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not is_tied_head(k)]:
        raise InputError(f"{weights}: weights do not fit the model config ({missing or unexpected})")
    return model, config


def save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # an unpickling refusal or a corrupt file
        raise InputError(f"{path}: not a loadable training state: {exc}") from None


def restore(checkpoints: Path, expected: Fingerprint, model: nn.Module, optimizer: torch.optim.Optimizer,
            fresh: dict[str, Any], stage: str, load: Callable[[dict, dict], None] | None = None
            ) -> dict[str, Any]:
    """The training progress saved in `checkpoints` when it belongs to this run (same fingerprint),
    with the model, optimizer and torch RNG restored (by `load(weights, optimizer state)` when given:
    a sharded model); else `fresh`."""
    if not (checkpoints / STATE).exists():
        return fresh
    state = load_state(checkpoints / STATE)
    saved = state.get("fingerprint")
    if not isinstance(saved, dict):  # written before fingerprints had parts (and code among them)
        print(f"{stage}: checkpoint from an older version of the pipeline; starting fresh", file=sys.stderr)
        return fresh
    if saved != expected:
        differing = [part for part in {**saved, **expected} if saved.get(part) != expected.get(part)]
        named = " and ".join([", ".join(differing[:-1]), differing[-1]] if len(differing) > 1 else differing)
        print(f"{stage}: checkpoint belongs to other {named}; starting fresh", file=sys.stderr)
        return fresh
    if state.get("best_saved") and not (checkpoints / "best" / CONFIG).exists():
        print(f"{stage}: checkpoint has lost its best model; starting fresh", file=sys.stderr)
        return fresh
    saved, _ = load_model(checkpoints / "model")
    if load is not None:
        load(saved.state_dict(), state["optimizer"])
    else:
        model.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    print(f"{stage}: resuming at step {state['step']}", file=sys.stderr)
    return {k: state.get(k, default) for k, default in fresh.items()}


def write_checkpoint(checkpoints: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     progress: dict[str, Any], fingerprint: Fingerprint,
                     full: tuple[dict, dict] | None = None) -> None:
    """Weights (`checkpoints/model`) and the training state beside them, each written atomically;
    `full`: the model and optimizer state gathered from a sharded model."""
    weights, optimizer_state = full if full is not None else (None, optimizer.state_dict())
    save_model(checkpoints / "model", model, {"step": progress["step"]}, weights)
    save_state(checkpoints / STATE, {**progress, "optimizer": optimizer_state,
                                     "torch_rng": torch.get_rng_state(), "fingerprint": fingerprint})
