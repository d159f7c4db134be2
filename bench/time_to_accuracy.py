"""Time to accuracy of params profiles, run exactly as a user runs them: `mlflow run .` of `main`.

    python -m bench.time_to_accuracy --profiles quick --repeat 3 --data ../shared/datasets/cifar10-jpeg-q75.tar.gz
    python -m bench.time_to_accuracy --profiles quick --seeds 0,1,2 --data ../shared/datasets/cifar10-jpeg-q75.tar.gz

A training run is deterministic given its seed, so `--repeat` measures how the wall time varies and `--seeds`
how the accuracy does too: one run per `train.seed` (`-P overrides=train.seed=S`; the seed draws the initial
weights, the held-out split (unless the profile sets train.validation_seed) and the batch order; the test split
stays the same).

Each run gets a fresh SQLite store (and, on JAX, a fresh compilation cache), so every clock starts from nothing:
`wall_s` runs from the command's start to its exit (prepare, train, evaluate and register included), and
`registered_s` from its start to the registered model version's creation (the registry's timestamp, inside the
register step). For each run it reads back test_acc and the val_acc history, the wall time at which val_acc
first reached 0.5, 0.7, 0.8 and 0.9 (the logged metric's timestamp minus the command's start), and where the wall
time went: the start (command to the prepare step), each step's run from its start to its end, the training epochs
(the logged `epoch_seconds`) within train, and the exit. Writes bench/results/time_to_accuracy.md
(the median per profile, one row per run, the time per phase) and time_to_accuracy.png (val_acc
against wall seconds, one curve per run); `--name` writes them under another name, so a recheck leaves
the committed report as it is. The report is written after every run, marked incomplete until the last: a failed
run (named there, with its reason) or Ctrl-C (one line, exit 130) leaves the finished runs' report so marked, and
each rewrite replaces the whole file at once (Ctrl-C while it is written leaves the one before, never one cut
short). `--extra` passes more `mlflow run` arguments; those that change the entry point (`-e`) or the experiment
(`--experiment-name`, `--experiment-id`) are refused (exit 2): the runs read back are `main`'s in the fresh
store's experiments.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import pandas as pd

from bench.machine import check_results_folder, machine, replace_atomically
from pipeline import config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
THRESHOLDS = (0.5, 0.7, 0.8, 0.9)
STEPS = ("prepare", "train", "evaluate", "register")


def phases(wall: float, spans: dict[str, tuple[float, float]], epoch_seconds: float) -> dict[str, float]:
    """Where one command's `wall` seconds went. spans: each step run's (start, end) in seconds since the
    command started (`prepare` missing when an earlier prepare run was reused); epoch_seconds: the sum of
    train's logged `epoch_seconds`. The phases follow one another, so they add up to `wall`:
    start (the CLI, the interpreter, imports and input checks, up to the first step), the steps
    (train split into its epochs and the rest: model build, inference copy, logging the model), the
    gaps between steps, and exit (after register's run ends). The times they run between are rounded to 0.1 s,
    not the phases themselves: each phase is within 0.1 s, and they add up to `wall` rounded as `wall_s` is."""
    def tenth(seconds: float) -> float:
        return round(seconds, 1)

    wall, epoch_seconds = tenth(wall), tenth(epoch_seconds)
    spans = {step: (tenth(begin), tenth(end)) for step, (begin, end) in spans.items()}
    first = next(spans[s][0] for s in STEPS if s in spans)
    out, gaps, previous_end = {"start_s": first}, 0.0, first
    for step in STEPS:
        begin, end = spans.get(step, (previous_end, previous_end))
        gaps += begin - previous_end
        if step == "train":
            out["train_epochs_s"], out["train_other_s"] = epoch_seconds, end - begin - epoch_seconds
        else:
            out[f"{step}_s"] = end - begin
        previous_end = end
    out["between_steps_s"], out["exit_s"] = gaps, wall - previous_end
    return {key: round(value, 1) for key, value in out.items()}


def run_profile(profile: str, data: str, extra: list[str], seed: int | None = None) -> dict:
    """One `mlflow run` of `main` for params/<profile>.yaml in a fresh store (with `train.seed=seed` unless None);
    its timings and results."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PIPELINE_CHECKPOINT_DIR": f"{tmp}/checkpoints",
               "TF_CPP_MIN_LOG_LEVEL": "3",
               # on JAX, compiling as the first run of a machine does: pipeline's cache (~/.cache) outlives the run,
               # and every run after the first loaded what it compiled
               "JAX_COMPILATION_CACHE_DIR": f"{tmp}/jax"}
        cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
               "-P", f"params=params/{profile}.yaml", *(["-P", f"data={data}"] if data else []),
               *(["-P", f"overrides=train.seed={seed}"] if seed is not None else []), *extra]
        start = time.time()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - start
        if proc.returncode != 0:
            lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
            reason = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
            raise SystemExit(f"{profile}: `mlflow run` failed (exit {proc.returncode}): {reason}")
        client = mlflow.MlflowClient(uri)
        (train,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      "tags.step = 'train'")
        (main,) = client.search_runs([train.info.experiment_id], "tags.step = 'main'")
        history = sorted(client.get_metric_history(train.info.run_id, "val_acc"), key=lambda m: m.step)
        curve = [(m.timestamp / 1000 - start, m.value) for m in history]
        held_out = float(train.data.params.get("train.validation_fraction", 0))
        row = {"profile": profile, "model": train.info.run_name, "seed": int(train.data.params["train.seed"]),
               "epochs": len(history),
               # a profile that holds out no training images validates on the test split itself
               "val_split": f"{held_out:g} of train held out" if held_out else "test split",
               "wall_s": round(wall, 1), "test_acc": main.data.metrics["test_acc"],
               "best_val_acc": max(v for _, v in curve)}
        for threshold in THRESHOLDS:
            row[f"val_acc>={threshold}_s"] = next((round(t, 1) for t, v in curve if v >= threshold), None)
        row["registered_version"] = main.data.tags.get("registered_version")
        # the model version's creation, as the registry stamps it (the fresh store holds this run's only): the
        # register step ends, and the command exits, about a second after it
        version = [v for v in client.search_model_versions() if str(v.version) == row["registered_version"]]
        row["registered_s"] = round(version[0].creation_timestamp / 1000 - start, 1) if version else None
        spans = {r.data.tags["step"]: (r.info.start_time / 1000 - start, r.info.end_time / 1000 - start)
                 for r in client.search_runs([train.info.experiment_id]) if r.data.tags.get("step") in STEPS}
        epochs = sum(m.value for m in client.get_metric_history(train.info.run_id, "epoch_seconds"))
        return {"row": row, "curve": curve,
                "phases": {"profile": profile, "wall_s": row["wall_s"], **phases(wall, spans, epochs)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", default="quick", help="comma-separated params/<name>.yaml files")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--data", default="", help="-P data=... for every run (default: each profile's own)")
    parser.add_argument("--seeds", default="", help="comma-separated train.seed values: one run per seed (and per "
                                                    "--repeat) of each profile (default: each profile's own seed)")
    parser.add_argument("--extra", default="", help="more `mlflow run` arguments, split as a shell splits them, e.g. "
                                                    "\"-P epochs=2 -P overrides='train.lr=0.1 train.nesterov=false'\"")
    parser.add_argument("--name", default="time_to_accuracy",
                        help="the report's file name in bench/results, without .md/.png (default time_to_accuracy): "
                             "a recheck under its own name leaves the committed report as it is")
    args = parser.parse_args()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name) or args.name.endswith((".md", ".png")):
        parser.error(f"--name: a file name without folder or extension, got {args.name!r}")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [None]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    try:  # as a shell splits it: -P overrides="a=1 b=2" is one parameter
        extra = shlex.split(args.extra)
    except ValueError as exc:  # No closing quotation
        parser.error(f"--extra: {exc} in {args.extra!r}")
    refused = refused_extra(extra)
    if refused:  # the runs read back are main's and its steps' in the store's experiments: another entry point or
        # experiment leaves none there to read (an unpack ValueError after the whole run)
        parser.error(f"--extra: {refused} is not for this benchmark, which times `mlflow run` of the `main` entry "
                     f"point in its own store's experiment")
    if args.seeds and "overrides=" in args.extra:
        parser.error("--seeds sets -P overrides=train.seed=S; put other overrides in a params file, not in --extra")
    if args.repeat < 1:
        parser.error(f"--repeat: must be >= 1, got {args.repeat}")
    missing = [p for p in args.profiles.split(",") if not (ROOT / "params" / f"{p}.yaml").is_file()]
    if missing:  # before any run: a later profile would otherwise fail only after the earlier ones' runs
        parser.error(f"--profiles: no params/<name>.yaml for {', '.join(repr(p) for p in missing)}")
    if args.data not in ("", "cifar10", "synthetic") and not (ROOT / args.data).exists():
        # before any run: each run's prepare step said so only after `mlflow run` had started (exit 1)
        parser.error(f"--data: {args.data!r} is neither 'cifar10', 'synthetic' nor an existing path (a relative one "
                     f"from {ROOT}, where `mlflow run` runs)")
    # A seed train.seed refuses (-1) failed each run in its `mlflow run`, exit 1 after the runs before it
    for profile, seed in ((p, s) for p in args.profiles.split(",") for s in seeds):
        try:
            config.load(ROOT / "params" / f"{profile}.yaml", [] if seed is None else [f"train.seed={seed}"])
        except config.ConfigError as exc:
            parser.error(f"--{'profiles' if seed is None else 'seeds'}: {exc}")
    check_results_folder(RESULTS)
    planned = [(p, s) for p in args.profiles.split(",") for s in seeds for _ in range(args.repeat)]
    results = []
    for number, (profile, seed) in enumerate(planned, start=1):
        kept = (f"; {RESULTS / (args.name + '.md')} holds the {len(results)} earlier run(s), marked incomplete"
                if results else "; no results written")
        try:
            try:
                results.append(run_profile(profile, args.data, extra, seed))
            except SystemExit as exc:
                if results:  # the report names the run that failed, and why, not the terminal alone
                    label = profile if seed is None else f"{profile}, seed {seed}"
                    write_report(results, args, len(planned), f"run {number} of {len(planned)} ({label}) failed: {exc}")
                raise SystemExit(f"{exc}{kept}") from None
            print(results[-1]["row"], flush=True)
            # after every run, so an interrupted benchmark keeps what it measured, marked incomplete until the last
            write_report(results, args, len(planned))
        except KeyboardInterrupt:  # Ctrl-C: the report of the runs before this one stays, marked incomplete
            print(f"interrupted during run {number} of {len(planned)} ({profile}){kept}", file=sys.stderr)
            raise SystemExit(130) from None


