"""Seconds per training epoch of a params profile on this machine's accelerator, through the same
compile and fit as `pipeline.train` (pipeline.fitting), without MLflow.

For a GPU machine that has JAX but not TensorFlow or MLflow: `bench/gpu.sh` installs the
few pure-Python wheels this needs and runs it with KERAS_BACKEND=jax. Writes JSON with the device,
every epoch's seconds (whole, and of its training steps alone) and val_acc, the steady seconds per epoch (median of
the epochs after the first, which compiles), `train_images_per_second` (the images an epoch trains on over the
steady seconds of its training steps, validation left out: what train's `images_per_second` metric counts) and the
projected time of the profile's full schedule. With `--full`, the
profile runs its whole schedule and is scored on every test image with its own `evaluate.tta`
(test_acc, and the wall seconds of the fit and of the fit after its first, compiling, epoch), and with every
test-time augmentation on the held-out and the test images (tta_scores: choose on val_acc).

A whole schedule longer than one call on the GPU machine (10 minutes at most; params/improved.yaml's 150 epochs)
runs over several with `--checkpoint DIR`: every train.checkpoint_every epochs the training is saved there
(pipeline.fitting.Checkpoint, as `pipeline.train` saves it) with the epochs' history so far, and the next call
with the same arguments goes on from it; the finished run's JSON holds every epoch, `resumed_at` (the epoch each
later call began at) and `parts` (each call's date, device and the programs it loaded from JAX's compilation cache
instead of compiling them), and the folder is removed. `--stop-after SECONDS` ends such a call cleanly at an
epoch's end before the next one would pass that many seconds of the process, the checkpoint saved there (a stage's
hard limit, a SIGINT, would lose the epochs since the last one).

Usage: python -m bench.gpu_epoch --out FILE [--params params/default.yaml]
       [--epochs 3 | --full [--checkpoint DIR [--stop-after SECONDS]]]
       [--overrides "train.precision=mixed_bfloat16 ..."] [--data PATH [--decoded NPZ] | --images 50000]
       [--virtual-cpus N]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import keras
import numpy as np

from bench.machine import cpu_rehearsal_env, write_whole
from pipeline import config, data, fitting, interrupts
from pipeline.augment import normalized_zero, tta_views
from pipeline.config import TTA_MODES
from pipeline.distribute import distribution


def device_kind() -> str:
    """The accelerator's model name as the backend reports it ("NVIDIA H200"), or the host's processor."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.devices()[0].device_kind
    return platform.processor() or platform.machine()


def tta_scores(model, validation, test, batch_size: int, fill: str = "nearest") -> dict[str, dict[str, float]]:
    """Accuracy with each test-time augmentation (pipeline.augment.tta_views) on the held-out training images
    (val_acc, where there are any: the split to choose a mode on) and on the test images (test_acc). fill: the
    train.shift_fill the model trained with, which flip_shift's views fill their border with, as served."""
    zero = normalized_zero(model) if fill == "constant" else None
    scores = {tta: {} for tta in TTA_MODES}
    for name, (x, y) in (("val_acc", validation), ("test_acc", test)):
        if not len(y):
            continue
        views = [model.predict(view, batch_size=batch_size, verbose=0)
                 for view in tta_views(x, "flip_shift", fill, zero)]
        for tta in TTA_MODES:  # flip_shift's views begin with flip's, which begin with none's
            probs = np.mean(views[:len(tta_views(x[:1], tta))], axis=0)
            scores[tta][name] = round(float((probs.argmax(1) == y).mean()), 4)
    return scores


class Partial(keras.callbacks.Callback):
    """After each epoch, `out` as a stage stopped by its time limit leaves it: `partial`, the epochs' seconds so far,
    whole and of their training steps (after `before`'s, those of earlier calls of a run resumed from a checkpoint),
    and `fields` (the date, device and run it measured)."""

    def __init__(self, out: Path, timer: fitting.EpochTimer, fields: dict, before: dict | None = None):
        super().__init__()
        self.out, self.timer, self.fields = out, timer, fields
        self.before = list((before or {}).get("epoch_seconds", []))
        self.before_steps = list((before or {}).get("train_step_seconds", []))

    def on_epoch_end(self, epoch, logs=None):
        write_whole(self.out, {"partial": True, **self.fields, **cache_loads(),
                               "epoch_seconds": [*self.before, *(round(s, 2) for s in self.timer.seconds)],
                               "train_step_seconds": [*self.before_steps,
                                                      *(round(s, 3) for s in self.timer.train_seconds)]})


def cache_loads() -> dict:
    """What JAX's compilation cache spared the training so far (`fitting.compile_cache_loaded`), as train logs it: a
    first epoch that loaded its programs is short by about `compile_seconds_saved`."""
    programs, saved = fitting.compile_cache_loaded()
    return {"compile_cache_programs": programs, "compile_seconds_saved": round(saved, 2)}


class StopBefore(keras.callbacks.Callback):
    """Stops training at an epoch's end when another epoch as long as the last one would end past `deadline`
    (time.monotonic()); `stopped` says whether it did. After this call's first epoch, which compiles (~100 s of
    improved.yaml's, 4.6 s the next), the next one is taken to last `steady` seconds where earlier calls of the run
    measured that: with the first epoch's length a call with a few minutes left stopped after it."""

    def __init__(self, deadline: float, timer: fitting.EpochTimer, steady: float | None = None):
        super().__init__()
        self.deadline, self.timer, self.steady, self.stopped = deadline, timer, steady, False

    def on_epoch_end(self, epoch, logs=None):
        seconds = self.timer.seconds
        estimate = self.steady if self.steady and len(seconds) == 1 else seconds[-1]
        if epoch + 1 < self.params["epochs"] and time.monotonic() + estimate > self.deadline:
            self.model.stop_training = self.stopped = True


class Progress(keras.callbacks.Callback):
    """The history of a run that `--checkpoint` lets go on over several calls, kept beside its checkpoint in
    `progress.json`: what it trains (`identity`), each epoch's seconds, acc and val_acc, and each call's date and
    device. Written before the checkpoint, it may run ahead of it (saved every train.checkpoint_every epochs, and a
    stop may come between the two): `resume` cuts it to the epochs the checkpoint holds."""

    NAME = "progress.json"

    def __init__(self, folder: Path, timer: fitting.EpochTimer, before: dict):
        super().__init__()
        self.folder, self.timer, self.record = folder, timer, before

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        record = self.record
        for key, value in (("epoch_seconds", round(self.timer.seconds[-1], 2)),
                           ("train_step_seconds", round(self.timer.train_seconds[-1], 3)),
                           ("acc", round(float(logs.get("acc", float("nan"))), 4)),
                           ("val_acc", round(float(logs.get("val_acc", float("nan"))), 4))):
            record.setdefault(key, []).append(value)  # train_step_seconds: recorded since 2026-12-06
        record["parts"][-1].update(cache_loads())  # this call's: its first epoch compiled, or loaded what it ran
        self.folder.mkdir(parents=True, exist_ok=True)
        write_whole(self.folder / self.NAME, record)

    # what leaves the training as it is (pipeline.tracking.resume.NOT_TRAINING, and the scoring settings, read after
    # the last epoch): a call may change it and go on.
    # The params file and the overrides count through the config they make, however spelled
    NOT_TRAINING = ("params", "overrides", "train.verbose", "train.checkpoint_every", "evaluate.", "register.",
                    "tracking.")

    @classmethod
    def trained(cls, identity: dict) -> dict:
        """`identity` flat (config keys as in params files: train.lr), less what leaves the training as it is."""
        flat = {**{k: v for k, v in identity.items() if k != "config"},
                **{f"{section}.{key}": value for section, values in identity.get("config", {}).items()
                   for key, value in values.items()}}
        return {k: v for k, v in flat.items() if not k.startswith(cls.NOT_TRAINING)}

    @classmethod
    def resume(cls, folder: Path, identity: dict, part: dict) -> dict:
        """The record to go on with in `folder` (a new one where it holds no checkpoint), `part` added; a
        checkpoint of another run: ValueError."""
        done = fitting.Checkpoint.completed_epochs(folder) if folder.is_dir() else 0
        path = folder / cls.NAME
        if not done:
            return {"identity": identity, "epoch_seconds": [], "train_step_seconds": [], "acc": [], "val_acc": [],
                    "resumed_at": [], "parts": [part]}
        if not path.exists():
            raise ValueError(f"--checkpoint: {folder} holds a checkpoint of {done} epochs without its {cls.NAME}")
        record = json.loads(path.read_text())
        ours, theirs = cls.trained(identity), cls.trained(record.get("identity", {}))
        changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if changed:
            raise ValueError(f"--checkpoint: {folder} holds a run of other " + ", ".join(
                f"{k} ({theirs.get(k, 'absent')} there, {ours.get(k, 'absent')} here)" for k in changed)
                + "; remove it to start afresh")
        for key in ("epoch_seconds", "acc", "val_acc"):
            record[key] = record[key][:done]
        if "train_step_seconds" in record:  # a record begun before they were recorded (2026-12-06) goes on without
            record["train_step_seconds"] = record["train_step_seconds"][:done]
        record["resumed_at"].append(done)
        record["parts"].append(part)
        return record


def steady_seconds(record: dict, key: str = "epoch_seconds") -> float | None:
    """The median seconds (`key`: of whole epochs, or train_step_seconds: of their training steps) of a run's epochs
    but each call's first (it compiles), where it has any."""
    firsts = {0, *record.get("resumed_at", [])}
    steady = [s for i, s in enumerate(record.get(key, [])) if i not in firsts]
    return statistics.median(steady) if steady else None


STARTED = time.monotonic()  # --stop-after counts from here: after the imports, a few seconds into the process


def main() -> None:
    # a stage's time limit stops it with SIGINT (gpu.sh's `timeout --signal=INT`); a shell that starts it in the
    # background hands it SIGINT ignored, and then only the SIGKILL after it would end it. Recorded: Keras may
    # swallow it (pipeline.interrupts). The caller's handler comes back however main ends (a test calls it in-process)
    previous = signal.signal(signal.SIGINT, interrupts.keyboard_interrupt)
    try:
        measure()
    finally:
        if previous is not None:  # None: a handler not installed from Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)


def measure() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params/default.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="the profile's own epochs, then test_acc")
    parser.add_argument("--checkpoint", default="",
                        help="with --full: a folder to save the training in and to go on from in a later call")
    parser.add_argument("--stop-after", type=float, default=0,
                        help="with --checkpoint: stop at the last epoch end before this many seconds of the process")
    parser.add_argument("--overrides", default="")
    parser.add_argument("--data", default="", help="a data source (see pipeline.data); default synthetic images")
    parser.add_argument("--decoded", default="", help="with --data: an .npz of its arrays, decoded once (bench/gpu.sh "
                                                      "for all its stages), read in its place; the record names --data")
    parser.add_argument("--images", type=int, default=50000, help="synthetic training images (test: a fifth)")
    parser.add_argument("--virtual-cpus", type=int, default=0,
                        help="rehearse on N CPU devices, GPUs hidden (as bench.multi_gpu's arms; the process "
                             "starts again with CUDA_VISIBLE_DEVICES='', JAX_PLATFORMS=cpu and XLA's device count)")
    args = parser.parse_args()
    if not args.full and args.epochs < 2:  # the steady time is the median of the epochs after the compiling first
        parser.error(f"--epochs: must be >= 2 (the first epoch compiles), got {args.epochs}")
    if args.checkpoint and not args.full:
        parser.error("--checkpoint: only with --full (a timed run of a few epochs has nothing to go on with)")
    if args.stop_after and not args.checkpoint:
        parser.error("--stop-after: only with --checkpoint (a run stopped without one could not go on)")
    if args.virtual_cpus < 0:  # else TensorFlow with no CPU device at all: a traceback
        parser.error(f"--virtual-cpus: must be 0 (the devices there are) or >= 1, got {args.virtual_cpus}")
    if args.decoded and not args.data:
        parser.error("--decoded: only with --data (the source it was decoded from, which the record names)")
    if args.virtual_cpus:  # the GPUs hidden before CUDA starts: a mirrored or data_parallel run took them
        rehearsal = cpu_rehearsal_env(dict(os.environ), args.virtual_cpus)
        if rehearsal != os.environ:
            os.execve(sys.executable, [sys.executable, "-m", "bench.gpu_epoch", *sys.argv[1:]], rehearsal)
    if args.virtual_cpus and keras.backend.backend() == "tensorflow":  # before anything initialises TensorFlow
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.virtual_cpus)

    # The model is compiled with the profile's own schedule (its lr over the first epochs is the full run's);
    # without --full, fit stops after --epochs of it.
    try:
        full = config.load_from_cli(args.params, args.overrides)
        # one line per epoch in gpu.log, whatever the overrides say (an appended train.verbose=2 would repeat theirs)
        full = dataclasses.replace(full, train=dataclasses.replace(full.train, verbose="2"))
        epochs = full.train.epochs if args.full else args.epochs
        cfg = dataclasses.replace(full, train=dataclasses.replace(full.train, epochs=epochs))
    except config.ConfigError as exc:
        parser.error(str(exc))
    measured = {"date": datetime.date.today().isoformat(), "device_kind": device_kind(),
                "backend": keras.backend.backend(), "host": platform.node(),
                "data": args.data or f"synthetic ({args.images} training images)"}
    before = {}
    if args.checkpoint:  # before the data's ~15 s of decoding: a checkpoint of other settings is refused at once
        folder = Path(args.checkpoint)
        identity = {"params": args.params, "config": json.loads(json.dumps(dataclasses.asdict(full))),
                    "overrides": args.overrides, "data": measured["data"], "backend": measured["backend"]}
        try:
            before = Progress.resume(folder, identity, {key: measured[key] for key in ("date", "device_kind", "host")})
        except ValueError as exc:
            parser.error(str(exc))
    try:
        dataset = (data.load_source(args.decoded or args.data) if args.data
                   else data.make_synthetic(n_train=args.images, n_test=args.images // 5, seed=cfg.data.seed))
    except (config.ConfigError, data.DataError) as exc:
        parser.error(str(exc))
    measured["test_images"] = len(dataset.y_test)
    dist = distribution(cfg.train.distribute)
    splits = fitting.held_out_split(dataset, cfg.train)
    try:
        fitting.check_replica_batches(cfg, dist, splits)
    except config.ConfigError as exc:
        parser.error(str(exc))
    model = fitting.compile_model(full, fitting.training_part(dataset, splits), dist, len(splits[0]))
    timer = fitting.EpochTimer()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # before the epochs: the first one writes there

    callbacks = [timer, Partial(out, timer, {**measured, "params": args.params, "overrides": args.overrides,
                                             "train_images": len(splits[0]), "checkpoint": args.checkpoint}, before)]
    stop = StopBefore(STARTED + args.stop_after if args.stop_after else float("inf"), timer, steady_seconds(before))
    if args.checkpoint:  # the record before the Checkpoint: never behind it (resume cuts what runs ahead)
        progress = Progress(folder, timer, copy.deepcopy(before))
        callbacks += [stop, progress,
                      fitting.Checkpoint(folder, cfg.train.checkpoint_every or 1, keep=True)]  # saves where it stops

    start = time.perf_counter()
    history = fitting.fit(model, cfg, splits, len(dataset.class_names), callbacks)
    fit_seconds = time.perf_counter() - start
    if stop.stopped:  # `partial`'s file says how far it got; the checkpoint holds it
        print(f"stopped after epoch {len(before.get('epoch_seconds', [])) + len(timer.seconds)} of {epochs} "
              f"(--stop-after {args.stop_after:g} s); {args.checkpoint} goes on from there")
        return
    seconds = [*before.get("epoch_seconds", []), *(round(s, 2) for s in timer.seconds)]  # earlier calls' first
    firsts = {0, *before.get("resumed_at", [])}  # each call's first epoch compiles: the steady ones are the others
    steady = steady_seconds({**before, "epoch_seconds": seconds}) or statistics.median(seconds)
    # the training steps alone, as train's images_per_second counts them
    this_call = [round(s, 3) for s in timer.train_seconds]
    if len(before.get("train_step_seconds", [])) == len(seconds) - len(this_call):
        steps = {**before, "train_step_seconds": [*before.get("train_step_seconds", []), *this_call]}
    else:  # resumed from a record begun before they were recorded (2026-12-06): this call's epochs only
        steps = {"train_step_seconds": this_call}
    steady_steps = steady_seconds(steps, "train_step_seconds") or statistics.median(steps["train_step_seconds"])
    trained = fitting.images_per_epoch(cfg.train, len(splits[0]))
    history = {key: [*before.get(key, []), *(round(v, 4) for v in history.history.get(key, []))]
               for key in ("acc", "val_acc")}
    result = {
        **measured, "devices": dist.devices,
        "distribute": dist.mode, "jit_compile": str(model.jit_compile).lower(), "dtype_policy": model.dtype_policy.name,
        "batch_size": cfg.train.batch_size,
        "params": args.params, "overrides": args.overrides, "model": model.name,
        "train_images": len(splits[0]), "epochs": epochs, "epoch_seconds": seconds,
        "acc": history["acc"], "val_acc": history["val_acc"],
        "steady_epoch_seconds": round(steady, 2),
        # images trained per second of training steps, as train's `images_per_second` metric: the images each
        # epoch trains on (train.drop_remainder leaves out the last partial batch) over the median seconds of its
        # training steps, validation left out. (Files before 2026-12-06 held `images_per_second`: the training
        # split's size over the whole epoch's steady seconds, validation included.)
        "train_step_seconds": steps["train_step_seconds"],
        "steady_train_step_seconds": round(steady_steps, 3), "images_per_epoch": trained,
        "train_images_per_second": round(trained / steady_steps),
        # the first epoch as measured (XLA's compiles are part of any run's time), the rest at the steady pace
        "projected_full_schedule_minutes": round((seconds[0] + (full.train.epochs - 1) * steady) / 60, 1),
        "full_schedule_epochs": full.train.epochs,
        # a first epoch that loaded its programs from JAX's compilation cache (an earlier stage compiled them) is
        # short by about that much: the figures say so
        "compile_cache": fitting.compile_cache(), **cache_loads(),
    }
    if args.full:  # score as evaluate does (pipeline.serve needs MLflow, absent here): every image, its TTA, and
        # the model train logs (float32; a bfloat16 training model's own predictions differ in a few images in 1,000)
        held_out = splits[2:] if cfg.train.validation_fraction > 0 else (dataset.x_test[:0], dataset.y_test[:0])
        served = fitting.inference_copy(cfg, fitting.training_part(dataset, splits), model)
        scores = tta_scores(served, held_out, (dataset.x_test, dataset.y_test), cfg.evaluate.batch_size,
                            fill=cfg.train.shift_fill)
        result.update(test_acc=scores[cfg.evaluate.tta]["test_acc"],
                      tta=cfg.evaluate.tta, tta_scores=scores, fit_seconds=round(fit_seconds, 1),
                      fit_seconds_after_first_epoch=round(sum(s for i, s in enumerate(seconds) if i not in firsts), 1))
        if before.get("resumed_at"):  # over several calls: the sum of their epochs (fit's wall is this call's)
            result.update(resumed_at=before["resumed_at"], parts=progress.record["parts"],  # with each one's loads
                          fit_seconds=round(sum(seconds), 1))
    print(json.dumps(result, indent=2))
    write_whole(out, result)
    if args.checkpoint:  # the run is whole and scored: nothing to go on with
        shutil.rmtree(args.checkpoint)


if __name__ == "__main__":
    main()
