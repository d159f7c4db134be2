"""The served model: a pyfunc around the trained Keras model that speaks in class names.

Input: uint8-valued pixel tensors (n, 32, 32, 3). Output: one row per image with the predicted
`label`, its `probability` and all class `probabilities` (in `class_names` order).
Bad input raises an MlflowException with INVALID_PARAMETER_VALUE, which the scoring server
answers with HTTP 400 and the message.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.data import CHANNELS, IMAGE_SIZE

KERAS_ARTIFACT = "keras_model"
CLASSES_ARTIFACT = "class_names"


def bad_input(message: str) -> MlflowException:
    return MlflowException(f"bad input: {message}", error_code=INVALID_PARAMETER_VALUE)


def to_pixels(model_input) -> np.ndarray:
    """Validate a batch of pixel tensors and return it as uint8 (n, 32, 32, 3)."""
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.to_numpy()
    try:
        x = np.asarray(model_input)
    except ValueError as exc:  # ragged nested lists
        raise bad_input(f"pixels must form an (n, 32, 32, 3) array ({exc})") from None
    expected = (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)
    if x.ndim == 3 and x.shape == expected:
        x = x[None]
    if x.ndim != 4 or x.shape[1:] != expected:
        raise bad_input(f"pixels must have shape (n, 32, 32, 3), got {x.shape}")
    if len(x) == 0:
        raise bad_input("empty batch: send at least one image")
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise bad_input(f"pixels must be integers 0-255, got values of type {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise bad_input("pixels contain NaN or infinity")
        if not np.equal(np.mod(x, 1), 0).all():
            raise bad_input("pixels must be integers 0-255; got fractional values (scaled to [0, 1]?)")
    if x.min() < 0 or x.max() > 255:
        raise bad_input(f"pixels must lie in 0-255, got values in [{x.min()}, {x.max()}]")
    return x.astype(np.uint8)


def to_frame(probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    best = probs.argmax(axis=1)
    return pd.DataFrame({"label": [class_names[i] for i in best],
                         "probability": probs[np.arange(len(probs)), best].astype(float),
                         "probabilities": [p.astype(float).tolist() for p in probs]})


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Wraps the Keras model (artifact `keras_model`) and its class names (artifact `class_names`)."""

    def load_context(self, context):
        import keras

        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)
        with open(context.artifacts[CLASSES_ARTIFACT]) as f:
            self.class_names = json.load(f)

    def predict_proba(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return np.asarray(self.model.predict(pixels, batch_size=batch_size, verbose=0), dtype=np.float32)

    def predict(self, context, model_input, params=None):
        return to_frame(self.predict_proba(to_pixels(model_input)), self.class_names)
