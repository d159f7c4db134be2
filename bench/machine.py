"""What a benchmark ran on, as detected, for the reports."""

from __future__ import annotations

import datetime
import errno
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


def machine() -> str:
    """What this ran on, as detected: CPU model and cores, GPUs (nvidia-smi) or none."""
    try:
        cpu = describe_cpu(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = None
    gpus = gpu_names()
    return (f"{os.cpu_count()}-core {cpu or platform.processor() or platform.machine()}, "
            + (f"GPU: {', '.join(gpus)}" if gpus else "no GPU"))


def describe_cpu(cpuinfo: str) -> str | None:
    """The first processor of /proc/cpuinfo's text: its model name, and (virtual machines often name the CPU only
    "AMD EPYC") its family, model and bfloat16 units (AVX512-BF16, AMX), which set the CPU speeds measured here."""
    info: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    if "model name" not in info:
        return None
    units = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))
             if flag in info.get("flags", "").split()]
    return (f"{info['model name']} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}; "
            f"{', '.join(units) or 'no bfloat16 units'})")


def gpu_names() -> list[str]:
    """The NVIDIA GPUs nvidia-smi lists (none where it is absent, or fails: without a GPU or its driver it says why on
    its standard output)."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return proc.stdout.strip().splitlines() if proc.returncode == 0 else []


def stamp() -> dict:
    """The machine (as `machine` detects it, with the OS) and today's date, for a benchmark's results."""
    return {"machine": f"{machine()} ({platform.platform()})", "date": datetime.date.today().isoformat()}


def cpu_rehearsal_env(env: dict[str, str], devices: int) -> dict[str, str]:
    """`env` for a process that rehearses on `devices` CPU devices with every GPU hidden (MirroredStrategy and
    DataParallel take every GPU before any CPU device): CUDA_VISIBLE_DEVICES empty, JAX on the CPU, XLA's host platform
    split in `devices`, XLA_FLAGS already set kept (a device count among them replaced)."""
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count=")]
    return {**env, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])}


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(staged)` into a file beside it, then rename that over `path`: a reader, or a report
    rewritten after every run and interrupted (Ctrl-C, a kill) while it writes, sees the old file or the new one,
    never one cut short. The staged file is removed if `write` fails."""
    staged = path.with_name(f".{path.name}.partial")
    try:
        write(staged)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def refuse(message: str) -> NoReturn:
    """`error: message` on stderr, one line, and exit 2: a benchmark's argument, or what it names, refused before
    anything is measured or written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_results_folder(folder: Path) -> None:
    """`refuse` unless this process can make `folder` and write files in it, checked before any measuring: a results
    folder not to be written (a read-only checkout, a file in its place) failed the report at the end, on a traceback,
    the minutes measured lost. A folder not there yet is left to be made with the report: its nearest folder that is
    must let this process make it."""
    try:
        there = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
        if there != folder.absolute() and not there.is_dir():  # a file where a folder above it should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=there):  # unnamed where the file system can (O_TMPFILE): no reader sees it
            pass
    except OSError as exc:
        refuse(f"cannot write the results folder {folder}: {exc.strerror or exc}")


def write_text_whole(path: Path, text: str) -> None:
    """`text` at `path`, whole or not at all (`replace_atomically`)."""
    replace_atomically(path, lambda staged: staged.write_text(text))


def write_whole(path: Path, record: dict) -> None:
    """`record` as JSON at `path`, whole or not at all (a time limit's SIGINT may come at any instant)."""
    replace_atomically(path, lambda staged: staged.write_text(json.dumps(record, indent=2)))


def save_results(folder: Path, name: str, results: dict, write_markdown: Callable[[dict, Path], None]) -> None:
    """Write `results` to folder/<name>.json and, through `write_markdown`, folder/<name>.md; print the latter."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_whole(folder / f"{name}.json", json.dumps(results, indent=2) + "\n")
    replace_atomically(folder / f"{name}.md", lambda staged: write_markdown(results, staged))
    print((folder / f"{name}.md").read_text())


def child_result(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """Run `python -m <module> <args>` in the project root (a fresh interpreter, e.g. another backend or fresh
    TensorFlow settings) and return the JSON it printed on its `RESULT <json>` line. A child that fails, runs out
    of time or prints no result ends the benchmark with one line naming the child and its last line of output
    (SystemExit, so no results file is written from the rounds before it)."""
    command = f"python -m {module} {' '.join(args)}"
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], env={**os.environ, **(env or {})},
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"`{command}` did not finish within {timeout:g} s; no results written") from None
    result, last = read_child(proc)
    if result is None:
        raise SystemExit(f"`{command}` failed (exit {proc.returncode}{'' if proc.returncode else ', no RESULT line'}):"
                         f" {last}; no results written")
    return result


def read_child(proc: subprocess.CompletedProcess) -> tuple[dict | None, str]:
    """What a finished child printed on its `RESULT <json>` line (None where it failed or printed none), and its last
    line of output, to name what went wrong."""
    result = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    last = next((line.strip() for line in reversed((proc.stderr + proc.stdout).splitlines()) if line.strip()),
                "no output")
    return (json.loads(result[len("RESULT "):]) if proc.returncode == 0 and result else None), last
