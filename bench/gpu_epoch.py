"""Seconds per training epoch of a params profile on this machine's accelerator, through the same
compile and fit as `pipeline.train` (pipeline.fitting), without MLflow.

For a borrowed GPU machine that has JAX but not TensorFlow or MLflow: `bench/gpu.sh` installs the
few pure-Python wheels this needs and runs it with KERAS_BACKEND=jax. Writes JSON with the device,
every epoch's seconds and val_acc, the steady seconds per epoch (median of the epochs after the
first, which compiles) and the projected time of the profile's full schedule. With `--full`, the
profile runs its whole schedule and is scored on every test image with its own `evaluate.tta`
(test_acc, and the wall seconds of the fit and of the fit after its first, compiling, epoch), and with every
test-time augmentation on the held-out and the test images (tta_scores: choose on val_acc).

Usage: python -m bench.gpu_epoch --out FILE [--params params/default.yaml] [--epochs 3 | --full]
       [--overrides "train.precision=mixed_bfloat16 ..."] [--data PATH | --images 50000] [--virtual-cpus N]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import keras
import numpy as np

from pipeline import config, data, fitting
from pipeline.augment import tta_views
from pipeline.config import TTA_MODES
from pipeline.distribute import distribution


def device_kind() -> str:
    """The accelerator's model name as the backend reports it ("NVIDIA H200"), or the host's processor."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.devices()[0].device_kind
    return platform.processor() or platform.machine()


def tta_scores(model, validation, test, batch_size: int) -> dict[str, dict[str, float]]:
    """Accuracy with each test-time augmentation (pipeline.augment.tta_views) on the held-out training images
    (val_acc, where there are any: the split to choose a mode on) and on the test images (test_acc)."""
    scores = {tta: {} for tta in TTA_MODES}
    for name, (x, y) in (("val_acc", validation), ("test_acc", test)):
        if not len(y):
            continue
        views = [model.predict(view, batch_size=batch_size, verbose=0) for view in tta_views(x, "flip_shift")]
        for tta in TTA_MODES:  # flip_shift's views begin with flip's, which begin with none's
            probs = np.mean(views[:len(tta_views(x[:1], tta))], axis=0)
            scores[tta][name] = round(float((probs.argmax(1) == y).mean()), 4)
    return scores


class Partial(keras.callbacks.Callback):
    """After each epoch, `out` as a stage stopped by its time limit leaves it: `partial`, the epochs' seconds so far
    and `fields` (the date, device and run it measured); written whole or not at all (the limit's SIGINT may come
    at any time)."""

    def __init__(self, out: Path, timer: fitting.EpochTimer, fields: dict):
        super().__init__()
        self.out, self.timer, self.fields = out, timer, fields

    def on_epoch_end(self, epoch, logs=None):
        part = self.out.with_name(f".{self.out.name}.part")
        part.write_text(json.dumps({"partial": True, **self.fields,
                                    "epoch_seconds": [round(s, 2) for s in self.timer.seconds]}, indent=2))
        part.replace(self.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params/default.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="the profile's own epochs, then test_acc")
    parser.add_argument("--overrides", default="")
    parser.add_argument("--data", default="", help="a data source (see pipeline.data); default synthetic images")
    parser.add_argument("--images", type=int, default=50000, help="synthetic training images (test: a fifth)")
    parser.add_argument("--virtual-cpus", type=int, default=0,
                        help="split the CPU into N TensorFlow devices (a rehearsal of several; on JAX set "
                             "XLA_FLAGS=--xla_force_host_platform_device_count=N before the process starts)")
    args = parser.parse_args()
    if not args.full and args.epochs < 2:  # the steady time is the median of the epochs after the compiling first
        parser.error(f"--epochs: must be >= 2 (the first epoch compiles), got {args.epochs}")
    if args.virtual_cpus and keras.backend.backend() == "tensorflow":  # before anything initialises TensorFlow
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.virtual_cpus)

    # The model is compiled with the profile's own schedule (its lr over the first epochs is the full run's);
    # without --full, fit stops after --epochs of it.
    try:
        full = config.load_from_cli(args.params, f"{args.overrides} train.verbose=2")
        epochs = full.train.epochs if args.full else args.epochs
        cfg = dataclasses.replace(full, train=dataclasses.replace(full.train, epochs=epochs))
        dataset = (data.load_source(args.data) if args.data
                   else data.make_synthetic(n_train=args.images, n_test=args.images // 5, seed=cfg.data.seed))
    except (config.ConfigError, data.DataError) as exc:
        parser.error(str(exc))
    dist = distribution(cfg.train.distribute)
    splits = fitting.split_validation(dataset, cfg.train.validation_fraction, cfg.train.seed)
    try:
        fitting.check_replica_batches(cfg, dist, splits)
    except config.ConfigError as exc:
        parser.error(str(exc))
    model = fitting.compile_model(full, fitting.training_part(dataset, splits), dist, len(splits[0]))
    timer = fitting.EpochTimer()
    out = Path(args.out)

    measured = {"date": datetime.date.today().isoformat(), "device_kind": device_kind(),
                "backend": keras.backend.backend(), "host": platform.node(),
                "data": args.data or f"synthetic ({args.images} training images)", "test_images": len(dataset.y_test)}
    partial = Partial(out, timer, {**measured, "params": args.params, "overrides": args.overrides,
                                   "train_images": len(splits[0])})

    start = time.perf_counter()
    history = fitting.fit(model, cfg, splits, len(dataset.class_names), [timer, partial])
    fit_seconds = time.perf_counter() - start
    steady = statistics.median(timer.seconds[1:] or timer.seconds)
    result = {
        **measured, "devices": dist.devices,
        "distribute": dist.mode, "jit_compile": str(model.jit_compile).lower(), "dtype_policy": model.dtype_policy.name,
        "batch_size": cfg.train.batch_size,
        "params": args.params, "overrides": args.overrides, "model": model.name,
        "train_images": len(splits[0]), "epochs": epochs, "epoch_seconds": [round(s, 2) for s in timer.seconds],
        "acc": [round(v, 4) for v in history.history.get("acc", [])],
        "val_acc": [round(v, 4) for v in history.history.get("val_acc", [])],
        "steady_epoch_seconds": round(steady, 2),
        "images_per_second": round(len(splits[0]) / steady),
        "projected_full_schedule_minutes": round(full.train.epochs * steady / 60, 1),
        "full_schedule_epochs": full.train.epochs,
    }
    if args.full:  # score as evaluate does (pipeline.serve needs MLflow, absent here): every image, its TTA
        held_out = splits[2:] if cfg.train.validation_fraction > 0 else (dataset.x_test[:0], dataset.y_test[:0])
        scores = tta_scores(model, held_out, (dataset.x_test, dataset.y_test), cfg.evaluate.batch_size)
        result.update(test_acc=scores[cfg.evaluate.tta]["test_acc"],
                      tta=cfg.evaluate.tta, tta_scores=scores, fit_seconds=round(fit_seconds, 1),
                      fit_seconds_after_first_epoch=round(sum(timer.seconds[1:]), 1))
    print(json.dumps(result, indent=2))
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
