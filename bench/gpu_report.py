"""The GPU check's results as one Markdown table: every `gpu-*.json` that `bench/gpu.sh` (or a
`bench.gpu_epoch` run beside it) wrote, with the device line from `gpu.txt`.

    python -m bench.gpu_report [--results bench/results] [--date 2026-11-30]

Writes <results>/gpu.md: per run, the params file and overrides, the model, epochs trained, the first
epoch's seconds (it includes XLA's compiles), the steady seconds per epoch (median of the others),
images/s, and where the run was a full schedule the fit seconds and test_acc on every test image;
otherwise the projected minutes of the profile's whole schedule.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def rows(results: Path) -> pd.DataFrame:
    """One row per gpu-*.json in `results`; a stage stopped by its time limit (`partial`) shows its epochs."""
    records = []
    order = {"gpu-fast.json": 0, "gpu-improved.json": 1, "gpu-seed.json": 2}  # gpu.sh's stages, then the rest
    for path in sorted(results.glob("gpu-*.json"), key=lambda p: (order.get(p.name, 3), p.name)):
        run = json.loads(path.read_text())
        seconds = run.get("epoch_seconds", [])
        full = "test_acc" in run
        records.append({
            "file": path.name,
            "params": run.get("params", ""),
            "overrides": run.get("overrides", "").strip(),
            "model": run.get("model", ""),
            "epochs": len(seconds),
            "first epoch s": seconds[0] if seconds else None,
            "steady s/epoch": run.get("steady_epoch_seconds"),
            "images/s": run.get("images_per_second"),
            "fit s": run.get("fit_seconds"),
            "fit s after epoch 1": run.get("fit_seconds_after_first_epoch"),
            "test_acc": run.get("test_acc"),
            "projected min (full schedule)": None if full or run.get("partial")
            else run.get("projected_full_schedule_minutes"),
            "status": "stopped at its time limit" if run.get("partial") else ("full schedule" if full else "timed"),
        })
    if not records:
        raise SystemExit(f"no gpu-*.json in {results}")
    frame = pd.DataFrame.from_records(records)
    return frame.astype(object).where(frame.notna(), None)


def report(results: Path, date: str) -> str:
    device = (results / "gpu.txt").read_text().strip() if (results / "gpu.txt").exists() else "device not recorded"
    table = rows(results).to_markdown(index=False, missingval="")
    return "\n".join([
        "# GPU check (`bench/gpu.sh`)", "",
        f"Measured {date} on:", "", "```", device, "```", "",
        "Through `pipeline.fitting` with `KERAS_BACKEND=jax` (bfloat16 + XLA where the profile says `auto`), "
        "on the CIFAR-10 JPEG q75 copy. test_acc: every one of the 10,000 test images, with the profile's "
        "`evaluate.tta`. The first epoch includes XLA's compiles of the train and validation steps.", "",
        table, "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args()
    results = Path(args.results)
    (results / "gpu.md").write_text(report(results, args.date))
    print((results / "gpu.md").read_text())


if __name__ == "__main__":
    main()
