"""Served vs in-process inference of the same logged model, on the same CPU, in one run.

Usage: python -m bench.bench_serve [--params PARAMS.yaml ...] [--latency-requests 200] [--batch-requests 16]

For each params file (default: tiny and resnet20), logs the model it builds (weights untrained:
speed does not depend on them) through
`pipeline.tracking.training.log_model` into a temporary SQLite store, starts `mlflow models serve` on a
loopback port, and measures:
- images/s at batch 1 and 256 for in-process `pyfunc.predict` (uint8 arrays) and over HTTP with
  JSON integer tensors and with base64 PNGs (request bodies are encoded before the clock starts);
- p50/p99 latency of one-image requests, served and in process.
Writes bench/results/serve.json and bench/results/serve.md. Client and server share the CPU.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pipeline  # noqa: F401 - before TensorFlow loads: its log level and CPU allocator settings

# isort: split
import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from bench.machine import check_results_folder, machine, write_text_whole
from bench.servers import ROOT, free_port, start_model_server, stop_group
from pipeline import config, data, fitting
from pipeline.tracking import training

RESULTS = ROOT / "bench" / "results"
BIG_BATCH = 256
TARGET_RATIO = 0.6


def log_untrained_model(params: str, tmp: Path) -> str:
    """Log the model of `params` (untrained) into a SQLite store under `tmp`; its `models:/` URI."""
    cfg = config.load(params)
    dataset = data.make_synthetic(n_train=256, n_test=16)
    experiment = mlflow.create_experiment(f"bench-serve-{params}",  # as given: two files may share a name
                                          artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        return training.log_model(fitting.make_model(cfg, dataset, augment=False), list(dataset.class_names),
                               dataset.x_test[:2]).model_uri


def poster(url: str, body: bytes) -> Callable[[], None]:
    """A call that POSTs the pre-encoded JSON `body` to `<url>/invocations` and checks the answer is 200."""
    def send() -> None:
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            assert response.status == 200, response.status
    return send


def timings(call: Callable[[], object], repeats: int, warmup: int = 2) -> np.ndarray:
    """Seconds per call over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return np.asarray(seconds)


def throughput(seconds: np.ndarray, batch: int) -> float:
    """Images per second over all calls of a batch size."""
    return float(batch * len(seconds) / seconds.sum())


def latency_ms(seconds: np.ndarray) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(seconds, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(seconds, 99)) * 1000, 2), "requests": len(seconds)}


def png_base64(pixels: np.ndarray) -> list[str]:
    """uint8 (n, 32, 32, 3) -> base64 PNG strings."""
    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def measure(model_uri: str, url: str, latency_requests: int, batch_requests: int, json_batch_requests: int) -> dict:
    """All numbers for one model: in process first (server idle), then over HTTP."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(BIG_BATCH, 32, 32, 3), dtype=np.uint8)
    model = mlflow.pyfunc.load_model(model_uri)
    local_one = timings(lambda: model.predict(pixels[:1]), latency_requests)
    local_big = timings(lambda: model.predict(pixels), batch_requests)
    result = {"in_process": {"batch_1_images_per_s": throughput(local_one, 1),
                             f"batch_{BIG_BATCH}_images_per_s": throughput(local_big, BIG_BATCH),
                             "one_image_latency": latency_ms(local_one)}}
    # JSON int tensors take seconds per batch (MLflow's parsing): fewer of those requests.
    bodies = {"json_int_tensor": (lambda x: {"inputs": x.tolist()}, json_batch_requests),
              "base64_png": (lambda x: {"inputs": png_base64(x)}, batch_requests)}
    for name, (to_body, repeats) in bodies.items():
        one, big = (json.dumps(to_body(x)).encode() for x in (pixels[:1], pixels))
        served_one = timings(poster(url, one), latency_requests)
        served_big = timings(poster(url, big), repeats, warmup=1)
        result[f"served_{name}"] = {"batch_1_images_per_s": throughput(served_one, 1),
                                    f"batch_{BIG_BATCH}_images_per_s": throughput(served_big, BIG_BATCH),
                                    "one_image_latency": latency_ms(served_one),
                                    f"batch_{BIG_BATCH}_body_bytes": len(big)}
    result["served_json_int_tensor"][f"mlflow_parse_s_batch_{BIG_BATCH}"] = mlflow_parse_seconds(pixels)
    local = result["in_process"][f"batch_{BIG_BATCH}_images_per_s"]
    for name in bodies:
        served = result[f"served_{name}"]
        served[f"batch_{BIG_BATCH}_ratio_to_in_process"] = round(served[f"batch_{BIG_BATCH}_images_per_s"] / local, 3)
        served["batch_1_ratio_to_in_process"] = round(served["batch_1_images_per_s"]
                                                      / result["in_process"]["batch_1_images_per_s"], 3)
    return result


def mlflow_parse_seconds(pixels: np.ndarray) -> float:
    """Seconds MLflow's scoring server spends turning a JSON int tensor body into an array (median of 3):
    the part of a served request that neither the model nor its code controls."""
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    body = json.dumps({"inputs": pixels.tolist()})

    def parse() -> None:
        json.loads(body)  # the server decodes the body twice: to detect the format, then to split data/params
        infer_and_parse_data(json.loads(body))

    seconds = timings(parse, repeats=3, warmup=0)
    return round(float(np.median(seconds)), 3)


def describe_machine() -> dict:
    """The machine as detected (cores, CPU model, GPUs or none) and library versions."""
    from importlib.metadata import version

    return {"machine": machine(), "python": platform.python_version(), "tensorflow": version("tensorflow"),
            "keras": version("keras"), "mlflow": version("mlflow"), "os": platform.platform()}


def model_markdown(entry: dict) -> list[str]:
    """One model's table and verdicts as Markdown lines."""
    r = entry["results"]
    rows = [("in process (uint8 array)", r["in_process"]), ("served, JSON int tensor", r["served_json_int_tensor"]),
            ("served, base64 PNG", r["served_base64_png"])]
    table = pd.DataFrame([{"path": name, "images/s, batch 1": row["batch_1_images_per_s"],
                           f"images/s, batch {BIG_BATCH}": row[f"batch_{BIG_BATCH}_images_per_s"],
                           "1-image p50 ms": row["one_image_latency"]["p50_ms"],
                           "1-image p99 ms": row["one_image_latency"]["p99_ms"]} for name, row in rows])
    lines = [f"### `{entry['params']}`: {entry['model']}", "", table.to_markdown(index=False, floatfmt=".1f"), ""]
    for name in ("base64_png", "json_int_tensor"):
        ratio = r[f"served_{name}"][f"batch_{BIG_BATCH}_ratio_to_in_process"]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        lines.append(f"- served `{name}` at batch {BIG_BATCH}: {ratio:.0%} of in-process throughput "
                     f"(target >= {TARGET_RATIO:.0%}: {verdict}).")
    json_s = BIG_BATCH / r["served_json_int_tensor"][f"batch_{BIG_BATCH}_images_per_s"]
    parse_s = r["served_json_int_tensor"][f"mlflow_parse_s_batch_{BIG_BATCH}"]
    model_s = BIG_BATCH / r["in_process"][f"batch_{BIG_BATCH}_images_per_s"]
    lines.append(f"- a batch-{BIG_BATCH} JSON int tensor request takes {json_s:.2f} s; MLflow's parsing of such a "
                 f"body alone takes {parse_s:.2f} s (timed in the benchmark process), the model {model_s:.2f} s.")
    return lines + [""]


