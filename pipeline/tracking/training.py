"""The Keras side of the tracking layer: what a train run records, from its params to its model.

`start_training` claims the active run for this process and logs its params, tags, `config.json` and the dataset
input of the prepare run it trains on;
`MlflowEpochLogger` logs EPOCH_METRICS at step = epoch (1-based) into the active run; `SessionClock` logs
WALL_METRIC, the seconds the train step has spent on the run over all its sessions; `logged_epochs`
and `logged_history` read them back (the epochs a resumed run already logged; the history as a
table); `log_model` logs the pyfunc that serves a trained model (see pipeline.serve) and
`log_trained_model` does so for the train step, tagging the run with the model's URI and describing it.
Imports Keras, so `pipeline.tracking` itself stays light for the steps that do not train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from pipeline import config, serve, source
from pipeline.fitting import Checkpoint, EpochTimer, current_lr, seconds_left
from pipeline.tracking import active_run_id, describe_train_run, steps
from pipeline.tracking.resume import (
    DATASET_SHA256,
    checkpoint_dir,
    claim,
    claimed,
    code_change,
    dataset_sha256,
    local_dataset_sha256,
    log_train_params,
    train_code,
    train_key,
    training_started,
)

# Tag on a train run, set after each epoch: when its last epoch should end (has ended, once it has) at the pace of
# this session's epochs so far (`fitting.seconds_left`): a live run's finish, read in the runs table
EXPECTED_END_TAG = "expected_end"
EPOCH_METRICS = ("loss", "acc", "val_loss", "val_acc", "lr", "iterations", "epoch_seconds", "images_per_second")
# The seconds the train step has spent on a run, summed over its sessions (the first, and each resume or extension):
# what compare shows as wall_s. A resumed run keeps its first start time, so its end - start counts the hours or days
# between its sessions.
WALL_METRIC = "wall_seconds"


def start_training(cfg: config.Config, dataset_uri: str, tags: dict[str, str], dataset=None) -> str:
    """Claim the active train run for this process (see `resume.claim`; ConfigError if another process
    trains it now), log every param (`resume.log_train_params`), the dataset input of `dataset_uri`'s prepare run
    (`steps.log_dataset_input`, context `train`; of `dataset`, read from `dataset_uri`, where that is a file no prepare
    run logged), `tags` and tags `train_key`, `train_code` and `dataset_sha256` (the dataset file's bytes, a local
    file's or a `runs:/` artifact's), and the resolved config as `config.json`. Returns the run's id."""
    run_id = active_run_id()
    if not claim(run_id):
        raise config.ConfigError(f"resume: run {run_id} is being trained by another process right now")
    training_started(run_id)  # until `train.run` has logged its model: a stop says what a rerun does with the run
    log_train_params(cfg, dataset_uri)
    steps.log_dataset_input(dataset_uri, "train", dataset)  # the UI's Dataset column: which data it trained on
    changed = code_change(run_id)
    if changed:  # resumed by id across a code change: the run says so, as `train_code` now names the new code only
        across = mlflow.MlflowClient().get_run(run_id).data.tags.get("resumed_across_code")
        epochs = Checkpoint.completed_epochs(checkpoint_dir(run_id))
        step = f"{changed[0][:12]} -> {changed[1][:12]} after epoch {epochs}"
        tags = {**tags, "resumed_across_code": f"{across}, {step}" if across else step}
    across = resumed_across_distribution(mlflow.MlflowClient().get_run(run_id).data.tags, tags,
                                         Checkpoint.completed_epochs(checkpoint_dir(run_id)))
    if across:  # the tags below name this session's distribution only
        tags = {**tags, ACROSS_DISTRIBUTION_TAG: across}
        earlier = mlflow.MlflowClient().get_run(run_id).data.tags.get(ACROSS_DISTRIBUTION_TAG)
        print(f"note: train run {run_id} goes on under another distribution: "
              f"{across[len(earlier) + 2:] if earlier else across} (tag {ACROSS_DISTRIBUTION_TAG})",
              file=sys.stderr, flush=True)
    digest = local_dataset_sha256(dataset_uri)  # a local file's bytes, which a `resume=<id>` is checked against
    # a `runs:/` artifact's too (in no key: it never changes): compare finds its evaluation on a copy of the file
    mlflow.set_tags({**tags, "train_key": train_key(cfg, dataset_uri, digest), "train_code": train_code(),
                     DATASET_SHA256: digest or dataset_sha256(dataset_uri)})
    mlflow.log_dict(dataclasses.asdict(cfg), "config.json")
    return run_id


DISTRIBUTION_TAGS = ("distribute", "workers", "replicas")  # how a session trained: the train run's tags
ACROSS_DISTRIBUTION_TAG = "resumed_across_distribution"


def resumed_across_distribution(logged: dict[str, str], tags: dict[str, str], epochs: int) -> str | None:
    """Tag `resumed_across_distribution` of a run that trained `epochs` epochs under the distribution its `logged` tags
    name and goes on under the one of `tags` (`DISTRIBUTION_TAGS`): `<old> -> <new> after epoch N`, added to the tag
    it held; None where nothing changed, or nothing trained before. `auto` resolves per machine and per TF_CONFIG: a
    cluster's chief killed and rerun without TF_CONFIG resumed alone, and the tags read as trained on one host
    throughout."""
    if not epochs or not all(key in logged for key in DISTRIBUTION_TAGS) or \
            all(logged[key] == tags.get(key) for key in DISTRIBUTION_TAGS):
        return None

    def said(t: dict[str, str]) -> str:
        return (f"{t['distribute']} over {t['workers']} host{'s' * (t['workers'] != '1')}, {t['replicas']} "
                f"replica{'s' * (t['replicas'] != '1')}")

    step = f"{said(logged)} -> {said(tags)} after epoch {epochs}"
    earlier = logged.get(ACROSS_DISTRIBUTION_TAG)
    return f"{earlier}, {step}" if earlier else step


class SessionClock(keras.callbacks.Callback):
    """Logs WALL_METRIC on run `run_id`: the seconds of the sessions before this one (its largest logged value)
    plus this session's, from when this clock was made (before the data loads and the model is built and compiled,
    so a resumed run counts its rebuild too) to each epoch's end (a session killed outright counts up to its last
    epoch) and to `log`'s call (the session's end). Each point takes the next step, so the run's latest value is
    its newest total."""

    def __init__(self, run_id: str):
        super().__init__()
        self._start = time.monotonic()
        self.run_id = run_id
        before = mlflow.MlflowClient().get_metric_history(run_id, WALL_METRIC)
        self.before = max((m.value for m in before), default=0.0)
        self._step = max((m.step for m in before), default=-1) + 1

    def log(self) -> float:
        """Log the run's total so far; return it."""
        total = self.before + time.monotonic() - self._start
        mlflow.MlflowClient().log_metric(self.run_id, WALL_METRIC, total, step=self._step)
        self._step += 1
        return total

    def log_after(self, exc: BaseException) -> None:
        """At a session that ends in `exc` (failed, stopped, pruned): log its total, only on a run this process trains
        (not one refused as another live process's: `resume.claimed`) and only where the store is not what failed."""
        if claimed(self.run_id) and not isinstance(exc, (MlflowException, OSError)):
            with contextlib.suppress(Exception):
                self.log()

    def on_epoch_end(self, epoch, logs=None):
        self.log()


