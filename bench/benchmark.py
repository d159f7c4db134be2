"""Training-side benchmarks; writes bench/results/benchmark.json and bench/results/benchmark.md.

Measured side by side in one process, so machine noise hits both sides of each comparison:
1. input pipeline images/s: the seed's
   ImageDataGenerator(featurewise_center, featurewise_std_normalization, shifts 0.125, flips).flow
   vs this project's path as `fit` runs it (uint8 arrays in memory, Keras's batching, normalise +
   integer shift + flip in keras.ops inside the XLA-compiled step; a trivial model body, so the
   number is the ceiling the feed puts on training), and vs the augmentation kernel alone;
2. train-step images/s, plain float32 vs the fast-path settings, for the quick profile
   (its ResNet-9) and the seed's ResNet-164;
3. MLflow tracking overhead per epoch: logging on vs off, and the cost of the logging call itself.

Usage: python -m bench.benchmark [--steps N] [--skip-164]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pipeline  # noqa: F401 - before TensorFlow loads: its log level and CPU allocator settings

# isort: split
import keras
import numpy as np
import pandas as pd

from bench.machine import check_results_folder, child_result, machine, replace_atomically, write_text_whole
from pipeline import augment, config, data, fitting
from pipeline.tracking import training

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_JPEG = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg-q75.tar.gz"
BATCH = 128


def load_images(n: int) -> data.Dataset:
    """Real CIFAR-10 (JPEG copy) when present, else synthetic images of the same shape."""
    if SHARED_JPEG.exists():
        return data.load_source(str(SHARED_JPEG)).subset(max_train=n, max_test=1000, seed=0)
    return data.make_synthetic(n_train=n, n_test=1000)


def bench_seed_generator(x: np.ndarray, y: np.ndarray, batches: int) -> float:
    # The seed's legacy generator; Keras 3 only keeps it under keras.src.legacy.
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    gen = ImageDataGenerator(featurewise_center=True, featurewise_std_normalization=True, width_shift_range=0.125,
                             height_shift_range=0.125, horizontal_flip=True)
    gen.fit(x.astype(np.float32))
    flow = gen.flow(x, y, batch_size=BATCH)
    next(flow)
    start = time.perf_counter()
    for _ in range(batches):
        next(flow)
    return batches * BATCH / (time.perf_counter() - start)


def bench_project_augment(x: np.ndarray, batches: int) -> float:
    """The augmentation kernel alone: random batches gathered from a uint8 tensor (on the device where
    there is one), normalised, shifted, flipped; no Keras feed, so an upper bound for the fit path."""
    mean, std = data.Dataset(x, np.zeros(len(x), np.int32), x[:1], np.zeros(1, np.int32), ("a",)).channel_stats()
    images = keras.ops.convert_to_tensor(x)
    mean_t, std_t = keras.ops.convert_to_tensor(mean, "float32"), keras.ops.convert_to_tensor(std, "float32")
    seed = keras.random.SeedGenerator(0)

    def step(images):
        idx = keras.random.randint((BATCH,), 0, len(x), seed=seed)
        batch = (keras.ops.cast(keras.ops.take(images, idx, axis=0), "float32") - mean_t) / std_t
        return augment.shift_flip(batch, max_shift=4, fill="nearest", flip=True, seed=seed)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        step = tf.function(step, jit_compile=True)
    keras.ops.convert_to_numpy(step(images))  # compile
    start = time.perf_counter()
    for _ in range(batches):
        out = step(images)
    keras.ops.convert_to_numpy(out)  # wait for the device
    return batches * BATCH / (time.perf_counter() - start)


def bench_fit_feed(dataset: data.Dataset, steps_per_execution: int, feed: str = "host", epochs: int = 3) -> float:
    """Images/s of `pipeline.fitting.fit` epochs with a trivial model body: the uint8 arrays, the
    chosen feed (host: host_batches on TensorFlow, ArrayBatches on JAX; device: DeviceBatches), the model's
    normalisation and shift/flip layers, one XLA-compiled step per `steps_per_execution` batches. Best epoch after
    the first."""
    cfg = config.load("params/quick.yaml", [f"train.feed={feed}", f"train.steps_per_execution={steps_per_execution}",
                                            f"train.epochs={epochs + 1}", "train.verbose=0"])
    front = fitting.make_model(cfg, dataset)
    x = front.get_layer("augment").output
    x = keras.layers.Dense(10, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(front.input, x)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="categorical_crossentropy", jit_compile=True,
                  steps_per_execution=steps_per_execution)
    splits = (dataset.x_train, dataset.y_train, dataset.x_test[:BATCH], dataset.y_test[:BATCH])
    timer = fitting.EpochTimer()
    fitting.fit(model, cfg, splits, len(dataset.class_names), [timer])
    return fitting.images_per_epoch(cfg.train, len(dataset.x_train)) / min(timer.seconds[1:])  # drop_remainder


def fit_feeds(dataset_size: int) -> dict:
    """images/s of the fit feed, host vs device, steps_per_execution 1 and 16, on this process's backend."""
    dataset = load_images(dataset_size)
    return {f"{feed}_steps_per_execution_{n}": round(bench_fit_feed(dataset, n, feed))
            for feed in ("host", "device") for n in (1, 16)}


