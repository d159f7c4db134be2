"""Several accelerators on one machine: which `train.distribute` to train with, and whether XLA pays under
TensorFlow's MirroredStrategy (Keras's `jit_compile="auto"` leaves XLA off under any tf.distribute strategy).

    python -m bench.multi_gpu [--params params/fast.yaml] [--epochs 3] [--data PATH | --images 50000]
                              [--backends tensorflow,jax] [--results bench/results]

Each arm is one `bench.gpu_epoch` run in a process of its own (a backend and its devices are fixed at start-up),
the profile's own global batch and schedule, `--epochs` of it (the first compiles, so the speed is the median of
the others):

    tensorflow  one device              train.distribute=none
    tensorflow  MirroredStrategy        train.distribute=mirrored           (XLA off: Keras's auto)
    tensorflow  MirroredStrategy + XLA  train.distribute=mirrored train.jit_compile=true
    jax         one device              train.distribute=none
    jax         DataParallel            train.distribute=data_parallel

The JAX arms compile their train step with XLA as the profile's `train.jit_compile` says (auto: on; false, as in
params/tiny.yaml: Keras runs the step op by op). A backend that is not installed is reported as skipped. Writes
<results>/multi_gpu.json and multi_gpu.md: per arm the devices, XLA (the model's `jit_compile`), steady seconds per
epoch, images/s (trained per second of training steps, as train's `images_per_second`), the speed-up over the same
backend's one device and the last val_acc; then the fastest arm, the choice. Where no arm ran to a result (each
failed, or none is installed), the report says so and the command exits 1. Needs two GPUs or more (exit 2 otherwise;
also, before any arm, for arguments no arm could run with: a params file not found, a bad override, data not found);
`--virtual-cpus N` rehearses every arm on N virtual CPU devices instead, GPUs hidden (its timings mean nothing),
writing nowhere unless `--results` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from bench.machine import check_results_folder, cpu_rehearsal_env, gpu_names, save_results, stamp
from pipeline import config

ROOT = Path(__file__).resolve().parent.parent

ARMS = [  # (backend, arm, overrides)
    ("tensorflow", "one device", "train.distribute=none"),
    ("tensorflow", "MirroredStrategy", "train.distribute=mirrored"),
    ("tensorflow", "MirroredStrategy + XLA", "train.distribute=mirrored train.jit_compile=true"),
    ("jax", "one device", "train.distribute=none"),
    ("jax", "DataParallel", "train.distribute=data_parallel"),
]


def run_arm(backend: str, overrides: str, args: argparse.Namespace) -> dict:
    """One `bench.gpu_epoch` run; its JSON, or {"error": ...} naming how it failed."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    source = ["--data", args.data] if args.data else ["--images", str(args.images)]
    extra = []
    if args.virtual_cpus:  # on the CPU alone: MirroredStrategy and DataParallel take every GPU before any CPU device
        env = cpu_rehearsal_env(env, args.virtual_cpus)
        extra = ["--virtual-cpus", str(args.virtual_cpus)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "arm.json"
        try:
            done = subprocess.run([sys.executable, "-m", "bench.gpu_epoch", "--out", str(out), "--params",
                                   args.params, "--epochs", str(args.epochs), "--overrides",
                                   f"{overrides} {args.overrides}", *source, *extra], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"stopped after --timeout {args.timeout:g} s"}
        result = json.loads(out.read_text()) if out.exists() else {"partial": True}
    if result.get("partial"):
        return {"error": f"exit {done.returncode}: {failure(done.stderr)}"}
    if done.returncode != 0:  # e.g. XLA's CPU devices aborting at exit; the measure itself is whole
        result["error"] = f"exit {done.returncode} after its result"
    return result


def failure(stderr: str) -> str:
    """What a failed arm's stderr says: its Python exception with the lines after it (TensorFlow's message goes on
    below its first line), else its last line (an XLA abort), in one line of at most 300 characters. TensorFlow's
    "Detected at node ... defined at" traceback of the graph's Python, its source pointers and node names come
    between the exception's first line and its cause: they are left out, else the note was that traceback."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.lstrip().startswith("@")]
    raised = [i for i, line in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception): ", line)]
    said = lines[raised[-1]:] if raised else lines[-1:]
    if raised:
        said = [line for line in said if not re.match(r'(Detected at node |File ")', line)]
    text = re.sub(r"\s*(\(defined @ [^)]*\)|\[\[.*?\]\]|\[Op:[^\]]*\])", "", " ".join(said))
    return text.strip()[:300] or "no result"


def table(results: dict) -> pd.DataFrame:
    """One row per arm: what it ran on, its speed and the speed-up over the same backend's one device."""
    rows = []
    for arm in results["arms"]:
        run = arm.get("result") or {}
        rows.append({"backend": arm["backend"], "arm": arm["arm"], "overrides": arm["overrides"],
                     "devices": len(run.get("devices", [])) or None, "XLA": run.get("jit_compile"),
                     "steady s/epoch": run.get("steady_epoch_seconds"),
                     "images/s (train steps)": run.get("train_images_per_second"),
                     "last val_acc": (run.get("val_acc") or [None])[-1],
                     "note": arm.get("skipped") or run.get("error") or ""})
    frame = pd.DataFrame(rows)
    one = frame[frame["arm"] == "one device"].set_index("backend")["steady s/epoch"]
    frame["speed-up"] = [round(one[b] / s, 2) if b in one and pd.notna(one[b]) and pd.notna(s) else None
                         for b, s in zip(frame["backend"], frame["steady s/epoch"], strict=True)]
    return frame


def choice(frame: pd.DataFrame) -> str:
    if frame["steady s/epoch"].isna().all():
        return "no arm ran to a result (see the note column): nothing was measured, nothing to choose"
    measured = frame[frame["steady s/epoch"].notna() & (frame["note"] == "")]
    if measured.empty:
        return "no arm finished cleanly: nothing to choose"
    best = measured.loc[measured["steady s/epoch"].idxmin()]
    return (f"fastest: {best['backend']} {best['arm']} (`{best['overrides']}`), {best['steady s/epoch']} s per "
            f"epoch, {best['speed-up']}x its backend's one device")


def write_markdown(results: dict, path: Path) -> None:
    frame = table(results)
    lines = ["# Several accelerators on one machine", "",
             f"Machine: {results['machine']}; {results['date']}. `python -m bench.multi_gpu {results['command']}`: "
             f"{results['params']}, its global batch, {results['epochs']} epochs per arm (the first compiles; the "
             f"speed is the median of the others).", ""]
    if results.get("virtual_cpus"):
        lines += [f"A rehearsal on {results['virtual_cpus']} virtual CPU devices: the timings mean nothing.", ""]
    if frame["steady s/epoch"].isna().all():
        lines += ["**No arm ran to a result: nothing was measured** (each arm's note says why).", ""]
    lines += [frame.astype(object).where(frame.notna(), "").to_markdown(index=False), "",
              f"Choice: {choice(frame)}.", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params/fast.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--overrides", default="", help="added to every arm's, e.g. train.feed=host")
    parser.add_argument("--data", default="", help="a data source (see pipeline.data); default synthetic images")
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--virtual-cpus", type=int, default=0)
    parser.add_argument("--results", default="")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per arm")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - {backend for backend, _, _ in ARMS})
    if unknown or not backends:
        parser.exit(2, f"error: --backends: {f'unknown {unknown}' if unknown else 'none given'}; known: tensorflow, "
                       f"jax\n")
    # Checked here, not by each arm's bench.gpu_epoch: else every arm fails alike, after its start-up, and a table
    # of failures replaces bench/results/multi_gpu.md.
    if args.epochs < 2:
        parser.exit(2, f"error: --epochs: must be >= 2 (the first epoch compiles), got {args.epochs}\n")
    if args.virtual_cpus != 0 and args.virtual_cpus < 2:
        parser.exit(2, f"error: --virtual-cpus: must be 0 or >= 2 (devices to rehearse on), got {args.virtual_cpus}\n")
    try:  # each arm's run takes its overrides, then these, as one string: a key in both is refused there
        given = {item.partition("=")[0].strip() for item in config.split_overrides(args.overrides)}
    except config.ConfigError as exc:
        parser.exit(2, f"error: --overrides: {exc}\n")
    armed = sorted(given & {item.partition("=")[0] for *_, overrides in ARMS for item in overrides.split()})
    if armed:
        parser.exit(2, f"error: --overrides: {', '.join(armed)} is set by the arms themselves; give other keys\n")
    # each arm's params as its bench.gpu_epoch loads them: a params file not found or a bad value fails every arm
    for backend, _, overrides in ARMS:
        if backend in backends:
            try:
                config.load_from_cli(args.params, f"{overrides} {args.overrides}")
            except config.ConfigError as exc:
                parser.exit(2, f"error: --params/--overrides: {exc}\n")
    if args.data and args.data not in ("cifar10", "synthetic") and not Path(args.data).exists():
        parser.exit(2, f"error: --data: no such file or folder: {args.data}\n")
    if not args.data and args.images < 1:
        parser.exit(2, f"error: --images: must be >= 1, got {args.images}\n")
    if not args.timeout > 0:
        parser.exit(2, f"error: --timeout: must be > 0 seconds, got {args.timeout:g}\n")
    gpus = len(gpu_names())
    if not args.virtual_cpus and gpus < 2:
        parser.exit(2, f"error: found {gpus} GPU(s): several are needed (--virtual-cpus N rehearses on the CPU)\n")
    folder = Path(args.results) if args.results else (None if args.virtual_cpus else ROOT / "bench" / "results")
    if folder is not None:
        check_results_folder(folder)
    results = {**stamp(), "command": " ".join(argv if argv is not None else sys.argv[1:]), "params": args.params,
               "epochs": args.epochs, "virtual_cpus": args.virtual_cpus, "arms": []}
    for backend, arm, overrides in ARMS:
        if backend not in backends:
            continue
        entry = {"backend": backend, "arm": arm, "overrides": overrides}
        if importlib.util.find_spec(backend) is None:
            entry["skipped"] = f"{backend} is not installed"
        else:
            print(f"== {backend} {arm}: {overrides}", flush=True)
            entry["result"] = run_arm(backend, overrides, args)
        results["arms"].append(entry)
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            write_markdown(results, Path(tmp) / "multi_gpu.md")
            print((Path(tmp) / "multi_gpu.md").read_text())
    else:
        save_results(folder, "multi_gpu", results, write_markdown)
    if table(results)["steady s/epoch"].isna().all():  # scripts and CI see the benchmark failed
        first = next((arm.get("skipped") or (arm.get("result") or {}).get("error") for arm in results["arms"]), "")
        written = f"; {folder / 'multi_gpu.md'} says so" if folder else ""
        raise SystemExit(f"error: no arm ran to a result (the first: {first}){written}")


if __name__ == "__main__":
    main()
