"""The GPU check's results as one Markdown table: every `gpu-*.json` that `bench/gpu.sh` (or a
`bench.gpu_epoch` run beside it) wrote, with the device line from `gpu.txt`.

    python -m bench.gpu_report [--results bench/results] [--date 2026-11-30]

`bench/gpu.sh` on the GPU machine packs its files into one `gpu-results.tar.gz` (such a machine may
return only a few files, of 16 MiB at most: a larger archive comes in pieces, FILE.part0, FILE.part1, ...);
`--unpack FILE` extracts it into the results folder first, and `.gpu-state/` (an unfinished run's training, for
the next call to go on from, or a whole run's result, for later calls to skip it) into the checkout, in place of
the one there. A call ended at its limit before gpu.sh packed anything leaves its files loose beside where FILE
would be: `--unpack` takes those (the checkout's `.gpu-state` stays: that call's training did not come back).

Writes <results>/gpu.md, with <results>/gpu-notes.md below the table where there is one: per run, the date it
was measured (`--date` for files that do not say), the device, the params file and overrides, the model, the data
(where the file says), epochs trained, the first epoch's seconds (it includes XLA's compiles), the steady seconds
per epoch (median of the others), images/s (train steps: the images an epoch trains on over the steady seconds of
its training steps, as train's `images_per_second` metric; files written before 2026-12-06 hold instead the
training split over the steady whole epoch, validation included, shown in a column of their own), the last
epoch's train acc, and where the run was a full schedule its last val_acc, the fit seconds and test_acc on every
test image (and val_acc/test_acc with each test-time augmentation, where the run recorded them); otherwise the
projected minutes of the profile's whole schedule.
With the call's gpu.log beside them, each stage it names that wrote no file in that call has a row `not run` with
the reason (skipped for time, its limit reached inside its first, compiling epoch, or its exit status and last
line), a stage it says ran whose file is not there a row `no result` saying so, and a stopped stage's status says
whether its limit stopped it or it failed.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import pandas as pd

from bench.machine import check_results_folder, refuse, write_text_whole

ROOT = Path(__file__).resolve().parent.parent


def rows(results: Path, date: str | None = None) -> pd.DataFrame:
    """One row per gpu-*.json in `results`; a stage stopped by its time limit (`partial`) shows its epochs. Where
    `results` holds the last call's gpu.log, a stage it names that wrote no file in that call (skipped, or ended
    before its first epoch did) has a row saying `not run` and why, and a stopped one's status is the log's."""
    records = []
    order = {name: i for i, name in enumerate(("gpu-fast.json", "gpu-fast-warm.json", "gpu-reference-airbench94.json",
                                                "gpu-reference-airbench96.json", "gpu-improved.json",
                                                "gpu-seed.json"))}  # gpu.sh's headline stages, then the rest
    called, stages = stage_log(results)
    files = {path.name: path for path in results.glob("gpu-*.json")}
    unrun = {f"gpu-{name}.json": stage for name, stage in stages.items() if not stage["wrote"]}
    # a stage the log says ran (it ended an epoch, or exited 0) whose file is not here: a row saying so, not none
    lost = {f"gpu-{name}.json": stage for name, stage in stages.items() if stage["wrote"]
            and f"gpu-{name}.json" not in files}
    for name in sorted(files.keys() | unrun.keys() | lost.keys(), key=lambda name: (order.get(name, len(order)), name)):
        if name in unrun:  # an older call's file of that name, if any, keeps its own row
            records.append({"file": name, "date": called or date, "status": f"not run: {unrun[name]['why']}"})
        if name in lost:
            ended = (f"exit {lost[name]['exit']}" if "exit" in lost[name] else "the call ended during it")
            records.append({"file": name, "date": lost[name].get("call") or called or date,
                            "status": f"no result: gpu.log says it ran ({ended}), but {name} is not in the results"})
        if name not in files:
            continue
        path = files[name]
        try:
            run = json.loads(path.read_text())
        except ValueError as exc:  # cut short, or not JSON
            raise SystemExit(f"{path}: not a bench/gpu.sh result ({exc})") from None
        if not isinstance(run, dict):
            raise SystemExit(f"{path}: not a bench/gpu.sh result (a JSON {type(run).__name__}, not a record)")
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
            "epochs": run.get("epochs", len(seconds)),  # the reference's 9.9 (bench.airbench_reference)
            "first epoch s": seconds[0] if seconds else None,
            # programs an earlier stage compiled, loaded from JAX's compilation cache: a first epoch short by that
            "programs loaded": programs_loaded(run),
            "steady s/epoch": run.get("steady_epoch_seconds"),
            # images trained per second of training steps (train's images_per_second); files before 2026-12-06
            # hold only `images_per_second`, the training split over the whole steady epoch, validation included
            "images/s (train steps)": run.get("train_images_per_second"),
            "images/s (whole epoch, older files)": (None if "train_images_per_second" in run
                                                    else run.get("images_per_second")),
            "fit s": run.get("fit_seconds"),  # over several calls (`parts`): the sum of their epochs
            "fit s after epoch 1": run.get("fit_seconds_after_first_epoch"),  # ... after each call's first
            "last train acc": (run.get("acc") or [None])[-1],
            "last val_acc": (run.get("val_acc") or [None])[-1] if full else None,
            "test_acc": run.get("test_acc"),
            "val/test acc by TTA": tta_cell(run.get("tta_scores")),
            "projected min (full schedule)": None if full or run.get("partial") else projected_minutes(run),
            "status": status(run, stages.get(path.stem.removeprefix("gpu-"))),
        })
    if not records:
        raise SystemExit(f"no gpu-*.json in {results}")
    frame = pd.DataFrame.from_records(records, columns=max((list(r) for r in records), key=len))  # a run's order
    return frame.astype(object).where(frame.notna(), None)


def programs_loaded(run: dict) -> int | str | None:
    """The programs a stage loaded from JAX's compilation cache; over several calls (`parts`) each call's, in order
    ("0, 3": the first compiled, the second loaded three)."""
    parts = run.get("parts") or []
    if len(parts) > 1 and any("compile_cache_programs" in part for part in parts):  # recorded since 2026-12-05
        return ", ".join(str(part.get("compile_cache_programs", "?")) for part in parts)
    return run.get("compile_cache_programs")


LIMIT_EXITS = (124, 137)  # timeout's: the stage's SIGINT at its limit, the SIGKILL 10 s after


def stage_log(results: Path) -> tuple[str | None, dict[str, dict]]:
    """What the last call's gpu.log (in `results`) says: the call's date, and per stage it names whether the stage
    wrote its file in that call (`wrote`: an epoch ended, or it exited 0), its exit status, and else `why` not.
    bench/gpu.sh appends each call to the log (OUT=bench/results): a stage the last call did not name is as the last
    earlier call that wrote its file says (that file's), and none of theirs is `not run`."""
    log = results / "gpu.log"
    if not log.exists():
        return None, {}
    called, earlier, stages, current = None, {}, {}, None

    def ended_during(stage: dict | None) -> None:  # the call ended inside it (the machine's limit): no exit line
        if stage is not None:
            stage.update(wrote=bool(stage["epochs"]), why="the call ended during it, before its first epoch ended")

    for line in log.read_text(errors="replace").splitlines():
        if match := re.match(r"== call of (\d{4}-\d\d-\d\d)", line):
            ended_during(current)
            earlier.update((name, stage) for name, stage in stages.items() if stage["wrote"])
            called, stages, current = match[1], {}, None
        elif match := re.match(r"== ([\w, -]+?) skipped: (.*)", line):
            for name in match[1].split(", "):
                stages[name] = {"wrote": False, "why": f"skipped, {match[2]}"}
        elif match := re.match(r"== ([\w-]+) \(limit (\d+)s\)", line):
            ended_during(current)
            current = stages[match[1]] = {"limit": int(match[2]), "epochs": 0, "last": "", "call": called}
        elif current is not None and (match := re.match(r"== ([\w-]+) exit (\d+)", line)):
            rc, current["exit"] = int(match[2]), int(match[2])
            current["wrote"] = bool(current["epochs"]) or rc == 0
            current["why"] = (f"stopped at its {current['limit']} s limit before its first epoch ended (it includes "
                              f"XLA's compiles)" if rc in LIMIT_EXITS else f"failed, exit {rc}: {current['last']}")
            current = None
        elif current is not None and line.strip():
            if re.match(r"(Epoch|Run) \d+/\d+", line):  # an epoch (bench.airbench_reference: a run) ended
                current["epochs"] += 1
            else:
                current["last"] = line.strip()
    ended_during(current)
    return called, {**{name: stage for name, stage in earlier.items() if name not in stages}, **stages}


def projected_minutes(run: dict) -> float | None:
    """The whole schedule's minutes: the first epoch as measured (its compiles are part of any run), the others at
    the steady pace. (Files written before `bench.gpu_epoch` projected so counted every epoch at the steady pace.)"""
    seconds, steady, epochs = run.get("epoch_seconds"), run.get("steady_epoch_seconds"), run.get("full_schedule_epochs")
    if not (seconds and steady and epochs):
        return run.get("projected_full_schedule_minutes")
    return round((seconds[0] + (epochs - 1) * steady) / 60, 1)


def status(run: dict, stage: dict | None = None) -> str:
    """A stage stopped short (going on from its checkpoint in the next call, where it has one), a whole schedule
    (over how many calls), or a few timed epochs. `stage`: what the call's gpu.log says of it (stage_log), where
    this file is that call's: whether a stopped one ended at its limit or failed."""
    if run.get("reference"):  # bench.airbench_reference: another recipe, one run or several
        if run.get("partial"):  # its limit (or a failure) stopped it after some runs
            return (f"reference, stopped after {len(run.get('runs', []))} of {run.get('runs_planned')} runs "
                    f"(medians of those): {run['reference']}")
        if run.get("cold"):
            return f"reference, 1 run (its fit s cold: cuDNN's autotuning included): {run['reference']}"
        timed = sum(1 for r in run.get("runs", []) if r.get("timed"))
        return (f"reference, {len(run.get('runs', []))} runs (medians; fit s over the {timed} timed): "
                f"{run['reference']}")
    if run.get("partial"):
        resumes = "; the next call goes on from its checkpoint" if run.get("checkpoint") else ""
        stage = stage if stage and stage.get("wrote") else {}  # no log, or the file of an earlier call
        if stage and "exit" not in stage:  # its call ended before packing: its training did not come back
            return "stopped when the call ended" + ("; the next call goes on from the checkpoint it carried"
                                                    if resumes else "")
        if stage.get("exit", 0) not in (0, *LIMIT_EXITS):
            return f"failed after {len(run.get('epoch_seconds', []))} epochs, exit {stage['exit']}: {stage['last']}"
        if stage.get("exit") in LIMIT_EXITS or not resumes:
            return f"stopped at its time limit{resumes}"
        return f"stopped short of its end{resumes}"
    if "test_acc" in run:
        return f"full schedule over {len(run['parts'])} calls" if run.get("parts") else "full schedule"
    return "timed"


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


STATE = ".gpu-state"  # bench/gpu.sh's unfinished training, in the checkout: carried to the next call


def source_hash(checkout: Path) -> str:
    """What code `checkout` holds, as bench/gpu.sh records it in gpu.txt (`source HASH`): sha256sum's lines for the
    .py, .yaml and .sh files under pipeline/, bench/ and params/ (no __pycache__), in byte order, hashed again; the
    first 16 hex digits."""
    paths = sorted(path.relative_to(checkout).as_posix() for folder in ("pipeline", "bench", "params")
                   for path in (checkout / folder).rglob("*")
                   if path.is_file() and not path.is_symlink() and path.name.endswith((".py", ".yaml", ".sh"))
                   and "__pycache__" not in path.parts)
    lines = "".join(f"{hashlib.sha256((checkout / path).read_bytes()).hexdigest()}  {path}\n" for path in paths)
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def pieces(archive: Path) -> list[Path]:
    """`archive`, or the pieces bench/gpu.sh cut it into (ARCHIVE.part0, .part1, ...), in order."""
    if archive.exists():
        return [archive]
    numbered = {int(number): path for path in archive.parent.glob(f"{archive.name}.part*")
                if (number := path.name.removeprefix(f"{archive.name}.part")).isdigit()}
    if not numbered:
        raise SystemExit(f"{archive}: no such file, nor pieces {archive.name}.part0, .part1, ...")
    if missing := sorted(set(range(max(numbered) + 1)) - numbered.keys()):  # joined without it: garbage
        digits = len(numbered[max(numbered)].name) - len(f"{archive.name}.part")  # .part03 of 12 pieces
        found = ", ".join(numbered[k].name.removeprefix(archive.name) for k in sorted(numbered))
        raise SystemExit(f"{archive}: piece {', '.join(f'{archive.name}.part{k:0{digits}d}' for k in missing)} "
                         f"missing (found {found})")
    return [numbered[k] for k in sorted(numbered)]


def unpack(archive: Path, results: Path, checkout: Path = ROOT) -> list[str]:
    """Extract the gpu.sh files of `archive` (or its pieces) into `results`, and its `.gpu-state/` into `checkout`
    in place of the one there (an archive without one leaves it as it is).
    Refuses an archive holding anything else, or in a folder, or without gpu.txt and gpu.log (the call's device and
    stages), or whose gpu.txt names other code than `checkout`'s (`source_hash`), before extracting any of
    it. Where there is no archive
    but its folder holds gpu.sh's files loose (a call ended at its limit before gpu.sh packed them), those."""
    # (the results folder's own files are results already, not a call's)
    loose = [] if archive.exists() or list(archive.parent.glob(f"{archive.name}.part*")) or (
        archive.parent.resolve() == results.resolve()) else sorted(
        path for path in archive.parent.glob("gpu*") if path.is_file() and is_result_name(path.name))
    if loose:
        print(f"{archive}: not there: the call ended before bench/gpu.sh packed its files; its {len(loose)} loose "
              f"ones taken. No {STATE} came back (the training of that call is lost): {checkout / STATE} stays")
        results.mkdir(parents=True, exist_ok=True)
        for path in loose:
            shutil.copyfile(path, results / path.name)
        return [path.name for path in loose]
    try:
        with tempfile.TemporaryFile() as joined:
            for piece in pieces(archive):
                with piece.open("rb") as part:
                    shutil.copyfileobj(part, joined)
            joined.seek(0)
            if joined.read(2) == b"\x1f\x8b":  # gzip's checksum, which tarfile does not check: a damaged piece
                joined.seek(0)
                with gzip.GzipFile(fileobj=joined) as unzipped:
                    while unzipped.read(1 << 20):
                        pass
            joined.seek(0)
            with tarfile.open(fileobj=joined) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                state = [m for m in members if m.name.removeprefix("./").startswith(f"{STATE}/")]
                found = [m for m in members if m not in state]
                for member in found + state:  # a state member naming `..` lands beside .gpu-state, or outside
                    name = member.name.removeprefix("./")
                    if not (is_result_name(name) if member in found else ".." not in PurePosixPath(name).parts):
                        raise SystemExit(f"{archive}: {member.name!r} is not a bench/gpu.sh result file")
                if not found:  # gpu.sh packs gpu.txt and gpu.log at least: the table would be the earlier files'
                    raise SystemExit(f"{archive}: no bench/gpu.sh result file in it (gpu.txt, gpu.log, gpu-*.json)")
                # gpu.sh packs both with every call's results: without them the results folder's own would name
                # another call's machine as these results' device, and another call's stages as not run
                if missing := [name for name in ("gpu.txt", "gpu.log")
                               if name not in {m.name.removeprefix("./") for m in found}]:
                    raise SystemExit(f"{archive}: no {', '.join(missing)} in it (bench/gpu.sh packs gpu.txt and "
                                     f"gpu.log with every call's results); nothing extracted")
                # gpu.sh records the hash of the code it ran (since 2026-12-07; older archives say nothing)
                device = next(m for m in found if m.name.removeprefix("./") == "gpu.txt")
                said = re.findall(r"^source ([0-9a-f]+)$", tar.extractfile(device).read().decode(errors="replace"),
                                  re.MULTILINE)
                if said and said[-1] != (ours := source_hash(checkout)):
                    raise SystemExit(f"{archive}: measured other code (source {said[-1]} in its gpu.txt, {ours} in "
                                     f"{checkout}): unpack it where its call's code is checked out; nothing "
                                     f"extracted")
                results.mkdir(parents=True, exist_ok=True)
                tar.extractall(results, members=found, filter="data")
                # gpu.sh packs the checkout's .gpu-state whenever it trained there, a whole run's improved.json
                # included: an archive without one (the CPU smoke, GPU_SH_STATE elsewhere) trained another
                # improved run, and says nothing of the one here
                if state:
                    shutil.rmtree(checkout / STATE, ignore_errors=True)
                tar.extractall(checkout, members=state, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # zlib's: a damaged piece
        # tarfile's for a file of no archive at all is one line per compression it tried
        reason = "no tar archive, compressed or not" if "\n" in str(exc) else exc
        raise SystemExit(f"{archive}: not a readable gpu-results.tar.gz ({reason})") from None
    return sorted(Path(m.name).name for m in found)


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
        "validation steps. images/s (train steps): the images an epoch trains on over the steady seconds of its "
        "training steps, validation left out, as train's `images_per_second` metric; files written before "
        "2026-12-06 recorded the training split over the steady whole epoch, validation included (images/s "
        "(whole epoch, older files)). A run over several calls (status `full schedule over N calls`): fit s is the "
        "sum of its epochs, each call's first included, and fit s after epoch 1 leaves out each call's first epoch.",
        "",
        table, "",
        *([notes.read_text().strip(), ""] if (notes := results / "gpu-notes.md").exists() else []),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="for files that do not say")
    parser.add_argument("--unpack", help="a gpu-results.tar.gz from bench/gpu.sh to extract into --results first")
    args = parser.parse_args()
    try:  # it goes into the table as the date those runs were measured
        args.date = datetime.date.fromisoformat(args.date).isoformat()
    except ValueError:
        parser.error(f"--date: a date as YYYY-MM-DD, got {args.date!r}")
    results = Path(args.results)
    check_results_folder(results)
    try:  # an archive that is none, or a folder of no results: one line, exit 2 (SystemExit's text alone exits 1)
        if args.unpack:
            unpack(Path(args.unpack), results)
        text = report(results, args.date)
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        refuse(exc.code)
    write_text_whole(results / "gpu.md", text)
    print(text)


if __name__ == "__main__":
    main()