def jax_feeds(dataset_size: int) -> dict:
    """`fit_feeds` on the JAX backend, measured in a child process (one backend per process)."""
    return child_result("bench.benchmark", "--fit-feeds", str(dataset_size), env={"KERAS_BACKEND": "jax"},
                        timeout=1200)


def bench_train_step(cfg: config.Config, dataset: data.Dataset, steps: int) -> dict:
    """Seconds of the first (compiling) step and steady images/s of `train_on_batch`."""
    keras.mixed_precision.set_global_policy(cfg.train.precision)
    model = fitting.make_model(cfg, dataset)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="categorical_crossentropy",
                  jit_compile=cfg.train.jit_compile)
    x, y = dataset.x_train[:BATCH], keras.utils.to_categorical(dataset.y_train[:BATCH], 10)
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    keras.mixed_precision.set_global_policy("float32")
    return {"first_step_seconds": round(first, 2), "images_per_second": round(BATCH / statistics.median(times), 1)}


def bench_tracking(dataset: data.Dataset, epochs: int) -> dict:
    """Quick-profile epochs with the MLflow epoch logger on and off (alternating), and the call's cost."""
    import mlflow

    cfg = config.load("params/quick.yaml", ["train.jit_compile=false"])
    x, y = dataset.x_train[:5000], keras.utils.to_categorical(dataset.y_train[:5000], 10)
    model = fitting.make_model(cfg, dataset)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="categorical_crossentropy",
                  metrics=[keras.metrics.CategoricalAccuracy(name="acc")])
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # compile outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("bench")
        with mlflow.start_run():
            on, off = [], []
            for _ in range(epochs):
                for timings, callbacks in ((on, [training.MlflowEpochLogger(len(x))]), (off, [])):
                    start = time.perf_counter()
                    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks)
                    timings.append(time.perf_counter() - start)
            calls = []
            for step in range(20):
                start = time.perf_counter()
                mlflow.log_metrics({k: 0.5 for k in training.EPOCH_METRICS}, step=1000 + step)
                calls.append(time.perf_counter() - start)
        mlflow.set_tracking_uri(None)
    epoch_off, epoch_on, call = statistics.median(off), statistics.median(on), statistics.median(calls)
    return {"epoch_seconds_logging_on": round(epoch_on, 3), "epoch_seconds_logging_off": round(epoch_off, 3),
            "measured_overhead_percent": round(100 * (epoch_on - epoch_off) / epoch_off, 2),
            "log_call_ms_per_epoch": round(1000 * call, 2),
            "log_call_share_of_epoch_percent": round(100 * call / epoch_off, 3),
            "images_per_epoch": len(x)}


def write_markdown(results: dict, path: Path) -> None:
    r = results
    ip = r["input_pipeline"]
    lines = [
        "# Training benchmarks", "",
        f"Machine: {r['machine']}. Keras {r['keras']} on {r['backend']}. Date: {r['date']}.",
        f"Data: {r['data']}. Batch {BATCH}. All numbers from one run of `python -m bench.benchmark`.", "",
        "## 1. Input pipeline (augmented, normalised batches per second)", "",
        pd.DataFrame([
            ["seed: `ImageDataGenerator(...).flow`", f"{ip['seed_image_data_generator']:,.0f}", "1x"],
            ["project, as `fit` runs it (uint8 in memory, normalise + shift/flip in the XLA step), "
             "steps_per_execution 1", f"{ip['fit_feed_steps_per_execution_1']:,.0f}",
             f"{ip['fit_feed_steps_per_execution_1'] / ip['seed_image_data_generator']:.0f}x"],
            ["the same, steps_per_execution 16", f"{ip['fit_feed_steps_per_execution_16']:,.0f}",
             f"**{ip['fit_feed_steps_per_execution_16'] / ip['seed_image_data_generator']:.0f}x**"],
            ["project augmentation kernel alone (uint8 tensor, gather + normalise + shift/flip, XLA)",
             f"{ip['augment_kernel']:,.0f}", f"**{ip['speedup_kernel']:.0f}x** (target >= 50x)"],
        ], columns=["path", "images/s", "vs seed"]).to_markdown(index=False), "",
        f"The `fit` rows run the real feed with a trivial model body: the ceiling the input path puts on "
        f"training on this machine. 150 epochs in 15 min (6 s per 50,000-image epoch) need "
        f"{ip['needed_for_6s_epoch']:,} images/s.", "",
        "The same `fit` path on the JAX backend (a child process), the host feed (batches drawn on the host, each "
        "epoch's order from the seed and the epoch) vs `train.feed=device` "
        "(images held on the device, batches gathered there; without an accelerator the device is host memory "
        "too):", "",
        pd.DataFrame([[feed, *(f"{r['input_pipeline_jax'][f'{feed}_steps_per_execution_{n}']:,}" for n in (1, 16))]
                      for feed in ("host", "device")],
                     columns=["feed", "steps_per_execution 1", "steps_per_execution 16"]).to_markdown(index=False),
        "", "## 2. Train step (`train_on_batch`, steady state after the compiling first step)", "",
        pd.DataFrame([[name, settings, v["first_step_seconds"], v["images_per_second"]]
                      for name, variants in r["train_step"].items() for settings, v in variants.items()],
                     columns=["model", "settings", "first step (s)", "images/s"]).to_markdown(index=False),
    ]
    t = r["tracking"]
    lines += [
        "", "## 3. MLflow tracking overhead (quick profile, SQLite store, median of alternating epochs)", "",
        f"- epoch with logging: {t['epoch_seconds_logging_on']} s, without: {t['epoch_seconds_logging_off']} s "
        f"({t['measured_overhead_percent']:+.2f}%): whole-epoch times on a shared machine vary by more than the "
        f"logging costs, so the direct timing of the logging call below is the figure to trust",
        f"- the per-epoch `log_metrics` call itself: {t['log_call_ms_per_epoch']} ms = "
        f"**{t['log_call_share_of_epoch_percent']}%** of a {t['images_per_epoch']}-image epoch (target <= 1%)", "",
        "## GPU", "", r["gpu"], "",
    ]
    path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed train steps per variant")
    parser.add_argument("--skip-164", action="store_true", help="skip ResNet-164 (~2 min compile each on CPU)")
    parser.add_argument("--gpu-note", default="GPU seconds per epoch are not measured by this script "
                        "(see bench/gpu.sh).")
    parser.add_argument("--fit-feeds", type=int, metavar="N", help="internal: print `fit_feeds(N)` as RESULT <json>")
    args = parser.parse_args(argv)
    if args.steps < 1:  # before minutes of other measurements: no timed step has no median
        parser.error(f"--steps: must be >= 1, got {args.steps}")
    if args.fit_feeds is not None and args.fit_feeds < 1:  # 0 was taken for "not given": the whole benchmark ran
        parser.error(f"--fit-feeds: must be >= 1 images, got {args.fit_feeds}")
    return args


