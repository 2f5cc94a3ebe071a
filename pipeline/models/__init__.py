"""Models (no training logic): the GPT decoder, recurrent baselines, classifiers and the sentence
autoencoders, built from a JSON-serialisable config so a checkpoint is weights (safetensors) plus
that config."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from pipeline.models.classifier import SequenceClassifier
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.recurrent import RecurrentConfig, RecurrentLM
from pipeline.models.sentence import (
    Denoiser,
    GanConfig,
    LatentGan,
    SentenceConfig,
    SentenceModel,
)
from pipeline.models.transformers_classifier import TransformersClassifier

__all__ = ["GPT", "Denoiser", "GPTConfig", "GanConfig", "LatentGan", "RecurrentConfig", "RecurrentLM",
           "SentenceConfig", "SentenceModel", "SequenceClassifier", "TransformersClassifier", "build_model",
           "model_config", "with_dropout"]


def build_model(config: dict[str, Any]) -> nn.Module:
    """A model from its config dict: {"arch": "gpt" | "lstm" | "gru", ...fields}, or
    {"arch": "classifier", "backbone": {...}, "n_classes": N, "pooling": "last" | "mean"}, or
    {"arch": "transformers", "transformers": {...its config}, "head": [...]}, or
    {"arch": "sentence" | "latent_gan", ...fields}."""
    if config["arch"] == "transformers":
        return TransformersClassifier.from_config(config)
    if config["arch"] == "classifier":
        return SequenceClassifier(build_model(config["backbone"]), config["n_classes"], config["pooling"])
    fields = {k: v for k, v in config.items() if k != "arch"}
    if config["arch"] == "gpt":
        return GPT(GPTConfig(**fields))
    if config["arch"] == "sentence":
        shape = SentenceConfig(**fields)
        return Denoiser(shape) if shape.kind == "dae" else SentenceModel(shape)
    if config["arch"] == "latent_gan":
        return LatentGan(GanConfig(**fields))
    if config["arch"] in ("lstm", "gru"):
        fields.pop("cell", None)
        return RecurrentLM(RecurrentConfig(cell=config["arch"], **fields))
    raise ValueError(f"unknown model arch '{config['arch']}' (gpt, lstm, gru, sentence, latent_gan)")


def model_config(model: nn.Module) -> dict[str, Any]:
    """The config dict `build_model` takes back (what a checkpoint's config.json holds)."""
    if isinstance(model, GPT):
        return {"arch": "gpt", **asdict(model.cfg)}
    if isinstance(model, SequenceClassifier):
        return {"arch": "classifier", "backbone": model_config(model.backbone), "n_classes": model.n_classes,
                "pooling": model.pooling}
    if isinstance(model, TransformersClassifier):
        return model.config()
    if isinstance(model, SentenceModel | Denoiser):
        return {"arch": "sentence", **asdict(model.cfg)}
    if isinstance(model, LatentGan):
        return {"arch": "latent_gan", **asdict(model.cfg)}
    if isinstance(model, RecurrentLM):
        fields = asdict(model.cfg)
        return {"arch": fields.pop("cell"), **fields}
    raise TypeError(f"not a pipeline model: {type(model).__name__}")


def with_dropout(model: nn.Module, dropout: float) -> nn.Module:
    """The same model and weights with another dropout rate (fine-tuning may want more than pretraining)."""
    rebuilt = build_model({**model_config(model), "dropout": dropout})
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt
