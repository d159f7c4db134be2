"""Step 3, evaluate: score a logged model on the whole test split (no truncation by steps).

Reads:  a model URI (from train) and a prepared dataset URI (from prepare).
Writes: metrics `test_loss` (cross-entropy, without the L2 term), `test_acc`, `test_images` (how many it
        scored), `test_images_in_train` (how many of those the model was trained on, pixel for pixel: register
        moves no alias on a score that counts any), `test_acc_<class>` on this run and on the logged model,
        and tag `test_data_sha256` (the scored test split's digest) on both, `dataset_sha256` (the dataset file's
        bytes, a local file's or a `runs:/` artifact's) on the run; artifacts `metrics.json` (with the URI given
        and `scored_model_uri`, the logged model it named when scored),
        `confusion_matrix.csv`, `confusion_matrix.png`, `predictions.png` (sample test images with predicted and
        true labels, the seed's prediction demo).
Returns the metrics dict. Loading the model and recording the results: `pipeline.tracking.steps`. On its own
(`-e evaluate`), it reads and checks the model and the dataset before it opens a run: a URI naming no model, a model
that is no image classifier, one not logged whole (FAILED, PENDING), one whose run is in MLflow's trash or one of other
classes is one line, exit 2; so is a dataset of a run in MLflow's trash. A model giving NaN or infinite probabilities
(a diverged model) fails the step, exit 3, before any score is recorded.
Register runs `run` too, in an evaluate run of its own, to score a champion on a challenger's test data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from pipeline import config, data, prepare
from pipeline.data import Dataset
from pipeline.inputs import refuse_unusable_backend
from pipeline.tracking import StepFailed, artifact_dir, cli, log_params, registry, step_run, steps
from pipeline.tracking.resume import dataset_sha256, step_lock

if __name__ == "__main__":  # a backend Keras cannot load: one line, exit 2, before Keras loads below
    refuse_unusable_backend()

import keras  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend


def score(probs: np.ndarray, dataset: Dataset) -> tuple[dict, pd.DataFrame]:
    """Metrics and the confusion matrix (rows: true class, columns: predicted) from probabilities."""
    y_true, y_pred = dataset.y_test, probs.argmax(axis=1)
    names = list(dataset.class_names)
    loss = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(y_true, probs))
    confusion = pd.crosstab(pd.Categorical.from_codes(y_true, names), pd.Categorical.from_codes(y_pred, names),
                            rownames=["true"], colnames=["predicted"], dropna=False)
    counts = confusion.sum(axis=1).to_numpy()
    per_class = pd.Series(np.diag(confusion) / np.maximum(counts, 1), index=names)[counts > 0]  # a class without
    metrics = {"test_loss": float(loss.mean()), "test_acc": float((y_true == y_pred).mean()),  # images: no score
               "test_images": len(y_true), "per_class_acc": {k: float(v) for k, v in per_class.items()}}
    return metrics, confusion


# The confusion matrix's plot writes each cell's count up to this many classes, and the class names up to LABELLED; a
# cell is CELL_INCHES wide (the figure at least 7x6 inches, the seed's). Every count of 100 classes (CIFAR-100 as an
# image folder) took evaluate 19 s to draw on a 2-core AMD EPYC (2026-12), unreadable in 7x6 inches; of 200, 97 s; of
# 1,000, hours. The counts are all in confusion_matrix.csv.
ANNOTATED, LABELLED, CELL_INCHES = 30, 100, 0.3


def plot_confusion(confusion: pd.DataFrame, path: Path) -> None:
    counts, n = confusion.to_numpy(), len(confusion)
    side = max(6.0, CELL_INCHES * n) if n <= LABELLED else 12.0  # unlabelled: a pixel or so a class at 120 dpi
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(counts, cmap="Blues")
    if n <= LABELLED:
        ax.set_xticks(range(n), confusion.columns, rotation=45, ha="right")
        ax.set_yticks(range(n), confusion.index)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= ANNOTATED:
        for (i, j), count in np.ndenumerate(counts):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > counts.max() / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(dataset: Dataset, probs: np.ndarray, n: int, path: Path) -> None:
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        pred, true = probs[i].argmax(), dataset.y_test[i]
        ax.imshow(dataset.x_test[i])
        ax.set_title(f"{dataset.class_names[pred]} {probs[i, pred]:.0%}\n(true: {dataset.class_names[true]})",
                     fontsize=8, color="green" if pred == true else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def test_images_in_train(model_uri: str, dataset_uri: str, dataset: Dataset) -> int:
    """How many of `dataset`'s test images the model was trained on: the training split (held-out validation
    images included: train.validation_fraction takes them from it) of the dataset its training run names, which
    may be another than the one scored (a model trained on a copy with test images in train/, scored on the
    cleaned copy, scores them as unseen); the scored dataset's own where the run names none or it is gone."""
    trained_on = steps.training_dataset_uri(model_uri)
    x_train = dataset.x_train
    if trained_on and trained_on != dataset_uri:
        try:
            x_train = prepare.load_dataset(trained_on).x_train
        except data.DataError as exc:
            print(f"note: cannot read the dataset {model_uri} was trained on ({exc}): test images are looked for "
                  f"in the training split of {dataset_uri}", file=sys.stderr)
    return data.test_images_in_train(x_train, dataset.x_test)