def main() -> None:
    args = parse_args()
    if args.fit_feeds is not None:
        print("RESULT", json.dumps(fit_feeds(args.fit_feeds)))
        return
    check_results_folder(RESULTS)

    dataset = load_images(10000)
    results = {
        "machine": f"{machine()} ({platform.platform()})",
        "keras": keras.__version__, "backend": keras.backend.backend(), "date": datetime.date.today().isoformat(),
        "data": "CIFAR-10 (JPEG q75 copy), 10k training images" if SHARED_JPEG.exists() else "synthetic images",
        "gpu": args.gpu_note,
    }
    seed_rate = bench_seed_generator(dataset.x_train, dataset.y_train, batches=40)
    kernel = bench_project_augment(dataset.x_train, batches=400)
    feed = {n: bench_fit_feed(dataset, n) for n in (1, 16)}
    results["input_pipeline"] = {
        "seed_image_data_generator": round(seed_rate),
        "fit_feed_steps_per_execution_1": round(feed[1]), "fit_feed_steps_per_execution_16": round(feed[16]),
        "augment_kernel": round(kernel),
        "speedup_fit_feed": round(max(feed.values()) / seed_rate, 1), "speedup_kernel": round(kernel / seed_rate, 1),
        "needed_for_6s_epoch": round(50000 / 6)}
    results["input_pipeline_jax"] = jax_feeds(10000)
    print(json.dumps(results["input_pipeline_jax"]), flush=True)
    print(json.dumps(results["input_pipeline"]))

    variants = {"float32, no XLA (plain)": ["train.precision=float32", "train.jit_compile=false"],
                "float32 + XLA": ["train.precision=float32", "train.jit_compile=true"],
                "mixed_bfloat16, no XLA": ["train.precision=mixed_bfloat16", "train.jit_compile=false"],
                "mixed_bfloat16 + XLA": ["train.precision=mixed_bfloat16", "train.jit_compile=true"]}
    widths = "-".join(str(w) for w in config.load("params/quick.yaml").model.widths)
    profiles = {f"quick (ResNet-9, widths {widths})": "params/quick.yaml"}
    if not args.skip_164:
        profiles["seed (ResNet-164)"] = "params/default.yaml"
    results["train_step"] = {}
    for name, params in profiles.items():
        chosen = variants if name.startswith("quick") else dict(list(variants.items())[:2])
        results["train_step"][name] = {}
        for label, overrides in chosen.items():
            results["train_step"][name][label] = bench_train_step(config.load(params, overrides), dataset, args.steps)
            print(name, label, results["train_step"][name][label], flush=True)

    results["tracking"] = bench_tracking(dataset, epochs=3)
    print(json.dumps(results["tracking"]))
    RESULTS.mkdir(exist_ok=True)
    write_text_whole(RESULTS / "benchmark.json", json.dumps(results, indent=2))
    replace_atomically(RESULTS / "benchmark.md", lambda staged: write_markdown(results, staged))
    print(f"wrote {RESULTS / 'benchmark.md'}")


if __name__ == "__main__":
    main()
