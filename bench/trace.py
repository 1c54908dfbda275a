"""Cost of tracing: ``l4vctl bench`` with and without ``--trace FILE``.

Subject: ``l4vctl --trace FILE bench emu:blk --workload W --time T --json``
(every request recorded when posted and when completed, every kick and
interrupt).  Baseline: the same command without ``--trace``.  Both run as
processes in ``--pairs`` interleaved pairs (the order alternates), unpinned
and then with every process on CPU 0.  Printed: min / median / max of the
requests per second of both, of the ratio traced/untraced pair by pair, and
of the trace's bytes per request.

An untraced session runs the code it ran before tracing existed (the
session asks its channel once whether it records; virtqueues keep their
class), so the baseline is also the cost of tracing when it is off.

    python bench/trace.py [--pairs 5] [--cpus all|0] [--time 1] [--workload randread]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _util import PY, add_placement_args, describe, interleave, machine, mmm, place, placements, print_goals, ratios

#: Goal: recording every request keeps at least this share of the untraced request rate (4 KiB randread,
#: the worst case: the emulated device does almost nothing per request, the recorder three records).
GOAL_RATIO = 0.1


def run(argv: list[str], cpus: set[int] | None) -> dict:
    """One bench process (pinned to ``cpus`` if given): its JSON result."""
    proc = subprocess.run(
        [PY, "-m", "l4vctl", *argv],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=(lambda: place(cpus)) if cpus is not None else None,
    )
    if proc.returncode != 0:
        raise SystemExit(f"l4vctl {' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)["result"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_placement_args(ap)
    ap.add_argument("--time", default="1", help="seconds of each bench run")
    ap.add_argument("--workload", default="randread", help="bench workload (randread, seqwrite, ...)")
    args = ap.parse_args()
    print(f"# {machine()}")
    bench = ["bench", "emu:blk?size=64M", "--workload", args.workload, "--time", args.time, "--json"]
    goals = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.jsonl")
        for cpus in placements(args.cpus):
            sizes: list[float] = []

            def traced(cpus=cpus, sizes=sizes) -> float:
                r = run(["--trace", path, *bench], cpus)
                sizes.append(os.path.getsize(path) / max(r["requests"], 1))
                return r["iops"]

            def plain(cpus=cpus) -> float:
                return run(bench, cpus)["iops"]

            subj, base = interleave(traced, plain, args.pairs)
            ratio = ratios(subj, base)
            print(f"\n## {args.workload}, {describe(cpus)}, {args.pairs} pairs of {args.time} s")
            print(f"untraced req/s      min/median/max: {mmm(base, fmt='.0f')}")
            print(f"traced req/s        min/median/max: {mmm(subj, fmt='.0f')}")
            print(f"traced / untraced   min/median/max: {mmm(ratio)}")
            print(f"trace bytes/request min/median/max: {mmm(sizes, fmt='.0f')}")
            median = sorted(ratio)[len(ratio) // 2]
            goals.append((f"traced >= {GOAL_RATIO:g} x untraced req/s, {describe(cpus)}", median >= GOAL_RATIO,
                          f"median ratio {median:.3g}"))  # fmt: skip
    print_goals(goals)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
