"""Helpers shared by the benchmark scripts: timing and machine description."""

from __future__ import annotations

import os
import platform
import select
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


# -- honest comparisons: interleaved pairs, both CPU placements, min/median/max -------------------


def add_placement_args(ap) -> None:
    """--pairs and --cpus, the same in every script."""
    ap.add_argument("--pairs", type=int, default=5, help="interleaved subject/baseline pairs per case (at least 5)")
    ap.add_argument("--cpus", default=None,
                    help="run only with this placement: 'all' (unpinned) or a CPU list such as 0 (every "
                         "process of the case pinned there); default: both, unpinned then on CPU 0")  # fmt: skip


def placements(arg: str | None) -> list[set[int] | None]:
    """The CPU placements to run each case in: None means unpinned."""
    if arg is None:
        return [None, {0}]
    if arg == "all":
        return [None]
    return [{int(c) for c in arg.split(",")}]


def place(cpus: set[int] | None, pid: int = 0) -> None:
    """Pin ``pid`` (0: this process) to ``cpus``; None: every CPU this machine allows."""
    if not hasattr(os, "sched_setaffinity"):
        return
    os.sched_setaffinity(pid, cpus if cpus is not None else set(range(os.cpu_count() or 1)))


def describe(cpus: set[int] | None) -> str:
    return "unpinned" if cpus is None else f"all processes on CPU {','.join(map(str, sorted(cpus)))}"


def cpus_of(pid: int = 0) -> str:
    """The CPUs a process may run on, as text."""
    try:
        return ",".join(map(str, sorted(os.sched_getaffinity(pid))))
    except OSError:
        return "?"


def interleave(subject, baseline, pairs: int) -> tuple[list[float], list[float]]:
    """Run ``subject()`` and ``baseline()`` (each returns a figure) in ``pairs`` pairs,
    alternating which goes first, so drift and warm-up hit both alike."""
    subj, base = [], []
    for i in range(max(pairs, 1)):
        if i % 2:
            base.append(baseline())
            subj.append(subject())
        else:
            subj.append(subject())
            base.append(baseline())
    return subj, base


def mmm(values: list[float], scale: float = 1.0, fmt: str = ".3g") -> str:
    """min / median / max of ``values`` times ``scale``."""
    v = [x * scale for x in values]
    return f"{min(v):{fmt}} / {statistics.median(v):{fmt}} / {max(v):{fmt}}"


def ratios(subject: list[float], baseline: list[float]) -> list[float]:
    """subject/baseline pair by pair."""
    return [s / b for s, b in zip(subject, baseline, strict=True) if b]


def print_goals(goals: list[tuple[str, bool, str]]) -> None:
    """Each ``(what, met, value)`` goal as a line, after the load average."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n# goals (load average now {load})")
    for what, met, value in goals:
        print(f"{'met    ' if met else 'NOT met'} {what} ({value})")


def start_emulator(path: str, kind: str, *args: str) -> tuple[subprocess.Popen, str]:
    """``l4vctl emulate KIND --socket PATH -q ARGS`` as a process: (process, its URL)."""
    proc = subprocess.Popen(
        [PY, "-m", "l4vctl", "emulate", kind, "--socket", path, "-q", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    if not ready:
        proc.kill()
        proc.wait()
        raise SystemExit("the emulator did not start")
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def timed(fn, runs: int) -> list[float]:
    """Seconds of ``runs`` calls of ``fn``, after one warm-up call (imports, first mappings)."""
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out
