"""Step 2, train: fit the ResNet on a prepared dataset and log it.

Reads:  a prepared dataset URI (from prepare; prepared on the spot, or reused, if not given).
Writes: params (every resolved value, once); per-epoch metrics `loss`, `acc`, `val_loss`,
        `val_acc`, `lr`, `epoch_seconds`, `images_per_second` with step = epoch (1-based);
        artifacts `history.csv`, `curves.png` (acc/val_acc, the seed's plot), `config.json`;
        the model (a pyfunc around the Keras model, see pipeline.serve; uint8 (-1, 32, 32, 3)
        signature, input example).
Returns the logged model's URI (`models:/m-...`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import keras
import matplotlib
import mlflow
import numpy as np
import pandas as pd

from pipeline import config, prepare, serve
from pipeline.data import IMAGE_SIZE, Dataset
from pipeline.model import build_resnet
from pipeline.tracking import PIPELINE_DIR, cli, step_run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

EPOCH_METRICS = ("loss", "acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second")


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs one point per epoch for each of EPOCH_METRICS at step = epoch (1-based).

    Written by hand because mlflow.keras.MlflowCallback logs duplicate `validation_*`
    metrics at step 0 and autolog crashes `fit` on TF 2.21 without tensorboard.
    """

    def __init__(self, train_images: int):
        super().__init__()
        self.train_images = train_images
        self.rows: list[dict[str, float]] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {k: float(v) for k, v in (logs or {}).items() if k in EPOCH_METRICS}
        row.update(lr=lr, epoch_seconds=seconds, images_per_second=self.train_images / seconds)
        mlflow.log_metrics(row, step=epoch + 1)
        self.rows.append({"epoch": epoch + 1, **row})


def learning_rate(cfg: config.TrainConfig, steps_per_epoch: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """Step schedule: scaled lr, multiplied by lr_decay at each boundary epoch."""
    boundaries = [b * steps_per_epoch for b in cfg.lr_boundaries]
    values = [cfg.scaled_lr * cfg.lr_decay ** i for i in range(len(boundaries) + 1)]
    if not boundaries:
        return keras.optimizers.schedules.PiecewiseConstantDecay([10**12], values * 2)
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def distribution_scope(mode: str):
    """Data parallelism over local devices with the backend's own engine.

    auto: several GPUs -> mirrored (TensorFlow) or data_parallel (JAX); else a single device.
    mirrored/data_parallel replicate over all GPUs, or all (virtual) CPU devices if there are
    none, which is how the tests exercise them. Returns (scope to build and compile the
    model in, names of the devices used).
    """
    backend = keras.backend.backend()
    devices = keras.distribution.list_devices()
    gpus = [d for d in devices if d.split(":")[0].lower() in ("gpu", "cuda")]
    if mode == "auto":
        mode = ("mirrored" if backend == "tensorflow" else "data_parallel") if len(gpus) > 1 else "none"
    if mode == "mirrored":
        if backend != "tensorflow":
            raise config.ConfigError(f"train.distribute: 'mirrored' needs the TensorFlow backend, not {backend}")
        import tensorflow as tf

        names = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=names)
        return strategy.scope(), names
    if mode == "data_parallel":
        if backend != "jax":
            raise config.ConfigError(f"train.distribute: 'data_parallel' needs the JAX backend, not {backend}")
        replicas = gpus or devices
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=replicas))
        return contextlib.nullcontext(), replicas
    return contextlib.nullcontext(), (gpus or devices)[:1]


def progress_verbosity(setting: str) -> int:
    """auto: a live progress bar on a terminal, one line per epoch in logs and under `mlflow run`."""
    return (1 if sys.stdout.isatty() else 2) if setting == "auto" else int(setting)


def split_validation(dataset: Dataset, fraction: float, seed: int):
    """(x_train, y_train, x_val, y_val): a seeded held-out slice, or the test split if fraction = 0."""
    if fraction == 0:
        return dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test
    order = np.random.default_rng(seed).permutation(len(dataset.x_train))
    n_val = max(1, round(fraction * len(order)))
    val, train = order[:n_val], order[n_val:]
    return dataset.x_train[train], dataset.y_train[train], dataset.x_train[val], dataset.y_train[val]


def make_model(cfg: config.Config, dataset: Dataset, *, augment: bool = True) -> keras.Model:
    mean, std = dataset.channel_stats()
    m, t = cfg.model, cfg.train
    return build_resnet(num_classes=len(dataset.class_names), block=m.block, units_per_stage=m.units_per_stage,
                        widths=m.widths, strides=m.strides, stem_filters=m.stem_filters, l2=m.l2,
                        mean=mean.tolist(), std=std.tolist(), image_size=IMAGE_SIZE,
                        max_shift=round(t.shift * IMAGE_SIZE) if augment else 0, shift_fill=t.shift_fill,
                        flip=t.flip and augment, seed=t.seed)


