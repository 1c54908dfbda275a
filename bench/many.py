"""Many devices: one ``l4vctl emulate`` process serving N devices against N one-device processes.

Subject: one process, ``--device`` N times (blk, net, console, rng in turn).
Baseline: N ``l4vctl emulate TYPE --socket PATH`` processes started at once,
the way a test set-up does it without this feature.  Both use the same
launcher (the installed ``l4vctl`` script when there is one) and the same
devices.

Ready time: from starting the first process until every device's ready line
has been read.  Memory, once all are ready: VmRSS summed over the processes
(the figure the goal names) and PSS (shared pages counted once, so the
baseline is not charged 16 times for one interpreter binary).  Subject and
baseline run in interleaved pairs, alternating which goes first; each case
runs unpinned and with every process pinned to CPU 0.  Goal (issue 11): 16
devices ready in < 0.5 s and < 40 MiB RSS in all.

    python bench/many.py [--devices 16] [--pairs 5] [--cpus all|0]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import PY, add_placement_args, cpus_of, describe, interleave, machine, mmm, place, placements, ratios

KINDS = ("blk", "net", "console", "rng")
#: The same device either way: consoles talk to nobody (not this script's terminal).
SPEC_OPTS = {"console": ["io=echo"]}
FLAG_OPTS = {"console": ["--io", "echo"]}
MIB = 1 << 20


def launcher() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m l4vctl``."""
    script = os.path.join(os.path.dirname(PY), "l4vctl")
    return [script] if os.access(script, os.X_OK) else [PY, "-m", "l4vctl"]


def status_kib(pid: int, field: str, path: str = "status") -> int:
    """A ``kB`` field of /proc/PID/status (or smaps_rollup)."""
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def last_cpu(pid: int) -> int | None:
    """The CPU the process last ran on (field 39 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        return int(text.rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def read_lines(procs: list[subprocess.Popen], wanted: list[int], timeout: float = 60) -> None:
    """Wait until process i has printed ``wanted[i]`` lines (read unbuffered; they may come in one write)."""
    fds = {p.stdout.fileno(): i for i, p in enumerate(procs) if p.stdout is not None}
    counts = [0] * len(procs)
    deadline = time.monotonic() + timeout
    while fds:
        left = deadline - time.monotonic()
        ready, _, _ = select.select(list(fds), [], [], max(0.0, left))
        if not ready:
            raise SystemExit(f"not ready within {timeout:g} s: {counts} of {wanted} lines")
        for fd in ready:
            chunk = os.read(fd, 65536)
            i = fds[fd]
            if not chunk:
                raise SystemExit(f"an emulator exited before it was ready: {procs[i].args!r}")
            counts[i] += chunk.count(b"\n")
            if counts[i] >= wanted[i]:
                del fds[fd]


def measure(argvs: list[list[str]], lines: list[int], sock_dir: str) -> dict:
    """Start the processes at once, wait for their ready lines, take their memory, stop them."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for argv in argvs]
    try:
        read_lines(procs, lines)
        ready = time.perf_counter() - t0
        rss = sum(status_kib(p.pid, "VmRSS") for p in procs) * 1024
        pss = sum(status_kib(p.pid, "Pss", "smaps_rollup") for p in procs) * 1024
        allowed = sorted({cpus_of(p.pid) for p in procs})
        ran = sorted({c for c in (last_cpu(p.pid) for p in procs) if c is not None})
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
    left = [n for n in os.listdir(sock_dir) if n.endswith(".sock")]
    if left:
        raise SystemExit(f"socket files left behind: {left}")
    return {"ready": ready, "rss": rss, "pss": pss, "allowed": allowed, "ran": ran, "procs": len(procs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=16, help="devices per sample (default 16)")
    add_placement_args(ap)
    args = ap.parse_args()
    if args.pairs < 5:
        ap.error("--pairs: at least 5")
    run = launcher()
    kinds = [KINDS[i % len(KINDS)] for i in range(args.devices)]
    sock_dir = tempfile.mkdtemp(prefix="l4vctl-many-")
    subject_argv = [*run, "emulate", "-q", "--socket-dir", sock_dir]
    for kind in kinds:
        subject_argv += ["--device", ",".join([kind, *SPEC_OPTS.get(kind, [])])]
    baseline_argvs = [[*run, "emulate", kind, "--socket", os.path.join(sock_dir, f"{kind}{i}.sock"), "-q",
                       *FLAG_OPTS.get(kind, [])] for i, kind in enumerate(kinds)]  # fmt: skip

    subj: list[dict] = []  # every figure of each sample; interleave() keeps the ready times
    base: list[dict] = []

    def subject() -> float:
        subj.append(measure([subject_argv], [args.devices], sock_dir))
        return subj[-1]["ready"]

    def baseline() -> float:
        base.append(measure(baseline_argvs, [1] * args.devices, sock_dir))
        return base[-1]["ready"]

    print(f"# {machine()}; load average at start: {loadavg()} (the baseline's 16 processes raise it themselves)")
    print(f"# launcher: {' '.join(run)}; {args.devices} devices ({', '.join(KINDS)} in turn); "
          f"{args.pairs} interleaved pairs per case, alternating order")  # fmt: skip
    print(f"# subject: 1 process with {args.devices} x --device; baseline: {args.devices} processes started at once")
    try:
        subject(), baseline()  # warm the page cache (and the bytecode cache) before anything counts
        for cpus in placements(args.cpus):
            subj.clear()
            base.clear()
            place(cpus)  # the processes of the case inherit it
            try:
                load = loadavg()
                interleave(subject, baseline, args.pairs)
            finally:
                place(None)
            report(describe(cpus), load, subj, base, args.devices)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def report(case: str, load: str, subj: list[dict], base: list[dict], devices: int) -> None:
    def col(rows: list[dict], key: str) -> list[float]:
        return [r[key] for r in rows]

    print(f"\n## {case} (load average before: {load})")
    print(f"{'':34s} {'ready ms min/med/max':>24s}   {'RSS MiB min/med/max':>22s}   {'PSS MiB min/med/max':>22s}")
    for name, rows in ((f"1 process, {devices} devices", subj), (f"{devices} processes, 1 device each", base)):
        print(f"{name:34s} {mmm(col(rows, 'ready'), 1e3, '.0f'):>24s}   {mmm(col(rows, 'rss'), 1 / MIB, '.1f'):>22s}"
              f"   {mmm(col(rows, 'pss'), 1 / MIB, '.1f'):>22s}")  # fmt: skip
    r = {key: mmm(ratios(col(subj, key), col(base, key)), 1, ".3f") for key in ("ready", "rss", "pss")}
    print(f"{'ratio subject/baseline, by pair':34s} {r['ready']:>24s}   {r['rss']:>22s}   {r['pss']:>22s}")
    for name, rows in (("subject", subj), ("baseline", base)):
        allowed = sorted({c for r in rows for c in r["allowed"]})
        ran = sorted({c for r in rows for c in r["ran"]})
        print(f"CPUs {name}: allowed {' | '.join(allowed)}; last ran on {','.join(map(str, ran))}")
    if devices != 16:
        return  # the goal is stated for 16
    ready, rss = statistics.median(col(subj, "ready")), statistics.median(col(subj, "rss"))
    met = "met" if ready < 0.5 and rss < 40 * MIB else "NOT met"
    print(f"goal (16 devices ready < 0.5 s, < 40 MiB RSS; medians): {met} ({ready * 1e3:.0f} ms, "
          f"{rss / MIB:.1f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
