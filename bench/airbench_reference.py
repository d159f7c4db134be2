"""The reference for params/fast.yaml: airbench94, a published recipe that reaches 94% on the official CIFAR-10 (94.01%,
the mean of 1,000 runs by its author), or its larger airbench95 and airbench96 (`--recipe`), trained and scored on the
data bench/gpu.sh gives fast.yaml: whether 0.94 is in reach of a known recipe on that data at all, and at what cost
(fast.yaml levels off near 0.91 on the JPEG q75 copy).

It runs the `airbench` package from PyPI unchanged (PyTorch on a CUDA GPU; the GPU machines' image has PyTorch and
torchvision, not airbench): its sdist, fetched here once with `pip download --no-deps airbench==0.1.8 -d .whl`, is
carried and unpacked into a folder of the call's own. airbench reads the images from `cifar10/train.pt` and
`cifar10/test.pt` under the working directory (downloading them where they are missing, impossible there): this writes
them from the data, with the training images shuffled once (the official batches hold no class order, and airbench
fits its whitening layer on the first 5,000; an image folder lists its images class by class).

One untimed run first (cuDNN's autotuning, PyTorch's first kernel loads), then `--runs` timed runs, each from
`airbench.train94`'s (train95's, train96's) call to its return (the network built, the whitening fitted and the first
epoch's image preparation included, as airbench counts them but the first two; its per-epoch scoring off, as airbench
leaves it out of its time); with `--runs 0` the first alone, its seconds `cold`. Every run, the first too, is scored
on every test image with airbench's three test-time augmentations (none, mirror, mirror and 1-pixel translations: its
own figure is the last's). Writes JSON that bench.gpu_report shows beside the stages of fast.yaml, after every run
(`partial` until the last: a stage stopped by its time limit keeps the runs it finished), with a line `Run N/M` in the
console for gpu.log.

Usage: python -m bench.airbench_reference --out FILE --package .whl/airbench-0.1.8.tar.gz
       [--recipe 94 | 95 | 96] [--data PATH [--decoded NPZ] | --images 512] [--runs 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import write_whole
from pipeline import data

TTA_LEVELS = ("none", "mirror", "mirror_translate")  # airbench.evaluate's tta_level 0, 1, 2
# each recipe's accuracy on the official CIFAR-10 as its author states it (the first line of its module), with
# mirror_translate TTA
CLAIMED = {94: "94.01% (mean of 1,000 runs)", 95: "95.01% (mean of 200 runs)", 96: "96.05% (mean of 200 runs)"}


def shuffled_training(dataset: data.Dataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training images and labels in one fixed random order (`seed`), as the official batches hold them."""
    order = np.random.default_rng([seed, 0xA1B]).permutation(len(dataset.y_train))
    return dataset.x_train[order], dataset.y_train[order]


def airbench_files(dataset: data.Dataset, seed: int) -> dict[str, dict]:
    """What airbench's CifarLoader reads from `cifar10/{train,test}.pt` (there as torch tensors): uint8 NHWC images,
    int64 labels and the class names, the training split shuffled (shuffled_training)."""
    x_train, y_train = shuffled_training(dataset, seed)
    return {name: {"images": np.ascontiguousarray(x), "labels": y.astype(np.int64),
                   "classes": list(dataset.class_names)}
            for name, x, y in (("train", x_train, y_train), ("test", dataset.x_test, dataset.y_test))}


def package_members(sdist: Path) -> list[tarfile.TarInfo]:
    """The `airbench` package's modules in `sdist` (its .tar.gz from PyPI); ValueError naming what is wrong."""
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and m.name.endswith(".py") and "/airbench/" in f"/{m.name}"]
    except tarfile.TarError:
        raise ValueError(f"--package: {sdist}: not a readable .tar.gz") from None
    except OSError as exc:
        raise ValueError(f"--package: {sdist}: not a readable .tar.gz ({exc.strerror})") from None
    if not members:
        raise ValueError(f"--package: {sdist} holds no airbench/*.py (an airbench sdist from PyPI?)")
    return members


def unpack_package(sdist: Path, into: Path) -> Path:
    """The folder holding the `airbench` package of `sdist`, its modules unpacked into `into`."""
    members = package_members(sdist)
    with tarfile.open(sdist) as tar:
        tar.extractall(into, members=members, filter="data")
    return into / Path(members[0].name).parent.parent