def check_classes(classifier, dataset: Dataset, model_uri: str) -> None:
    """ConfigError naming `model_uri` where the model was trained on other classes than `dataset` has (a score
    against other labels means nothing), or is no image classifier that names its classes and scores pixels
    (`predict_proba`: a model logged otherwise)."""
    if not hasattr(classifier, "class_names"):
        raise config.ConfigError(f"model_uri: {model_uri} is not an image classifier this pipeline logged (a "
                                 f"{type(classifier).__name__}): evaluate cannot score it")
    if list(classifier.class_names) != list(dataset.class_names):
        reordered = sorted(classifier.class_names) == sorted(dataset.class_names)  # ten names to compare by eye
        fix = ("the same classes in another order: give its labels in the model's order (label i is the model's class "
               "i)" if reordered else "give a dataset of its classes")
        raise config.ConfigError(f"model_uri: {model_uri} was trained on the classes {list(classifier.class_names)}, "
                                 f"the dataset has {list(dataset.class_names)}: {fix}")
    if not callable(getattr(classifier, "predict_proba", None)):  # another's Python model that names classes
        raise config.ConfigError(f"model_uri: {model_uri} is not an image classifier this pipeline logged (a "
                                 f"{type(classifier).__name__}): evaluate cannot score it")


def check_finite(probs: np.ndarray, model_uri: str) -> None:
    """StepFailed where some probabilities are NaN or infinite (a diverged model): argmax reads a NaN row as class 0,
    and the test_acc would be that class's share of the images, a real-looking accuracy for register to take."""
    bad = int((~np.isfinite(probs)).any(axis=1).sum())
    if bad:
        raise StepFailed(f"model_uri: {model_uri} gives NaN or infinite probabilities for {bad} of {len(probs)} test "
                         f"images, as a model whose training diverged does: no score recorded, nothing to register; "
                         f"train it again with a lower train.lr")


def run(cfg: config.Config, model_uri: str, dataset_uri: str, *, dataset: Dataset | None = None,
        classifier=None, logged_model: str | None = None) -> dict:
    """Evaluate inside the active run; return the metrics. `dataset` and `classifier`: the dataset at `dataset_uri`
    and the model at `model_uri`, where the caller has read them already (register, scoring its champion on a
    challenger's test data, checks both before it opens a run); `logged_model`: the id of the logged model the caller
    loaded `classifier` from (`steps.logged_model_id`), which the scores land on: `models:/name@alias` read again
    after scoring may name another model (a register moved the alias meanwhile), whose page would show this score."""
    dataset = prepare.load_dataset(dataset_uri) if dataset is None else dataset
    if classifier is None or logged_model is None:
        logged_model = steps.logged_model_id(model_uri)
    classifier = steps.load_classifier(model_uri, logged_model) if classifier is None else classifier
    scored = f"models:/{logged_model}" if logged_model else model_uri  # the model loaded, whatever the URI names now
    if scored != model_uri:  # an alias moves, a version is deleted: which model the scores are of (register says so)
        print(f"model_uri: {model_uri} is {scored}")
    check_classes(classifier, dataset, model_uri)
    trained = steps.model_data_digest(logged_model)  # other data is scored (a cleaned copy), but not unannounced
    if trained and trained != (scored_data := dataset.digest())[:len(trained)]:  # hashed once: ~180 MB for CIFAR-10
        print(f"note: {model_uri} was trained on other data than {dataset_uri} (dataset digest {trained[:12]}, this "
              f"one {scored_data[:12]})", file=sys.stderr)
    tta = getattr(classifier, "tta", "none")  # fixed when the model was logged (evaluate.tta of its train run)
    if cfg.evaluate.tta != tta:  # its test_acc must be the served model's, which the registry compares
        print(f"note: evaluate.tta={cfg.evaluate.tta} not applied: {model_uri} was logged with test-time "
              f"augmentation {tta}, and is scored as it is served", file=sys.stderr)
    probs = classifier.predict_proba(dataset.x_test, batch_size=cfg.evaluate.batch_size)
    check_finite(probs, model_uri)
    metrics, confusion = score(probs, dataset)
    metrics["test_images_in_train"] = test_images_in_train(scored, dataset_uri, dataset)
    # test_images too: the UI then tells a score on a subset from one on the whole split by more than a digest
    flat = {key: metrics[key] for key in ("test_loss", "test_acc", "test_images", "test_images_in_train")}
    flat.update({f"test_acc_{k}": v for k, v in metrics["per_class_acc"].items()})
    params = {"model_uri": model_uri, "dataset_uri": dataset_uri, "evaluate.batch_size": cfg.evaluate.batch_size,
              "evaluate.tta": tta}
    log_params(params)  # which model and data: a run stopped before its scores names them too
    # the artifacts first, the scores last: stopped (Ctrl-C, SIGTERM) while it draws, a KILLED run leaves no score on
    # itself or on the model's page, where it read as an evaluation of the model
    with artifact_dir() as folder:
        (folder / "metrics.json").write_text(json.dumps({**metrics, "model_uri": model_uri, "scored_model_uri": scored},
                                                        indent=2))
        confusion.to_csv(folder / "confusion_matrix.csv", index_label="true \\ predicted")  # rows \ columns
        plot_confusion(confusion, folder / "confusion_matrix.png")
        plot_samples(dataset, probs, min(cfg.evaluate.samples, len(probs)), folder / "predictions.png")
    scored_on = steps.log_dataset_input(dataset_uri, "test", dataset)  # the UI's Dataset column: which data it scored
    # the file's bytes too: compare finds this evaluation of the data a model trained on by them, however the two
    # commands spelled its path (`./d.npz`, `d.npz`, its absolute path, a file:// URI) or named it (a copy of a prepare
    # run's artifact, the `runs:/` URI)
    steps.log_evaluation(params, flat, scored, dataset.digest(test_only=True), dataset_sha256(dataset_uri), scored_on)
    # flip_shift fills its shifted views' border as the model's training shifts did (models logged before: nearest)
    border = f", borders {getattr(classifier, 'shift_fill', 'nearest')}" if tta == "flip_shift" else ""
    print(f"test_acc {metrics['test_acc']:.4f}  test_loss {metrics['test_loss']:.4f}  "
          f"on all {metrics['test_images']} test images (test-time augmentation: {tta}{border})")
    if metrics["test_images_in_train"]:
        print(f"warning: {metrics['test_images_in_train']} of these {metrics['test_images']} test images are images "
              f"{model_uri} was trained on (the same pixels): test_acc overstates, and register moves no alias on it",
              file=sys.stderr)
    return metrics


