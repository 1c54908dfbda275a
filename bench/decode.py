"""Decoding a 32768-entry split queue: derived fast codecs against the baseline.

Baseline: ``struct.iter_unpack`` over the descriptor table plus a plain
``struct.unpack_from`` of both rings, written directly in this script.
Measured: l4vctl's derived ring codecs (``l4vctl.formats.fast.ring()``) and,
for reference, the Construct schemas (parse and compiled parse).

Each subject runs against the baseline in ``--pairs`` interleaved pairs (the
order alternates from pair to pair; one figure is the mean of a batch of
calls), unpinned and then pinned to CPU 0 (``--cpus``).  Printed: min /
median / max of both times and of the pair-by-pair ratio, the CPUs allowed
and the CPUs the samples ran on, and the load average before and after.

    python bench/decode.py [--num 32768] [--pairs 15] [--cpus all|0] [--skip-construct]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import add_placement_args, cpus_of, describe, interleave, machine, mmm, place, placements, ratios


def this_cpu() -> int:
    """The CPU this process runs on now (field 39 of /proc/self/stat)."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return -1


class Timed:
    """A function timed in batches: each figure is the mean of ``number`` calls; notes the CPUs used."""

    def __init__(self, fn, number: int):
        self.fn = fn
        self.number = number
        self.ran: set[int] = set()

    def run(self) -> float:
        """One batch's time per call."""
        fn = self.fn
        t = time.perf_counter()
        for _ in range(self.number):
            fn()
        elapsed = (time.perf_counter() - t) / self.number
        self.ran.add(this_cpu())
        return elapsed

    def cpus(self) -> str:
        """The CPUs the batches ended on, as text."""
        return ",".join(str(c) for c in sorted(self.ran) if c >= 0) or "?"


def batch_size(fn, budget: float) -> int:
    """How many calls of ``fn`` take about ``budget`` seconds (at least one)."""
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-9)
    return max(1, int(budget / once))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_placement_args(ap)
    ap.set_defaults(pairs=15)
    ap.add_argument("--num", type=int, default=32768)
    ap.add_argument("--skip-construct", action="store_true")
    ap.add_argument("--budget", type=float, default=0.02, help="seconds one figure's batch of calls takes")
    args = ap.parse_args()
    if args.pairs < 5:
        ap.error("--pairs must be at least 5")
    num = args.num

    from l4vctl.formats import fast

    r = fast.ring()
    layout = r.simple_layout(num)
    buf = bytearray(os.urandom(layout["total"]))
    mv = memoryview(buf)
    d0, a0, u0 = layout["desc"], layout["avail"], layout["used"]

    def baseline():
        descs = list(struct.iter_unpack("<QIHH", mv[d0 : d0 + 16 * num]))
        avail = struct.unpack_from(f"<HH{num}HH", buf, a0)
        used = list(struct.iter_unpack("<II", mv[u0 + 4 : u0 + 4 + 8 * num]))
        return descs, avail, used

    def derived():
        return r.descriptors(buf, num, d0), r.avail(buf, num, a0), r.used(buf, num, u0)

    subjects = [("l4vctl derived ring codecs", derived)]
    if not args.skip_construct:
        from l4vctl.formats import ring

        schemas = (ring.desc_table(num), ring.vring_avail(num), ring.vring_used(num))
        compiled = [s.compile() for s in schemas]

        def parse():
            return [s.parse(bytes(buf[o : o + s.sizeof()])) for s, o in zip(schemas, (d0, a0, u0))]

        def parse_compiled():
            return [s.parse(bytes(buf[o : o + s.sizeof()])) for s, o in zip(compiled, (d0, a0, u0))]

        subjects += [("construct parse", parse), ("construct compiled parse", parse_compiled)]

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# {machine()}; load average {load}")
    print(f"# queue size {num}: {layout['total']} bytes (descriptors + both rings)")
    print(f"# baseline: struct.iter_unpack / unpack_from; {args.pairs} interleaved pairs per subject, "
          "order alternating")  # fmt: skip
    print("# times in ms per decode as min / median / max; ratio = subject / baseline, pair by pair")
    home = os.sched_getaffinity(0)
    try:
        for cpus in placements(args.cpus):
            place(cpus)
            print(f"\n## {describe(cpus)} (allowed: cpus {cpus_of()})")
            for name, fn in subjects:
                subject = Timed(fn, batch_size(fn, args.budget))
                base = Timed(baseline, batch_size(baseline, args.budget))
                subj, ref = interleave(subject.run, base.run, args.pairs)
                where = f"ran on cpus {subject.cpus()} / {base.cpus()}"
                print(f"{name:28s} subject {mmm(subj, 1e3, '.2f')}  baseline {mmm(ref, 1e3, '.2f')}  "
                      f"ratio {mmm(ratios(subj, ref), 1.0, '.2f')}  {where}")  # fmt: skip
    finally:
        place(home)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n# load average after: {load}")


if __name__ == "__main__":
    main()
