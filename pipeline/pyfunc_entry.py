"""The code MLflow logs for each registered model (models from code): loading runs this file."""

import mlflow.models

from pipeline.pyfunc import PipelineModel

mlflow.models.set_model(PipelineModel())