def inference_copy(cfg: config.Config, dataset: Dataset, model: keras.Model) -> keras.Model:
    """The trained model without the augmentation layer: only stock Keras layers, so the
    logged model loads anywhere without this project's code."""
    served = make_model(cfg, dataset, augment=False)
    for layer in served.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return served


def log_model(model: keras.Model, class_names: list[str], example: np.ndarray) -> mlflow.models.model.ModelInfo:
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
            name="model", python_model=serve.ImageClassifier(), code_paths=[str(PIPELINE_DIR)],
            artifacts={serve.KERAS_ARTIFACT: str(Path(tmp) / "model.keras"),
                       serve.CLASSES_ARTIFACT: str(Path(tmp) / "class_names.json")},
            signature=False, input_example=np.asarray(example, dtype=np.uint8),
            metadata={"input_formats": serve.INPUT_FORMATS, "output_format": serve.OUTPUT_FORMAT,
                      "class_names": list(class_names)},
            pip_requirements=serving_requirements())


def serving_requirements() -> list[str]:
    """The served model needs the backend it was trained with, Keras, MLflow and Pillow."""
    from importlib.metadata import version

    backend = {"tensorflow": "tensorflow", "jax": "jax"}.get(keras.backend.backend(), keras.backend.backend())
    return [f"{pkg}=={version(pkg)}" for pkg in (backend, "keras", "mlflow", "pandas", "pillow")]


def plot_curves(history: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["acc"], label="acc")
    if "val_acc" in history:
        ax.plot(history["epoch"], history["val_acc"], label="val_acc")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: config.Config, dataset_uri: str) -> str:
    """Train inside the active run; return the logged model's URI."""
    t = cfg.train
    dataset = prepare.load_dataset(dataset_uri)
    keras.utils.set_random_seed(t.seed)
    keras.mixed_precision.set_global_policy(t.precision)
    x_train, y_train, x_val, y_val = split_validation(dataset, t.validation_fraction, t.seed)
    num_classes = len(dataset.class_names)
    steps_per_epoch = math.ceil(len(x_train) / t.batch_size)

    scope, devices = distribution_scope(t.distribute)
    with scope:
        model = make_model(cfg, dataset)
        optimizer = keras.optimizers.SGD(learning_rate=learning_rate(t, steps_per_epoch), momentum=t.momentum,
                                         nesterov=t.nesterov)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing),
                      metrics=[keras.metrics.CategoricalAccuracy(name="acc")],
                      jit_compile={"auto": "auto", "true": True, "false": False}[t.jit_compile])

    mlflow.log_params({**cfg.flat(), "dataset_uri": dataset_uri})
    mlflow.set_tags({"backend": keras.backend.backend(), "devices": ", ".join(devices),
                     "trainable_params": str(sum(int(np.prod(w.shape)) for w in model.trainable_weights))})
    mlflow.log_dict(dataclasses.asdict(cfg), "config.json")
    print(f"training {model.name} ({model.count_params():,} params) on {len(x_train)} images, "
          f"validating on {len(x_val)}, backend {keras.backend.backend()}, devices {devices}")

    logger = MlflowEpochLogger(len(x_train))
    model.fit(x_train, keras.utils.to_categorical(y_train, num_classes), batch_size=t.batch_size, epochs=t.epochs,
              validation_data=(x_val, keras.utils.to_categorical(y_val, num_classes)), shuffle=True,
              callbacks=[logger], verbose=progress_verbosity(t.verbose))

    history = pd.DataFrame(logger.rows)
    served = inference_copy(cfg, dataset, model)
    with tempfile.TemporaryDirectory() as tmp:
        history.to_csv(Path(tmp) / "history.csv", index=False)
        plot_curves(history, Path(tmp) / "curves.png")
        mlflow.log_artifacts(tmp)
    info = log_model(served, list(dataset.class_names), dataset.x_test[:2])
    mlflow.set_tag("model_uri", info.model_uri)
    print(f"logged model {info.model_uri}")
    return info.model_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="")
    parser.add_argument("--epochs", default="")
    parser.add_argument("--data", default="")
    parser.add_argument("--overrides", default="")
    parser.add_argument("--dataset-uri", default="", help="prepared dataset; default: prepare (or reuse) from --data")
    args = parser.parse_args()
    cfg = config.load_from_cli(args.params, args.overrides, epochs=args.epochs, data=args.data)
    with step_run(cfg, "train", run_name=cfg.run_name()):
        run(cfg, args.dataset_uri or prepare.ensure_prepared(cfg))


if __name__ == "__main__":
    cli(main)