def logged_epochs(run_id: str) -> set[int]:
    """The epochs (steps) the run has logged `val_acc` for: a resumed run skips them."""
    return {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_acc")}


class MlflowEpochLogger(EpochTimer):
    """Logs one point per epoch for each of EPOCH_METRICS at step = epoch (1-based): `lr` the last step's,
    `iterations` the optimizer's steps so far, `epoch_seconds` the whole epoch (validation included),
    `images_per_second` the images trained on over the training steps' time alone; and tag EXPECTED_END_TAG.

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
        lr = current_lr(self.model.optimizer)
        row = {k: float(v) for k, v in (logs or {}).items() if k in EPOCH_METRICS}
        iterations = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        # epoch_seconds: the whole epoch, validation (and EMA's BN recalibration) included; images_per_second: the
        # training steps' throughput alone, which the size of the validation split does not change
        row.update(lr=lr, iterations=iterations, epoch_seconds=self.seconds[-1],
                   images_per_second=self.train_images / self.train_seconds[-1])
        mlflow.log_metrics(row, step=epoch + 1)
        left = seconds_left(self.seconds, epoch + 1, self.params["epochs"])
        mlflow.set_tag(EXPECTED_END_TAG, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + left)))


def logged_history(run_id: str) -> pd.DataFrame:
    """The run's per-epoch metrics as a table (one row per epoch), read back from MLflow, so a
    resumed run's history includes the epochs logged before the interruption."""
    client = mlflow.MlflowClient()
    series = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in EPOCH_METRICS}
    return pd.DataFrame(series).rename_axis("epoch").reset_index().sort_values("epoch")


def trained_with(cfg: config.Config, run_id: str) -> dict:
    """What a person serving train run `run_id`'s model needs to know of how it was trained, for its MLmodel metadata
    (`log_model`): the run and its resolved params (`config.json`), and whether its weights are the exponential moving
    average of the trained ones (`ema_weights`: train.ema, with its `ema_momentum` and `ema_bn_batches`, the training
    batches BN's statistics were recomputed over under them, 0: none) or the last step's."""
    t = cfg.train
    ema = {"ema_momentum": t.ema_momentum, "ema_bn_batches": t.ema_bn_batches} if t.ema else {}
    return {"train_run_id": run_id, "params": f"runs:/{run_id}/config.json", "ema_weights": t.ema, **ema}


