"""The training feed: Keras's array feed against the pipeline's (`pipeline.fitting.host_batches`), whole `fit` calls.

Both cut batches of uint8 images held in host memory with tf.data; the pipeline's turns tf.data's autotuning
off. With it on, destroying a tf.data iterator waits for the autotuner's thread, which sleeps between rounds
for up to a minute; Keras destroys the training iterator at the end of every epoch (its array feed makes one
per epoch) and the validation iterator after every validation. This times, per side: the seconds of each epoch
(validation included), and the seconds from the last epoch's end to `fit`'s return ("teardown").

Each side runs in its own child process (a fresh TensorFlow), the sides alternating round after round so that
a busy spell of a shared machine hits both. The quick profile's model and settings (params/quick.yaml), on the
JPEG copy when present. Writes bench/results/feed.json and bench/results/feed.md.

Usage: python -m bench.feed [--rounds 3] [--images 10240] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pandas as pd

from bench.machine import check_results_folder, child_result, save_results, stamp

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = "params/quick.yaml"
SIDES = {"keras": "Keras's array feed (model.fit(x, y, shuffle=True))",
         "pipeline": "the pipeline's feed (pipeline.fitting.fit: host_batches, autotuning off)"}


def child(side: str, images: int, epochs: int) -> dict:
    """Train the quick profile's model for `epochs` on `images` images through `side`'s feed; time it."""
    import keras

    from bench.benchmark import load_images
    from pipeline import config, fitting
    from pipeline.distribute import distribution

    cfg = config.load(PROFILE, [f"train.epochs={epochs}", "train.verbose=0"])
    dataset = load_images(images)
    splits = fitting.held_out_split(dataset, cfg.train)
    model = fitting.compile_model(cfg, dataset, distribution("none"), len(splits[0]))
    timer = fitting.EpochTimer()
    ends: list[float] = []
    marks = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append(time.perf_counter()))
    start = time.perf_counter()
    if side == "pipeline":
        fitting.fit(model, cfg, splits, len(dataset.class_names), [timer, marks])
    else:
        x_train, y_train, x_val, y_val = keras_splits(cfg, splits)
        classes = len(dataset.class_names)
        model.fit(x_train, keras.utils.to_categorical(y_train, classes), batch_size=cfg.train.batch_size,
                  validation_data=(x_val, keras.utils.to_categorical(y_val, classes)), shuffle=True,
                  epochs=epochs, verbose=0, callbacks=[timer, marks])
    returned = time.perf_counter()
    return {"epoch_seconds": [round(s, 2) for s in timer.seconds], "teardown_s": round(returned - ends[-1], 2),
            "fit_s": round(returned - start, 2), "train_images": fitting.images_per_epoch(cfg.train, len(splits[0]))}


def keras_splits(cfg, splits: tuple) -> tuple:
    """`splits` for Keras's array feed, which always ends an epoch with the partial batch: under the profile's
    `train.drop_remainder` its training images cut to whole batches, so that both sides train as many images
    per epoch in as many steps (and neither compiles a second, partial-batch step the other does not)."""
    from pipeline import fitting

    x_train, y_train, x_val, y_val = splits
    n = fitting.images_per_epoch(cfg.train, len(x_train))
    return x_train[:n], y_train[:n], x_val, y_val


def summary(runs: list[dict]) -> dict:
    """Medians over a side's rounds: the first epoch (it compiles the step), the later ones, teardown, fit."""
    later = [s for r in runs for s in r["epoch_seconds"][1:]]
    return {"first_epoch_s": statistics.median(r["epoch_seconds"][0] for r in runs),
            "later_epoch_s_median": statistics.median(later), "later_epoch_s_max": max(later),
            "teardown_s_median": statistics.median(r["teardown_s"] for r in runs),
            "teardown_s_max": max(r["teardown_s"] for r in runs),
            "fit_s_median": statistics.median(r["fit_s"] for r in runs)}


def write_markdown(results: dict, path: Path) -> None:
    rows = [{"feed": SIDES[side], **summary(runs),
             "fit_s per round": ", ".join(f"{r['fit_s']:.0f}" for r in runs),
             "teardown_s per round": ", ".join(f"{r['teardown_s']:.1f}" for r in runs)}
            for side, runs in results["sides"].items()]
    keras_fit, ours_fit = (summary(results["sides"][s])["fit_s_median"] for s in ("keras", "pipeline"))
    train_images = results["sides"]["pipeline"][0]["train_images"]
    path.write_text("\n".join([
        "# Training feed", "",
        f"Machine: {results['machine']}. Date: {results['date']}. `python -m bench.feed --rounds {results['rounds']} "
        f"--images {results['images']} --epochs {results['epochs']}`.", "",
        f"`fit` of the quick profile's model ({PROFILE}) for {results['epochs']} epochs of {train_images} training "
        "images each on both sides (validation after each epoch), one child process per side and round, the sides "
        "alternating. Seconds: `first_epoch_s` includes compiling the train step; `teardown_s` runs from the last "
        "epoch's end to `fit`'s return.", "",
        pd.DataFrame(rows).to_markdown(index=False), "",
        f"- `fit` took **{keras_fit / ours_fit:.2f}x** as long through Keras's array feed as through the pipeline's "
        "(ratio of the medians).", ""]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=10240, help="training images loaded (2%% are held out)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--child", choices=sorted(SIDES), help="internal: time one side, print RESULT <json>")
    args = parser.parse_args()
    if args.rounds < 1 or args.images < 256 or args.epochs < 2:
        parser.error(f"--rounds >= 1, --images >= 256, --epochs >= 2; got {args.rounds}, {args.images}, "
                     f"{args.epochs}")
    if args.child:
        print("RESULT", json.dumps(child(args.child, args.images, args.epochs)), flush=True)
        return
    check_results_folder(RESULTS)
    sides: dict[str, list[dict]] = {side: [] for side in SIDES}
    for round_ in range(args.rounds):
        for side in SIDES:
            sides[side].append(child_result("bench.feed", "--child", side, "--images", str(args.images),
                                            "--epochs", str(args.epochs)))
            print(f"round {round_ + 1}: {side}: {json.dumps(sides[side][-1])}", flush=True)
    results = {**stamp(), "rounds": args.rounds, "images": args.images, "epochs": args.epochs, "sides": sides}
    save_results(RESULTS, "feed", results, write_markdown)


if __name__ == "__main__":
    main()
