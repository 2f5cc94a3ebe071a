"""MLflow pyfunc flavour of the pipeline's models (what the registry serves), logged as code
("models from code", `pipeline/pyfunc_entry.py`): the registry holds a script and the safetensors
directory, never a pickled object. Imported only when a model is logged or loaded, since importing
mlflow costs seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc


class PipelineModel(mlflow.pyfunc.PythonModel):
    """`model_config["kind"]` picks what it serves:
    - classifier: predict(DataFrame with a `text` column) -> DataFrame: `label` and `p_<label>`;
    - lm: predict(DataFrame with a `prompt` column) -> the prompts continued (40 tokens, temperature
      0.8, top-k 50, seed 0)."""

    def load_context(self, context: Any) -> None:
        from pipeline.classify import Classifier

        self.kind = context.model_config["kind"]
        directory = Path(context.artifacts[self.kind])
        self.classifier = Classifier.load(directory) if self.kind == "classifier" else None
        self.directory = directory

    # untyped on purpose: MLflow reads predict's type hints as an input schema
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd

        from pipeline.generate import generate

        if self.classifier is None:
            return [generate(self.directory, str(p), 40, 0.8, 50, None, 0) for p in model_input["prompt"]]
        labels, probs = self.classifier.predict([str(t) for t in model_input["text"]])
        columns = {f"p_{name}": probs[:, i] for i, name in enumerate(self.classifier.labels)}
        return pd.DataFrame({"label": labels, **columns})