def check_given(model_uri: str, dataset_uri: str) -> None:
    """ConfigError naming the key where a URI is empty or blank (`-P model_uri=`: MLflow read an empty model URI as
    the current folder, and the error named its MLmodel file), or a registry URI names no version (`models:/<name>`:
    MLflow looked for a logged model of that id), or no model, version or alias there is, or a `runs:/` URI names no
    model."""
    if not model_uri.strip():
        raise config.ConfigError("model_uri: empty; give models:/m-..., models:/<name>@<alias>, "
                                 "models:/<name>/<version>, runs:/<train run id>/model or a downloaded model's folder")
    if why := steps.bare_id(model_uri):  # a run's or a logged model's id as printed (the UI, the console)
        raise config.ConfigError(f"model_uri: {why}")
    registry.check_names_version(model_uri)  # in the words register uses
    # register's words too for a registry URI naming no model, version or alias (was MLflow's "Registered Model with
    # name=... not found"), and for a runs:/ URI naming no model: a run still training, a path without one (was
    # "Failed to download artifacts from path 'model'"); a folder logged there without a logged model still loads
    if model_uri.startswith("models:/") and not model_uri.endswith("/"):
        registry.registry_version(model_uri)
    if model_uri.startswith("runs:/") and not steps.logged_model_id(model_uri) and not steps.has_model(model_uri):
        raise config.ConfigError(f"model_uri: {model_uri} names no logged model: {steps.why_no_model(model_uri)}")
    if not dataset_uri.strip():
        raise config.ConfigError(f"dataset_uri: empty; give runs:/<prepare run id>/{steps.DATASET_ARTIFACT} or a "
                                 f"prepared dataset's .npz file")


def main() -> None:
    args = config.entry_point_parser("evaluate", __doc__.split("\n")[0]).parse_args()
    cfg = config.load_from_cli(args.params, args.overrides)
    config.note_unread("evaluate", args.overrides)
    check_given(args.model_uri, args.dataset_uri)
    prepare.check_dataset_uri(args.dataset_uri)  # a run in MLflow's trash too
    # Read and checked before any run opens, as register checks its model: a URI naming no model, a model that is
    # no image classifier, one not logged whole or one of other classes is one line, exit 2, and leaves no run
    logged_model = steps.logged_model_id(args.model_uri)  # read once: the model loaded is the one scored
    steps.check_run_not_trashed(args.model_uri, logged_model)
    classifier = steps.load_classifier(args.model_uri, logged_model)
    dataset = prepare.load_dataset(args.dataset_uri)
    check_classes(classifier, dataset, args.model_uri)
    with step_lock() as hold, step_run(cfg, "evaluate") as step:
        hold(step)  # killed, it is left for the next main to end
        run(cfg, args.model_uri, args.dataset_uri, dataset=dataset, classifier=classifier, logged_model=logged_model)


if __name__ == "__main__":
    cli(main)
