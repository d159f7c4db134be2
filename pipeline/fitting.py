"""The Keras side of training, with no tracking: build, compile and fit the model for a config.

`pipeline.train` wraps it with MLflow logging, checkpoints and the served model; a non-chief host
of a cluster and the GPU benchmark call it directly.
"""

from __future__ import annotations

import functools
import math
import sys
import time

import keras
import numpy as np

from pipeline import config
from pipeline.data import IMAGE_SIZE, Dataset
from pipeline.distribute import Distribution
from pipeline.model import build_resnet


def learning_rate(cfg: config.TrainConfig, steps_per_epoch: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """Step schedule: scaled lr, multiplied by lr_decay at each boundary epoch."""
    boundaries = [b * steps_per_epoch for b in cfg.lr_boundaries]
    values = [cfg.scaled_lr * cfg.lr_decay ** i for i in range(len(boundaries) + 1)]
    if not boundaries:
        return keras.optimizers.schedules.PiecewiseConstantDecay([10**12], values * 2)
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


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


def check_backend(cfg: config.Config) -> None:
    """Params that only one backend supports; entry points call this before opening any run."""
    if cfg.train.feed == "device" and keras.backend.backend() != "jax":
        raise config.ConfigError(f"train.feed: 'device' needs the JAX backend, not {keras.backend.backend()}")


def compile_model(cfg: config.Config, dataset: Dataset, dist: Distribution, train_images: int) -> keras.Model:
    """The training model (with augmentation), compiled for `dist`. Seeds the run; `train.precision`
    is the global dtype policy only while the model is built (its layers keep it), so it does not
    leak into models built later in the process, such as the float32 served copy."""
    t = cfg.train
    check_backend(cfg)
    keras.utils.set_random_seed(t.seed)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(t.precision)
    try:
        with dist.scope():
            model = make_model(cfg, dataset)
            optimizer = keras.optimizers.SGD(learning_rate=learning_rate(t, math.ceil(train_images / t.batch_size)),
                                             momentum=t.momentum, nesterov=t.nesterov)
            model.compile(optimizer=optimizer,
                          loss=keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing),
                          metrics=[keras.metrics.CategoricalAccuracy(name="acc")],
                          jit_compile={"auto": "auto", "true": True, "false": False}[t.jit_compile],
                          steps_per_execution=t.steps_per_execution)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    dist.adapt(model)
    return model


def progress_verbosity(setting: str) -> int:
    """auto: a live progress bar on a terminal, one line per epoch in logs and under `mlflow run`."""
    return (1 if sys.stdout.isatty() else 2) if setting == "auto" else int(setting)


@functools.cache
def _device_gather():
    """One jitted gather of (images, labels) rows for every DeviceBatches, so it compiles once per shape."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda images, labels, idx: (jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0)))


class DeviceBatches(keras.utils.PyDataset):
    """Batches cut on the accelerator from images copied there once (JAX backend, `train.feed=device`).

    The uint8 images and one-hot labels go to the default device when this is made; each batch is a
    jitted gather there, so per step only the batch's indices leave the host. Keras's own array feed
    instead slices on the host and copies every batch. `shuffle`: a seeded new order every epoch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0):
        super().__init__()
        import jax

        self.images, self.labels = jax.device_put(images), jax.device_put(labels)
        self.batch_size, self.shuffle = batch_size, shuffle
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(images)) if shuffle else np.arange(len(images))
        self.take = _device_gather()

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, index: int):
        return self.take(self.images, self.labels, self.order[index * self.batch_size:(index + 1) * self.batch_size])

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.order = self.rng.permutation(len(self.order))


def fit(model: keras.Model, cfg: config.Config, splits: tuple, num_classes: int,
        callbacks: list) -> keras.callbacks.History:
    """`model.fit` on `split_validation`'s splits, validating every epoch; the same on every host of a cluster.

    train.feed host: Keras's array feed (uint8 in host memory, a batch copied per step); device:
    `DeviceBatches` (JAX only).
    """
    t = cfg.train
    x_train, y_train, x_val, y_val = splits
    y_train, y_val = keras.utils.to_categorical(y_train, num_classes), keras.utils.to_categorical(y_val, num_classes)
    options = dict(epochs=t.epochs, callbacks=[keras.callbacks.TerminateOnNaN(), *callbacks],
                   verbose=progress_verbosity(t.verbose))
    if t.feed == "device":
        return model.fit(DeviceBatches(x_train, y_train, t.batch_size, shuffle=True, seed=t.seed),
                         validation_data=DeviceBatches(x_val, y_val, t.batch_size, shuffle=False), **options)
    return model.fit(x_train, y_train, batch_size=t.batch_size, validation_data=(x_val, y_val), shuffle=True,
                     **options)


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of every epoch of one `fit` (validation included), in `seconds`."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def diverged(history: keras.callbacks.History) -> str | None:
    """Why training diverged, or None if the last loss is finite."""
    losses = history.history.get("loss", [])
    if losses and not np.isfinite(losses[-1]):
        return f"training diverged: loss became {losses[-1]} in epoch {len(history.epoch) and history.epoch[-1] + 1}"
    return None