def summary(runs: list[dict], claimed_level: str = "mirror_translate") -> dict:
    """The medians: seconds over the timed runs (the untimed first's alone where it is the only one: `cold`),
    test_acc with each test-time augmentation over every run, the first included (a whole training too; test_acc:
    airbench's own figure's, `claimed_level`)."""
    scores = {tta: {"test_acc": round(statistics.median(run["test_acc"][tta] for run in runs), 4)}
              for tta in TTA_LEVELS}
    timed = [run["seconds"] for run in runs if run["timed"]]
    return {"fit_seconds": round(statistics.median(timed or [runs[0]["seconds"]]), 2), "cold": not timed,
            "test_acc": scores[claimed_level]["test_acc"], "tta": claimed_level, "tta_scores": scores,
            "test_acc_min": min(run["test_acc"][claimed_level] for run in runs),
            "test_acc_max": max(run["test_acc"][claimed_level] for run in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--package", required=True, help="airbench's sdist (.tar.gz) from PyPI")
    parser.add_argument("--data", default="", help="a data source (see pipeline.data); default synthetic images")
    parser.add_argument("--decoded", default="", help="with --data: an .npz of its arrays, decoded once (bench/gpu.sh "
                                                      "for all its stages), read in its place; the record names --data")
    parser.add_argument("--images", type=int, default=50000, help="synthetic training images (test: a fifth)")
    parser.add_argument("--recipe", type=int, choices=sorted(CLAIMED), default=94, help="airbench94, 95 or 96")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the untimed first (0: the first alone)")
    parser.add_argument("--seed", type=int, default=0, help="the training images' one shuffle")
    args = parser.parse_args()
    if args.runs < 0:
        parser.error(f"--runs: must be >= 0, got {args.runs}")
    if args.decoded and not args.data:
        parser.error("--decoded: only with --data (the source it was decoded from, which the record names)")
    if not Path(args.package).is_file():
        parser.error(f"--package: {args.package}: no such file (pip download --no-deps airbench==0.1.8 -d .whl)")
    try:
        package_members(Path(args.package))
    except ValueError as exc:
        parser.error(str(exc))
    try:
        dataset = (data.load_source(args.decoded or args.data) if args.data
                   else data.make_synthetic(n_train=args.images, n_test=args.images // 5, seed=args.seed))
    except data.DataError as exc:
        parser.error(str(exc))
    if len(dataset.class_names) != 10:  # airbench's network ends in 10 outputs
        parser.error(f"--data: airbench classifies 10 classes, the data has {len(dataset.class_names)}")

    out = Path(args.out).resolve()  # before the chdir below
    out.parent.mkdir(parents=True, exist_ok=True)
    work, cwd = Path(tempfile.mkdtemp(prefix="airbench-")), os.getcwd()
    try:
        print(json.dumps(measure(dataset, args, work, out), indent=2))
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


def measure(dataset: data.Dataset, args: argparse.Namespace, work: Path, out: Path) -> dict:
    """The recipe's untimed first run and its timed ones, in `work` (its package and its cifar10/ go there), their
    record written to `out` after each (`partial` until the last)."""
    import torch

    sys.path.insert(0, str(unpack_package(Path(args.package), work / "package")))
    (work / "cifar10").mkdir()
    for name, arrays in airbench_files(dataset, args.seed).items():
        torch.save({"images": torch.from_numpy(arrays["images"]), "labels": torch.from_numpy(arrays["labels"]),
                    "classes": arrays["classes"]}, work / "cifar10" / f"{name}.pt")
    os.chdir(work)  # airbench reads ./cifar10
    import airbench

    recipe = importlib.import_module(f"airbench.lib_airbench{args.recipe}")
    train, hyp = getattr(recipe, f"train{args.recipe}"), recipe.hyp

    loader = airbench.CifarLoader("cifar10", train=True, batch_size=hyp["opt"]["batch_size"], aug=hyp["aug"],
                                  altflip=True)
    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)

    def trained() -> tuple:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model = train(loader, verbose=False)
        torch.cuda.synchronize()
        return model, time.perf_counter() - start

    described = {
        "date": datetime.date.today().isoformat(), "device_kind": torch.cuda.get_device_name(0),
        "backend": f"torch {torch.__version__}", "host": platform.node(),
        "reference": f"airbench{args.recipe} ({Path(args.package).name.removesuffix('.tar.gz')}, unchanged): "
                     f"{CLAIMED[args.recipe]} on the official CIFAR-10 by its author, mirror_translate TTA",
        "params": f"airbench{args.recipe} (reference)", "overrides": "", "model": f"airbench{args.recipe}",
        "data": args.data or f"synthetic ({args.images} training images)", "test_images": len(dataset.y_test),
        "train_images": len(dataset.y_train), "epochs": hyp["opt"]["train_epochs"],
        "batch_size": hyp["opt"]["batch_size"], "runs_planned": args.runs + 1,
    }
    runs, record = [], {}
    for run in range(args.runs + 1):  # the first untimed: cuDNN's autotuning and the first kernel loads
        model, seconds = trained()
        runs.append({"timed": run > 0, "seconds": round(seconds, 2),
                     "test_acc": {tta: round(airbench.evaluate(model, test, tta_level=level), 4)
                                  for level, tta in enumerate(TTA_LEVELS)}})
        print(f"Run {run + 1}/{args.runs + 1}: {json.dumps(runs[-1])}", flush=True)  # gpu.log: the stage wrote
        # every run's file as it goes: a stage stopped at its time limit keeps the runs it finished
        record = {**described, "runs": runs, **summary(runs), **({"partial": True} if run < args.runs else {})}
        write_whole(out, record)
    return record


if __name__ == "__main__":
    main()
