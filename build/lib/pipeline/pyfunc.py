"""MLflow pyfunc flavours of the pipeline's models (what the registry serves); imported only when a model
is logged or loaded, since importing mlflow costs seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """predict(DataFrame with a `text` column) -> DataFrame: `label` and `p_<label>` per class."""

    def load_context(self, context: Any) -> None:
        from pipeline.classify import Classifier

        self.classifier = Classifier.load(Path(context.artifacts["classifier"]))

    # untyped on purpose: MLflow reads predict's type hints as an input schema
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd

        labels, probs = self.classifier.predict([str(t) for t in model_input["text"]])
        columns = {f"p_{name}": probs[:, i] for i, name in enumerate(self.classifier.labels)}
        return pd.DataFrame({"label": labels, **columns})


class LanguageModel(mlflow.pyfunc.PythonModel):
    """predict(DataFrame with a `prompt` column) -> the prompts continued (40 tokens, temperature 0.8,
    top-k 50, seed 0)."""

    def load_context(self, context: Any) -> None:
        self.directory = Path(context.artifacts["lm"])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        from pipeline.generate import generate

        return [generate(self.directory, str(p), 40, 0.8, 50, None, 0) for p in model_input["prompt"]]
