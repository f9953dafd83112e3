"""A trained model as an MLflow model: a pyfunc that takes files and returns taxa and
embeddings, logged into a run with the library beside it and registered with its
benchmark metrics. Load it anywhere MLflow runs:

    m = mlflow.pyfunc.load_model("models:/biovita/1")
    m.predict(pd.DataFrame({"path": ["call.mp3", "frog.jpg"]}), params={"rank": "genus", "k": 3})

or serve it: `mlflow models serve -m models:/biovita/1 --env-manager local`.
"""

from __future__ import annotations

import contextlib
import io
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from biovita.errors import MediaError
from biovita.predict import Predictor

# the library folder logged beside the model (`code_paths`): the model loads without an install
LIBRARY = Path(__file__).resolve().parent.parent

REGISTERED_NAME = "biovita"


class BioVITAPyfunc(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a `path` column (recordings or photos). Output: one row per
    (file, candidate): file, modality, rank, the taxon's names, score, probability, and the
    file's embedding (the same on each of its rows)."""

    def load_context(self, context):
        self.predictor = Predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        rank, k = params.get("rank", "species"), int(params.get("k", 5))
        paths = model_input["path"] if hasattr(model_input, "columns") else model_input
        rows = []
        for p in list(paths):
            try:
                modality, v = self.predictor.embed_file(p)
            except MediaError as e:
                rows.append({"file": str(p), "modality": "", "error": e.reason})
                continue
            for r in self.predictor.rank(modality, v, rank, k):
                rows.append({"file": str(p), "modality": modality, **r, "embedding": v.tolist()})
        return pd.DataFrame(rows)


def log_model(run_id: str, tracking_uri: str, checkpoint: str, metrics: dict[str, float],
              register: str | None = REGISTERED_NAME):
    """Log `checkpoint` (a biovita folder) as the run's MLflow model `model`, attach the
    benchmark `metrics` to the logged model, and register it under `register`. Returns the
    model version (or the logged model when not registering)."""
    mlflow.set_tracking_uri(tracking_uri)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "path")]),
        params=ParamSchema([ParamSpec("rank", "string", "species"), ParamSpec("k", "long", 5)]))
    requirements = [r for r in _requirements() if not r.startswith("biovita")]
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=BioVITAPyfunc(), artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(LIBRARY)], pip_requirements=requirements,
            signature=signature, metadata={"biovita_checkpoint": str(checkpoint)})
        if metrics:
            mlflow.log_metrics(metrics, model_id=info.model_id)
    client.update_run(run_id, status=run.info.status)  # as it was (the job ends it itself)
    if not register:
        return info
    # (MLflow prints "Successfully registered model ..." and "Created version ..." to stderr:
    # the job says which version it registered, once; MLflow's warnings use its logger)
    with contextlib.redirect_stderr(io.StringIO()):
        version = mlflow.register_model(info.model_uri, register)
    for k, v in metrics.items():
        client.set_model_version_tag(register, version.version, k, f"{v:.4f}")
    return version


def _requirements() -> list[str]:
    try:
        return [r.split(";")[0].strip() for r in requires("biovita") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        return []