def table(frame: pd.DataFrame) -> str:
    """`frame` in Markdown, a missing value (a threshold never reached, a time not read back) blank, not `nan`."""
    return frame.astype(object).where(frame.notna(), None).to_markdown(index=False, missingval="")


REFUSED_EXTRA = ("-e", "--entry-point", "--experiment-name", "--experiment-id")


def refused_extra(extra: list[str]) -> str | None:
    """The first `mlflow run` option in `extra` that changes the entry point or the experiment, or None. A value of
    -P or -A (`-P overrides=-e`) is no option."""
    for i, token in enumerate(extra):
        if i and extra[i - 1] in ("-P", "--param-list", "-A", "--docker-args"):
            continue
        name = token.partition("=")[0]
        if name in REFUSED_EXTRA[1:] or (token.startswith("-e") and not token.startswith("--")):
            return REFUSED_EXTRA[0] if name.startswith("-e") else name
    return None


def write_report(results: list[dict], args: argparse.Namespace, planned: int | None = None,
                 failed: str | None = None) -> None:
    """The report of `results`; while fewer than `planned` runs have finished, its title and first line say so, and
    `failed` (which run failed, and why) where one did."""
    planned = planned or len(results)
    why = (f": {failed.rstrip('.')}. The medians are of the runs that finished" if failed
           else " (the benchmark was still running, or was interrupted, when this was written)")
    incomplete = (f"**Incomplete: {len(results)} of the command's {planned} runs finished**{why}; these are not the "
                  "command's results.\n\n" if len(results) < planned else "")
    runs = pd.DataFrame([r["row"] for r in results])
    timed = [key for key in ("wall_s", "registered_s") if key in runs]
    # a run without a value (registered_s not read back) leaves its profile's median blank, not the others'
    medians = runs.groupby("profile", sort=False)[[*timed, "test_acc"]].median(skipna=False).reset_index()
    medians.insert(1, "runs", runs.groupby("profile", sort=False).size().to_numpy())
    medians["test_acc_min"] = runs.groupby("profile", sort=False)["test_acc"].min().to_numpy()
    medians["test_acc_max"] = runs.groupby("profile", sort=False)["test_acc"].max().to_numpy()
    timing = pd.DataFrame([r["phases"] for r in results])

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        seconds, values = zip(*r["curve"], strict=True)
        ax.plot(seconds, values, marker="o", label=f"{r['row']['profile']} #{i + 1} "
                                                   f"(test_acc {r['row']['test_acc']:.3f})")
    ax.set_xlabel("wall seconds since the command started")
    ax.set_ylabel("val_acc")
    ax.set_title(machine() + (f" (incomplete: {len(results)} of {planned} runs)" if incomplete else ""), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = getattr(args, "name", "time_to_accuracy")
    replace_atomically(RESULTS / f"{name}.png", lambda staged: fig.savefig(staged, dpi=120, format="png"))
    plt.close(fig)

    data = args.data or "each profile's data.source"
    text = (f"# Time to accuracy{' (incomplete)' if incomplete else ''}\n\n{incomplete}"
            f"Machine: {machine()}. Date: {datetime.date.today()}. "
            f"`python -m bench.time_to_accuracy --profiles {args.profiles} --repeat {args.repeat}"
            f"{' --seeds ' + args.seeds if args.seeds else ''}{' --data ' + args.data if args.data else ''}"
            f"{f' --extra {args.extra!r}' if args.extra else ''}"
            f"{f' --name {name}' if name != 'time_to_accuracy' else ''}`; "
            f"data: {data}.\n\n"
            "Each row is one `mlflow run . --env-manager local -P params=params/<profile>.yaml` in a fresh "
            "store; `wall_s` runs from the command's start to its exit (prepare, train, evaluate, register, and "
            "the exit after them); `registered_s` from the command's start to the registered model version's "
            "creation, as the registry stamps it (inside the register step; `exit_s` below is what follows that "
            "step). "
            "`val_acc>=x_s`: seconds from the command's start (prepare included) to the logging of the first "
            "epoch's val_acc that reached x; blank where none did; val_acc on the images `val_split` names (training "
            "images held out, or the test split itself where the profile holds none out). "
            "`test_acc`: all test images. `seed`: the run's `train.seed` (initial weights, held-out split unless "
            "`train.validation_seed` is set, batch order); runs with the same seed train the same model.\n\n"
            f"## Median per profile\n\n{table(medians)}\n\n"
            f"## Every run\n\n{table(runs)}\n\n"
            "## Where the time went\n\nSeconds per phase of each run above, in order; they add up to `wall_s`. "
            "`start_s`: from the command's start to the first step's run (the `mlflow run` CLI, the interpreter, "
            "imports, input checks, and the data read before prepare's run opens where none is reused); a step's "
            "seconds run from its run's start to its end; `train_epochs_s`: "
            "the logged `epoch_seconds` (the first includes compiling the train step; each includes the "
            "epoch's validation); `train_other_s`: the rest of train (building the model, the inference copy, "
            "logging the model); `exit_s`: from register's end to the command's exit.\n\n"
            f"{table(timing)}\n\n![val_acc against wall time]({name}.png)\n")
    replace_atomically(RESULTS / f"{name}.md", lambda staged: staged.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