def log_model(model: keras.Model, class_names: list[str], example: np.ndarray,
              tta: str = "none", shift_fill: str = "nearest", trained: dict | None = None
              ) -> mlflow.models.model.ModelInfo:
    """Log the pyfunc that serves `model` (see pipeline.serve); return its ModelInfo.

    Inputs: the inference Keras model, its class names, a few uint8 (n, 32, 32, 3) images kept as
    the input example. No signature: MLflow enforces a tensor signature by casting (floats in [0, 1]
    become 0 under uint8) and no single schema admits both pixel tensors and base64 images, so
    `serve.to_pixels` validates every request instead. The MLmodel metadata (`mlflow.models.get_model_info(uri).
    metadata`) says how to call it and how it was trained: the accepted formats and the output's, the class names,
    the Keras model's input as its layers take it (`input_shape`, `image_size`, `input_dtype`, `input_range`: RGB pixel
    values, which the model normalises itself), `arch` (the Keras model's name), the Keras `backend` it was trained on
    (the served model loads on it where KERAS_BACKEND is unset), `tta` (evaluate.tta: the served test-time
    augmentation), `shift_fill` (train.shift_fill of the run that trained `model`: flip_shift's shifted views fill
    their border as its training shifts did) and `trained` (`trained_with`: the run, its params, EMA weights or not).

    The code logged with it (`code/pipeline/`, which serving it runs) is the package's source as this process loaded
    it (`pipeline.source`): the code that trained `model` and scores with it here, not the files on disk now (a pull
    or an edit while it trained): its `.py` files, all the package holds, without `__pycache__`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "model.keras")
        (Path(tmp) / "class_names.json").write_text(json.dumps(class_names))
        return mlflow.pyfunc.log_model(
            name="model", python_model=serve.ImageClassifier(tta, shift_fill, keras.backend.backend()),
            code_paths=[str(source.write(Path(tmp) / "code"))],
            artifacts={serve.KERAS_ARTIFACT: str(Path(tmp) / "model.keras"),
                       serve.CLASSES_ARTIFACT: str(Path(tmp) / "class_names.json")},
            signature=False, input_example=np.asarray(example, dtype=np.uint8),
            metadata={"input_formats": serve.INPUT_FORMATS, "output_format": serve.OUTPUT_FORMAT,
                      "class_names": list(class_names), "input_shape": list(model.input_shape),
                      "image_size": model.input_shape[1], "input_dtype": str(model.inputs[0].dtype),
                      "input_range": "0-255", "arch": model.name, "backend": keras.backend.backend(),
                      "tta": tta, "shift_fill": shift_fill, **(trained or {})},
            pip_requirements=serving_requirements())


def log_trained_model(run_id: str, model: keras.Model, class_names: list[str], example: np.ndarray,
                      tta: str = "none", shift_fill: str = "nearest", trained: dict | None = None) -> str:
    """`log_model` for train run `run_id` (the active run); tag the run `model_uri` and (re)write its
    description (`describe_train_run`). Returns the model's URI `models:/m-...`. `trained`: see `trained_with`.

    A run that logged its model whole after its last epoch already (a kill or a lost server between the upload and
    the end of the step; the rerun resumes from the checkpoint, which outlives the upload) keeps that one: no second
    model. One resumed to train more epochs logs a new one. Models of the run whose upload was cut short (a kill,
    Ctrl-C: MLflow marks FAILED only an upload that raised an Exception) stayed PENDING for good: marked FAILED here
    (this process holds the run's claim: no other uploads for it)."""
    model_uri = logged_model_of(run_id)
    if not model_uri:
        for cut_short in [m for m in _logged_models(run_id) if m.status == LoggedModelStatus.PENDING]:
            mlflow.MlflowClient().finalize_logged_model(cut_short.model_id, LoggedModelStatus.FAILED)
        model_uri = log_model(model, class_names, example, tta, shift_fill, trained).model_uri
    mlflow.set_tag("model_uri", model_uri)
    describe_train_run(run_id, overwrite=True)
    return model_uri


def _logged_models(run_id: str) -> list:
    """The models train run `run_id` logged (`log_model`'s, named `model`), whole or not."""
    return mlflow.search_logged_models(experiment_ids=[mlflow.MlflowClient().get_run(run_id).info.experiment_id],
                                       filter_string=f"source_run_id = '{run_id}' AND name = 'model'",
                                       output_format="list")


def logged_model_of(run_id: str) -> str | None:
    """The URI of the model train run `run_id` logged whole (status READY; an upload cut short stays PENDING until
    `log_trained_model` marks it FAILED) after its last logged epoch, if any."""
    client = mlflow.MlflowClient()
    last_epoch = max((m.timestamp for m in client.get_metric_history(run_id, "loss")), default=0)
    ready = [m for m in _logged_models(run_id)
             if m.status == LoggedModelStatus.READY and m.creation_timestamp >= last_epoch]
    return max(ready, key=lambda m: m.creation_timestamp).model_uri if ready else None


def serving_requirements() -> list[str]:
    """What the served model imports (pipeline.serve and the modules it loads: the backend it was trained with, with
    jaxlib beside jax, Keras, MLflow, NumPy, pandas, Pillow, PyYAML) and cloudpickle, which reads its
    python_model.pkl, each pinned to the version that logged it: an environment built from them later gets no newer
    release of any."""
    backend = keras.backend.backend()  # backend names are package names
    packages = (backend, *(("jaxlib",) if backend == "jax" else ()), "keras", "mlflow", "cloudpickle", "numpy",
                "pandas", "pillow", "pyyaml")
    return [f"{pkg}=={version(pkg)}" for pkg in dict.fromkeys(packages)]
