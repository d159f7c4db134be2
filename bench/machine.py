"""What a benchmark ran on, as detected, for the reports."""

from __future__ import annotations

import os
import platform
import subprocess


def machine() -> str:
    """What this ran on, as detected: CPU model and cores, GPUs (nvidia-smi) or none."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        gpus = []
    return f"{os.cpu_count()}-core {cpu}, " + (f"GPU: {', '.join(gpus)}" if gpus else "no GPU")
