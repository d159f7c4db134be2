"""Whether two versions of the code train the same step: a profile's traced TensorFlow train step at each git
revision, node by node.

A 2-core CPU's images/s drifts by several percent within half an hour (docs/results.md, "Re-measured since"), as much
as most changes would move it, so an A/B of wall times cannot tell whether a change touched the training step. Its
graph can: the step (the in-model augmentation, the forward pass, the loss, the gradients, the optimizer's update)
traced at each revision, on one device, in a fresh process. Equal graphs (every node's name, op, inputs and
attributes: dtypes, shapes, constants) run the same kernels; otherwise the report lists the ops whose counts differ,
or the nodes that differ. Anything outside the step (the input feed, the callbacks between steps) is not in it.

Usage: python -m bench.step_graph REV [REV ...] [--params params/quick.yaml] [--overrides "k=v ..."] [--name NAME]
A REV is anything `git rev-parse` reads (a commit, a tag, HEAD~3), or `.` for the working tree as it is, edits and
all. The first is the baseline. Each revision's tree (but `.`) is read with `git archive` into a temporary folder; this
module (the current checkout's) traces it there, with that revision's `pipeline`. The default overrides trace the
step the Zen 4 trains the quick profile with (bfloat16, no XLA: `auto`'s choice there), on any machine: only tracing,
no timing. Writes bench/results/<name>.md and .json (name: step_graph).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_OVERRIDES = "train.precision=mixed_bfloat16 train.jit_compile=false"
TRAIN_IMAGES = 39168  # what the quick profile trains on (its lr schedule's steps per epoch follow it)


def child(params: str, overrides: str) -> dict:
    """The train step of `params` + `overrides` traced in this process, with the `pipeline` it imports: its nodes'
    digest and op counts."""
    import keras
    import tensorflow as tf

    from pipeline import config, data, fitting
    from pipeline.distribute import distribution

    keras.backend.clear_session()  # layer names numbered from the start, as in a fresh process
    cfg = config.load(params, shlex.split(overrides))
    dataset = data.make_synthetic(n_train=256, n_test=64)
    model = fitting.compile_model(cfg, dataset, distribution("none"), TRAIN_IMAGES)
    batch = cfg.train.batch_size
    x = tf.constant(dataset.x_train[:batch])
    y = tf.constant(keras.utils.to_categorical(dataset.y_train[:batch], len(dataset.class_names)), tf.float32)
    graph = tf.function(lambda images, labels: model.train_step((images, labels))).get_concrete_function(x, y).graph
    definition = graph.as_graph_def()
    # every node whole (name, op, inputs, attributes: dtypes, shapes, strides, constants' values), and every function
    # of the graph's library (a tf.cond's branches), but for the numbers a process gives its functions and custom
    # gradients as it makes them (how many it made before, in any code)
    nodes = {node.name: _digest(node) for node in definition.node}
    nodes.update({f"function {_unnumbered(f.signature.name)}": _digest(f) for f in definition.library.function})
    ops = collections.Counter([node.op for node in definition.node]
                              + [node.op for f in definition.library.function for node in f.node_def])
    return {"nodes": len(definition.node), "functions": len(definition.library.function),
            "digest": hashlib.sha256(json.dumps(sorted(nodes.items())).encode()).hexdigest(),
            "node_digests": nodes, "ops": dict(sorted(ops.items())),
            "dtype_policy": model.dtype_policy.name, "jit_compile": bool(model.jit_compile),
            "trainable_params": int(sum(w.numpy().size for w in model.trainable_weights))}


def _unnumbered(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def _digest(proto) -> str:
    """sha256 of a NodeDef or FunctionDef's text, the process's numbers in function names and gradient ids left out."""
    text = re.sub(r'((?:func|signature) \{\s*name: "[^"]*?)_\d+"', r'\1"', str(proto))  # a function's, where named
    text = re.sub(r'"CustomGradient-\d+"', '"CustomGradient"', text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve(rev: str) -> str:
    """The full commit id `rev` names; SystemExit 2 naming it if git reads none."""
    if rev == ".":
        return "."
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT,
                           capture_output=True, text=True)
    if found.returncode != 0:
        print(f"error: {rev!r}: no such revision in {ROOT}", file=sys.stderr)
        raise SystemExit(2)
    return found.stdout.strip()


def trace_at(commit: str, params: str, overrides: str, folder: Path) -> dict:
    """`child` run in a fresh interpreter on the tree of `commit` (`.`: the working tree), read into `folder`."""
    tree = ROOT
    if commit != ".":
        tree = folder
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True)
        tree.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tree, filter="data")
    env = {**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--params", params,
                           "--overrides", overrides], cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    from bench.machine import read_child

    result, last = read_child(proc)
    if result is None:
        label = "the working tree" if commit == "." else commit[:12]
        print(f"error: tracing the step at {label} failed (exit {proc.returncode}): {last}", file=sys.stderr)
        raise SystemExit(1)
    return result


def compare(base: dict, other: dict) -> str:
    """How `other`'s traced step differs from `base`'s, in words: the ops whose counts differ, else the nodes that
    differ (by name: attributes, shapes, inputs), else "identical"."""
    ops = [f"{op} {base['ops'].get(op, 0)} -> {other['ops'].get(op, 0)}" for op in sorted(base["ops"].keys()
           | other["ops"]) if base["ops"].get(op, 0) != other["ops"].get(op, 0)]
    if ops:
        return f"op counts differ: {'; '.join(ops)}"
    nodes = sorted(name for name in base["node_digests"].keys() | other["node_digests"]
                   if base["node_digests"].get(name) != other["node_digests"].get(name))
    if nodes:
        shown = ", ".join(f"`{name}`" for name in nodes[:5])
        return f"{len(nodes)} nodes differ (same op counts): {shown}{', ...' if len(nodes) > 5 else ''}"
    return "identical"


def write_markdown(results: dict, path: Path) -> None:
    import pandas as pd

    rows = [[rev["label"], rev["nodes"], rev["functions"], rev["digest"][:16], rev["dtype_policy"], rev["jit_compile"],
             rev["against_first"].replace("identical", "**identical**")] for rev in results["revisions"]]
    table = pd.DataFrame(rows, columns=["revision", "nodes", "library functions", "graph digest", "dtype policy", "XLA",
                                        "against the first"])
    path.write_text("\n".join([
        "# The training step's graph, revision by revision", "",
        f"Machine: {results['machine']}. Date: {results['date']}. `python -m bench.step_graph "
        f"{' '.join(results['args'])} --params {results['params']} --overrides \"{results['overrides']}\"`.", "",
        "The train step (augmentation, forward, loss, gradients, optimizer update) traced on one device at each "
        "revision; equal digests: every node's name, op, inputs and attributes equal. The input feed and the callbacks "
        "between steps are not in it.", "",
        table.to_markdown(index=False), ""]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revisions", nargs="*", help="git revisions (`.`: the working tree); the first is the baseline")
    parser.add_argument("--params", default="params/quick.yaml", help="the profile (default: %(default)s)")
    parser.add_argument("--overrides", default=DEFAULT_OVERRIDES, help="dotted key=value pairs (default: %(default)s)")
    parser.add_argument("--name", default="step_graph", help="report name under bench/results (default: %(default)s)")
    parser.add_argument("--child", action="store_true", help="internal: trace the step here, print RESULT <json>")
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT", json.dumps(child(args.params, args.overrides)), flush=True)
        return
    if len(args.revisions) < 2:
        parser.error("give two or more revisions, the first the baseline (e.g. HEAD~5 HEAD, or HEAD .)")
    if (not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name) or args.name.startswith(".")
            or args.name.endswith((".md", ".json"))):  # (x.md was written as x.md.md and x.md.json)
        parser.error(f"--name: a file name without folder or extension, got {args.name!r}")
    if not (ROOT / args.params).is_file():
        parser.error(f"--params: no file {args.params} in {ROOT}")
    commits = [resolve(rev) for rev in args.revisions]

    from bench.machine import check_results_folder, replace_atomically, stamp, write_text_whole

    check_results_folder(RESULTS)

    revisions = []
    with tempfile.TemporaryDirectory() as scratch:
        for rev, commit in zip(args.revisions, commits, strict=True):
            traced = trace_at(commit, args.params, args.overrides, Path(scratch) / str(len(revisions)))
            label = "working tree" if commit == "." else f"{rev} ({commit[:12]})" if rev != commit else commit[:12]
            revisions.append({"label": label, "commit": commit, **traced})
            print(f"{label}: {traced['nodes']} nodes, digest {traced['digest'][:16]}", flush=True)
    for rev in revisions:
        rev["against_first"] = "baseline" if rev is revisions[0] else compare(revisions[0], rev)
    for rev in revisions:
        del rev["node_digests"]  # (1,600 of them for the quick profile: the report keeps what differed)
    results = {**stamp(), "args": args.revisions, "params": args.params, "overrides": args.overrides,
               "revisions": revisions}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_whole(RESULTS / f"{args.name}.json", json.dumps(results, indent=2) + "\n")
    replace_atomically(RESULTS / f"{args.name}.md", lambda staged: write_markdown(results, staged))
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
