"""The GPU check's results as one Markdown table: every `gpu-*.json` that `bench/gpu.sh` (or a
`bench.gpu_epoch` run beside it) wrote, with the device line from `gpu.txt`.

    python -m bench.gpu_report [--results bench/results] [--date 2026-11-30]

`bench/gpu.sh` on a borrowed GPU machine packs its files into one `gpu-results.tar.gz` (such a machine may
return only a few files); `--unpack FILE` extracts it into the results folder first.

Writes <results>/gpu.md, with <results>/gpu-notes.md below the table where there is one: per run, the date it
was measured (`--date` for files that do not say), the device, the params file and overrides, the model, the data
(where the file says), epochs trained, the first epoch's seconds (it includes XLA's compiles), the steady seconds
per epoch (median of the others), images/s, the last epoch's train acc, and where the run was a full schedule its
last val_acc, the fit seconds and test_acc on every test image (and val_acc/test_acc with each test-time
augmentation, where the run recorded them); otherwise the projected minutes of the profile's whole schedule.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tarfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def rows(results: Path, date: str | None = None) -> pd.DataFrame:
    """One row per gpu-*.json in `results`; a stage stopped by its time limit (`partial`) shows its epochs."""
    records = []
    order = {"gpu-fast.json": 0, "gpu-improved.json": 1, "gpu-seed.json": 2}  # gpu.sh's stages, then the rest
    for path in sorted(results.glob("gpu-*.json"), key=lambda p: (order.get(p.name, 3), p.name)):
        run = json.loads(path.read_text())
        seconds = run.get("epoch_seconds", [])
        full = "test_acc" in run
        records.append({
            "file": path.name,
            "date": run.get("date", date),
            "device": run.get("device_kind"),
            "params": run.get("params", ""),
            "overrides": run.get("overrides", "").strip(),
            "model": run.get("model", ""),
            "data": data_cell(run),
            "epochs": len(seconds),
            "first epoch s": seconds[0] if seconds else None,
            "steady s/epoch": run.get("steady_epoch_seconds"),
            "images/s": run.get("images_per_second"),
            "fit s": run.get("fit_seconds"),
            "fit s after epoch 1": run.get("fit_seconds_after_first_epoch"),
            "last train acc": (run.get("acc") or [None])[-1],
            "last val_acc": (run.get("val_acc") or [None])[-1] if full else None,
            "test_acc": run.get("test_acc"),
            "val/test acc by TTA": tta_cell(run.get("tta_scores")),
            "projected min (full schedule)": None if full or run.get("partial")
            else run.get("projected_full_schedule_minutes"),
            "status": "stopped at its time limit" if run.get("partial") else ("full schedule" if full else "timed"),
        })
    if not records:
        raise SystemExit(f"no gpu-*.json in {results}")
    frame = pd.DataFrame.from_records(records)
    return frame.astype(object).where(frame.notna(), None)


def data_cell(run: dict) -> str | None:
    """What a run trained and was scored on: the data file's name (or synthetic) and its test images, where the
    run recorded them (bench.gpu_epoch does since 2026-12-04; earlier files: bench/gpu.sh's JPEG copy)."""
    if not run.get("data"):
        return None
    name = Path(run["data"]).name if not run["data"].startswith("synthetic") else run["data"]
    return f"{name}, {run['test_images']:,} test images" if run.get("test_images") else name


def tta_cell(scores: dict | None) -> str | None:
    """bench.gpu_epoch's tta_scores in one cell: `none .905/.901, flip .910/.912, ...` (val_acc/test_acc)."""
    if not scores:
        return None
    def acc(value):
        return f"{value:.4f}".removeprefix("0") if value is not None else "-"
    return ", ".join(f"{tta} {acc(s.get('val_acc'))}/{acc(s.get('test_acc'))}" for tta, s in scores.items())


def is_result_name(name: str) -> bool:
    """What bench/gpu.sh writes: gpu.txt, gpu.log and one gpu-NAME.json per stage."""
    return name in ("gpu.txt", "gpu.log") or (name.startswith("gpu-") and name.endswith(".json"))


def unpack(archive: Path, results: Path) -> list[str]:
    """Extract the gpu.sh files of `archive` into `results`; refuses an archive holding anything else, or in a
    folder, before extracting any of it."""
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            for member in members:
                if not is_result_name(member.name.removeprefix("./")):
                    raise SystemExit(f"{archive}: {member.name!r} is not a bench/gpu.sh result file")
            results.mkdir(parents=True, exist_ok=True)
            tar.extractall(results, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SystemExit(f"{archive}: not a readable gpu-results.tar.gz ({exc})") from None
    return sorted(Path(m.name).name for m in members)


def report(results: Path, date: str) -> str:
    device = (results / "gpu.txt").read_text().strip() if (results / "gpu.txt").exists() else "device not recorded"
    table = rows(results, date).to_markdown(index=False, missingval="")
    return "\n".join([
        "# GPU check (`bench/gpu.sh`)", "",
        "The device as `bench/gpu.sh` recorded it:", "", "```", device, "```", "",
        "Through `pipeline.fitting` with `KERAS_BACKEND=jax` (bfloat16 + XLA where the profile says `auto`), "
        "on the data each row names (bench/gpu.sh's stages: the CIFAR-10 JPEG q75 copy; a blank cell: a file "
        "that does not say, written by those stages). test_acc: every test image of that data (the JPEG copy's "
        "10,000), with the profile's `evaluate.tta`. The first epoch includes XLA's compiles of the train and "
        "validation steps.", "",
        table, "",
        *([notes.read_text().strip(), ""] if (notes := results / "gpu-notes.md").exists() else []),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="for files that do not say")
    parser.add_argument("--unpack", help="a gpu-results.tar.gz from bench/gpu.sh to extract into --results first")
    args = parser.parse_args()
    results = Path(args.results)
    if args.unpack:
        unpack(Path(args.unpack), results)
    (results / "gpu.md").write_text(report(results, args.date))
    print((results / "gpu.md").read_text())


if __name__ == "__main__":
    main()
