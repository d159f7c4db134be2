"""What MlflowEpochLogger records per epoch, checked against what the epoch did."""

import calendar
import re
import time

import keras
import mlflow
import numpy as np


class SlowValidation(keras.callbacks.Callback):
    """Validation (or the EMA BN recalibration before it) that takes `seconds`."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def on_test_begin(self, logs=None):
        time.sleep(self.seconds)


def test_images_per_second_is_training_throughput_and_epoch_seconds_includes_validation(store):
    from pipeline.tracking.training import MlflowEpochLogger

    rng = np.random.default_rng(0)
    x, y = rng.random((64, 4), dtype=np.float32), keras.utils.to_categorical(rng.integers(0, 3, 64), 3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy",
                  metrics=[keras.metrics.CategoricalAccuracy(name="acc")])
    mlflow.set_experiment("e2e")  # artifacts under tmp_path (the store fixture), not ./mlruns
    with mlflow.start_run() as run:
        model.fit(x, y, batch_size=32, epochs=2, validation_data=(x, y), verbose=0,
                  callbacks=[SlowValidation(1.5), MlflowEpochLogger(64)])
    client = mlflow.MlflowClient()
    seconds = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")}
    speed = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "images_per_second")}
    assert seconds[2] >= 1.5  # the whole epoch, validation included
    # the 1.5 s of validation must not count as training time: the rate is over at most the epoch less 1 s of it
    # (not a speed bound: on a loaded machine two steps of this tiny model have taken 2.4 s)
    assert speed[2] > 64 / (seconds[2] - 1.0)


def test_each_epoch_says_when_the_run_should_end_on_the_console_and_in_a_tag(store, capsys):
    """After each epoch: the time left at the median pace of the fit's epochs (its first left out once there is
    another: it compiles), on the console line of verbosity 2 and as tag `expected_end` (once the last epoch ended,
    when it did)."""
    from pipeline.fitting import EpochLine, duration, seconds_left
    from pipeline.tracking.training import EXPECTED_END_TAG, MlflowEpochLogger

    assert seconds_left([], 0, 5) is None
    assert seconds_left([10.0], 1, 3) == 20.0  # one epoch: all there is to go by
    assert seconds_left([10.0, 2.0, 4.0], 3, 5) == 6.0  # the compiling first left out: median 3 s, two epochs left
    assert seconds_left([10.0, 2.0], 4, 4) == 0.0
    assert [duration(s) for s in (42, 1000, 11_100)] == ["42 s", "17 min", "3 h 05 min"]

    def tag_time(value: str) -> float:
        return calendar.timegm(time.strptime(value, "%Y-%m-%d %H:%M:%S UTC"))

    estimates = []

    class ReadTag(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            tags = mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id).data.tags
            estimates.append(tag_time(tags[EXPECTED_END_TAG]) - time.time())

    rng = np.random.default_rng(0)
    x, y = rng.random((64, 4), dtype=np.float32), keras.utils.to_categorical(rng.integers(0, 3, 64), 3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    mlflow.set_experiment("e2e")
    capsys.readouterr()
    with mlflow.start_run() as run:
        model.fit(x, y, batch_size=32, epochs=3, validation_data=(x, y), verbose=0,
                  callbacks=[SlowValidation(2.0), MlflowEpochLogger(64), ReadTag(), EpochLine()])
    lines = capsys.readouterr().out.splitlines()
    seconds = [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run.info.run_id, "epoch_seconds"),
                                       key=lambda m: m.step)]
    # the tag has whole seconds: after epoch 1, two epochs of epoch 1's pace; after 2, one of epoch 2's; then none
    assert abs(estimates[0] - 2 * seconds[0]) < 1.5 and abs(estimates[1] - seconds[1]) < 1.5, (estimates, seconds)
    assert abs(estimates[2]) < 1.5, estimates
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"], lines
    assert re.search(r" - ~\d+ s left, ends ~\d\d:\d\d UTC$", lines[0]) and int(
        re.search(r"~(\d+) s left", lines[0]).group(1)) >= 4, lines  # two epochs of over 2 s each
    assert "left" in lines[1] and "left" not in lines[2], lines

    # under Keras's progress bar (verbosity 1): the time left on a line of its own, after the bar's epoch
    model.fit(x, y, batch_size=32, epochs=2, verbose=1,
              callbacks=[keras.callbacks.ProgbarLogger(), EpochLine(bar=True)])
    out = capsys.readouterr().out
    left = re.findall(r"^~\d+ s left, ends ~\d\d:\d\d UTC$", out, flags=re.MULTILINE)
    assert len(left) == 1 and out.index("Epoch 1/2") < out.index(left[0]) < out.index("Epoch 2/2"), out


def test_confusion_matrix_csv_names_both_axes_rows_true_columns_predicted(store, monkeypatch, tmp_path):
    from pipeline import config, data, evaluate, prepare
    from pipeline.tracking import steps

    dataset = data.make_synthetic(n_train=32, n_test=40, seed=0)

    class EverythingIsClassZero:
        class_names, tta = list(dataset.class_names), "none"

        def predict_proba(self, pixels, batch_size=256):
            probs = np.full((len(pixels), len(self.class_names)), 0.01, np.float32)
            probs[:, 0] = 0.91
            return probs

    monkeypatch.setattr(prepare, "load_dataset", lambda uri: dataset)
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: EverythingIsClassZero())
    mlflow.set_experiment("e2e")  # artifacts under tmp_path (the store fixture), not ./mlruns
    with mlflow.start_run() as run:
        stub_data = tmp_path / "stub-data.npz"  # read by the stub; evaluate digests the file's bytes
        stub_data.write_bytes(b"")
        evaluate.run(config.load("params/tiny.yaml"), "stub-model", str(stub_data))
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/confusion_matrix.csv")
    header, *rows = text.splitlines()
    assert header.split(",") == ["true \\ predicted", *dataset.class_names]
    counts = np.bincount(dataset.y_test, minlength=len(dataset.class_names))
    for row, name, n in zip(rows, dataset.class_names, counts, strict=True):  # every image predicted class 0
        assert row.split(",") == [name, str(n), *["0"] * (len(dataset.class_names) - 1)]


def test_curves_png_marks_whole_epochs_only(monkeypatch, tmp_path):
    import matplotlib.figure
    import pandas as pd

    from pipeline import train

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    train.plot_curves(pd.DataFrame({"epoch": [1, 2, 3], "acc": [0.5, 0.7, 0.8], "val_acc": [0.6, 0.7, 0.9]}),
                      tmp_path / "curves.png")
    ticks = [t for t in saved[0].axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_the_docs_say_what_the_training_loss_contains():
    from tests.conftest import ROOT

    notes = (ROOT / "docs" / "steps.md").read_text().split("Notes on the numbers:")[1].split("\n\n")[0]
    # compile_model's loss is CategoricalCrossentropy(label_smoothing=...) plus the layers' l2 penalties
    assert "label_smoothing" in notes and "L2" in notes and "no smoothing, no L2" in notes
