"""The Keras side of the tracking layer: per-epoch metrics, the logged history, the logged model.

`MlflowEpochLogger` logs EPOCH_METRICS at step = epoch (1-based) into the active run; `logged_history`
reads them back as a table; `log_model` logs the pyfunc that serves a trained model (see pipeline.serve).
Imports Keras, so `pipeline.tracking` itself stays light for the steps that do not train.
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd

from pipeline import serve
from pipeline.fitting import EpochTimer, current_lr
from pipeline.tracking import PIPELINE_DIR

EPOCH_METRICS = ("loss", "acc", "val_loss", "val_acc", "lr", "iterations", "epoch_seconds", "images_per_second")


class MlflowEpochLogger(EpochTimer):
    """Logs one point per epoch for each of EPOCH_METRICS at step = epoch (1-based).

    Written by hand because mlflow.keras.MlflowCallback logs duplicate `validation_*`
    metrics at step 0 and autolog crashes `fit` on TF 2.21 without tensorboard.
    `logged_steps`: epochs a resumed run already logged, skipped so no step appears twice.
    """

    def __init__(self, train_images: int, logged_steps: set[int] = frozenset()):
        super().__init__()
        self.train_images = train_images
        self.logged_steps = set(logged_steps)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if epoch + 1 in self.logged_steps:
            return
        seconds = self.seconds[-1]
        lr = current_lr(self.model.optimizer)
        row = {k: float(v) for k, v in (logs or {}).items() if k in EPOCH_METRICS}
        iterations = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        row.update(lr=lr, iterations=iterations, epoch_seconds=seconds, images_per_second=self.train_images / seconds)
        mlflow.log_metrics(row, step=epoch + 1)


def logged_history(run_id: str) -> pd.DataFrame:
    """The run's per-epoch metrics as a table (one row per epoch), read back from MLflow, so a
    resumed run's history includes the epochs logged before the interruption."""
    client = mlflow.MlflowClient()
    series = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in EPOCH_METRICS}
    return pd.DataFrame(series).rename_axis("epoch").reset_index().sort_values("epoch")


def log_model(model: keras.Model, class_names: list[str], example: np.ndarray,
              tta: str = "none") -> mlflow.models.model.ModelInfo:
    """Log the pyfunc that serves `model` (see pipeline.serve); return its ModelInfo.

    Inputs: the inference Keras model, its class names, a few uint8 (n, 32, 32, 3) images kept as
    the input example. No signature: MLflow enforces a tensor signature by casting (floats in [0, 1]
    become 0 under uint8) and no single schema admits both pixel tensors and base64 images, so
    `serve.to_pixels` validates every request instead. The accepted formats go into the MLmodel
    metadata.
    """
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "model.keras")
        (Path(tmp) / "class_names.json").write_text(json.dumps(class_names))
        return mlflow.pyfunc.log_model(
            name="model", python_model=serve.ImageClassifier(tta), code_paths=[str(PIPELINE_DIR)],
            artifacts={serve.KERAS_ARTIFACT: str(Path(tmp) / "model.keras"),
                       serve.CLASSES_ARTIFACT: str(Path(tmp) / "class_names.json")},
            signature=False, input_example=np.asarray(example, dtype=np.uint8),
            metadata={"input_formats": serve.INPUT_FORMATS, "output_format": serve.OUTPUT_FORMAT,
                      "class_names": list(class_names), "tta": tta},
            pip_requirements=serving_requirements())


def serving_requirements() -> list[str]:
    """The served model needs the backend it was trained with, Keras, MLflow and Pillow."""
    packages = (keras.backend.backend(), "keras", "mlflow", "pandas", "pillow")  # backend names are package names
    return [f"{pkg}=={version(pkg)}" for pkg in packages]
