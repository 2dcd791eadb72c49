"""The file MLflow loads for a ``<prefix>-system`` version (models-from-code, MLflow 3).

``mlflow.pyfunc.load_model("models:/<prefix>-system@champion").predict(df)`` takes a
DataFrame with a ``question`` column and returns one row per question (see
``malt_ops.system_model.OUTPUT_COLUMNS``). A bad request raises an MLflow
INVALID_PARAMETER_VALUE error with one line; the scoring server answers it as a 400 and
keeps serving.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class MaltSystemModel(PythonModel):
    def load_context(self, context) -> None:
        from malt_ops.system_model import MaltSystem

        self.system = MaltSystem(context.model_config, dict(context.artifacts))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        from mlflow.exceptions import MlflowException

        from malt_ops.system_model import RequestError, _questions

        try:
            rows = self.system.answer(_questions(model_input))
        except RequestError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return pd.DataFrame(rows)


mlflow.models.set_model(MaltSystemModel())
