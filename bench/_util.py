"""Helpers shared by the benchmark scripts: timing and machine description."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time


def machine() -> str:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"python {platform.python_version()}, cpus {cpus} ({model})"


def best_of(fn, repeat: int = 7, number: int = 1) -> float:
    """Smallest wall time of ``repeat`` rounds of ``number`` calls, per call."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return min(times)


def process_times(argv: list[str], runs: int, env=None) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
        out.append(time.perf_counter() - t)
    return out


def summary(times: list[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


PY = sys.executable