def to_markdown(report: dict) -> str:
    """The report as a Markdown section."""
    m = report["machine"]
    lines = [f"## Serving benchmark ({report['date']})", "",
             f"Machine: {m['machine']}; TensorFlow "
             f"{m['tensorflow']}, Keras {m['keras']}, MLflow {m['mlflow']}, Python {m['python']}; 1-min load "
             f"average before the run {m['load_average_1min_before']}.",
             "Setup: untrained weights; `mlflow models serve --env-manager local`, 1 worker, loopback; client and "
             "server share the machine; request bodies are encoded before timing; in process = "
             "`mlflow.pyfunc.load_model(uri).predict(uint8 array)` in the benchmark process.", ""]
    for entry in report["models"]:
        lines += model_markdown(entry)
    lines += ["JSON int tensors are bound by MLflow's scoring server (it decodes the body twice and deep-copies the "
              "nested lists before the model sees them), not by the model. A PNG carries the same pixels losslessly "
              "in a quarter of the bytes and decodes in well under a millisecond, so clients that want throughput "
              "should send PNGs."]
    return "\n".join(lines) + "\n"


def bench_model(params: str, tmp: Path, args: argparse.Namespace) -> dict:
    """Log the model of `params`, serve it, measure both sides; {"params", "model", "results"}."""
    model_uri = log_untrained_model(params, tmp)
    port = free_port()
    server = start_model_server(model_uri, port, tmp / "server.log")
    try:
        results = measure(model_uri, f"http://127.0.0.1:{port}", args.latency_requests, args.batch_requests,
                          args.json_batch_requests)
    finally:
        stop_group(server)
    return {"params": params, "model": describe_model(config.load(params).model), "results": results}


def describe_model(m: config.ModelConfig) -> str:
    """The model's name for the report; resnet9 has neither blocks nor units per stage to name (its params
    file's `block` and `units_per_stage` are defaults it ignores)."""
    if m.arch == "resnet9":
        return f"ResNet-9 (widths {list(m.widths)})"
    return f"ResNet-{m.depth} ({m.block}, widths {list(m.widths)}, {m.units_per_stage} units/stage)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", nargs="+", default=["params/tiny.yaml", "params/resnet20.yaml"],
                        help="models to log (default: %(default)s)")
    parser.add_argument("--latency-requests", type=int, default=200, help="one-image calls per path")
    parser.add_argument("--batch-requests", type=int, default=16, help=f"batch-{BIG_BATCH} calls per path")
    parser.add_argument("--json-batch-requests", type=int, default=4, help=f"batch-{BIG_BATCH} JSON tensor calls")
    args = parser.parse_args(argv)
    for option in ("latency_requests", "batch_requests", "json_batch_requests"):
        if getattr(args, option) < 1:  # no calls timed: NaN images/s and ratios in the report
            parser.error(f"--{option.replace('_', '-')}: must be >= 1, got {getattr(args, option)}")
    for i, params in enumerate(args.params):  # before any model is logged or served
        if any(Path(params).resolve() == Path(other).resolve() for other in args.params[:i]):
            parser.error(f"--params: {params} given twice")
        try:
            config.load(params)
        except config.ConfigError as exc:
            parser.error(f"--params: {exc}")
    check_results_folder(RESULTS)
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine skews every number: record it
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri  # read by the server process too
        mlflow.set_tracking_uri(uri)
        models = []
        for params in args.params:
            try:
                models.append(bench_model(params, tmp, args))
            except (RuntimeError, OSError) as exc:  # the server did not start, or a request failed
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
                detail = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
                raise SystemExit(f"{params}: {detail}; no results written") from None
    machine = {**describe_machine(), "load_average_1min_before": load_before}
    report = {"date": datetime.date.today().isoformat(), "machine": machine, "models": models,
              "target_ratio_batch_256": TARGET_RATIO}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_whole(RESULTS / "serve.json", json.dumps(report, indent=2) + "\n")
    write_text_whole(RESULTS / "serve.md", to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
