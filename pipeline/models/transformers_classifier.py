"""A transformers sequence classifier (any `AutoModelForSequenceClassification` family: BERT, GPT-2,
RoBERTa, ...) behind the pipeline's classifier interface, `forward(ids, lengths) -> logits`, so
fine-tuning, checkpoints and prediction treat it like `SequenceClassifier`. Its config dict carries
the transformers config, so a checkpoint stays safetensors + JSON; no code from a model directory is
ever run (no `trust_remote_code`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class TransformersClassifier(nn.Module):
    def __init__(self, model: nn.Module, head: list[str]) -> None:
        super().__init__()
        self.model = model
        self.head = sorted(head)  # the parameters (names in `model`) that the base checkpoint lacked

    @classmethod
    def from_pretrained(cls, directory: Path, labels: dict[str, int]) -> TransformersClassifier:
        """The model in a local transformers directory with a new `len(labels)`-way head (fp32)."""
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report and bar: the caller says what is new
        hf_logging.disable_progress_bar()
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(directory), num_labels=len(labels), id2label={i: n for n, i in labels.items()},
                label2id=labels, dtype=torch.float32, local_files_only=True, ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        mismatched = (key if isinstance(key, str) else key[0] for key in info["mismatched_keys"])
        return cls(model, [*info["missing_keys"], *mismatched])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TransformersClassifier:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        fields = dict(config["transformers"])
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        return cls(AutoModelForSequenceClassification.from_config(hf_config), config["head"])

    def config(self) -> dict[str, Any]:
        return {"arch": "transformers", "transformers": self.model.config.to_dict(), "head": self.head}

    @property
    def n_classes(self) -> int:
        return int(self.model.config.num_labels)

    def head_parameter_names(self) -> set[str]:
        return {f"model.{name}" for name in self.head}

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(ids.size(1), device=ids.device)[None, :] < lengths[:, None]
        return self.model(input_ids=ids, attention_mask=mask.long()).logits
