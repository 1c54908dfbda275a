"""Block I/O through an ``emu:`` emulator against same-run baselines.

Subject: ``l4vctl bench emu:blk?image=...`` (the emulator a command forks for
itself, as users run it) on an image file written with random data first.
Baselines, in the same run:

* qemu-storage-daemon (vhost-user-blk) on an image of the same size and
  content, driven by the same ``l4vctl bench`` driver, when it is installed:
  the ratio compares the devices;
* an eventfd ping-pong between two processes (one wake-up each way, no work
  at all), the floor of a notification-driven request at queue depth 1.

Each comparison runs in ``--pairs`` pairs that alternate which side goes
first, after a warm-up of both; every case runs unpinned and with every
process (this one, the bench driver and its emulator, every thread of
qemu-storage-daemon, both ping-pong processes) on CPU 0.  Printed:
min / median / max of each figure and of the pairwise ratios, and the CPUs
each process may run on and was seen on.

Goals (issue 11): emulator / qemu-storage-daemon >= 1.0x median for 4 KiB
randread QD1 and QD32 and 64 KiB seqread QD32, unpinned and on one CPU;
64 KiB seqread >= 2 GB/s.

    python bench/io.py [--pairs 5] [--time 2] [--cpus all|0] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import (
    PY,
    add_placement_args,
    cpus_of,
    describe,
    interleave,
    machine,
    mmm,
    place,
    placements,
    print_goals,
    ratios,
)
from vhost import CASES, WARM_UP, Seen, bench, qsd_command, report, start_qsd, stop, threads_of, write_images

#: The workloads: vhost.py's, and random writes.
IO_CASES = [*CASES, ("4 KiB randwrite QD32", ["--workload", "randwrite", "--bs", "4k", "--qd", "32"], "iops")]


def eventfd_ping_pong(seconds: float, seen: Seen) -> float:
    """Round trips per second of a counter bounced between two processes through two eventfds."""
    a = os.eventfd(0)
    b = os.eventfd(0)
    pid = os.fork()  # inherits this process's placement
    if pid == 0:
        try:
            while True:
                v = os.eventfd_read(a)
                if v > 1:
                    break
                os.eventfd_write(b, 1)
        finally:
            os._exit(0)
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        os.eventfd_write(a, 1)
        os.eventfd_read(b)
        n += 1
        if n % 4096 == 0:
            seen.sample("ping-pong", os.getpid())
            seen.sample("ping-pong", pid)
    elapsed = time.perf_counter() - start
    os.eventfd_write(a, 2)
    os.waitpid(pid, 0)
    os.close(a)
    os.close(b)
    return n / elapsed


def run_placement(cpus: set[int] | None, args, qsd_bin: str | None, emu_img: str, qsd_img: str, tmp: str) -> list:
    place(cpus)  # this process first: everything it starts inherits the placement
    qsd = None
    qsd_sock = os.path.join(tmp, "qsd.sock")
    seen = Seen()
    goals = []
    emu_url = f"emu:blk?image={emu_img}"
    try:
        if qsd_bin:
            qsd = start_qsd(qsd_bin, qsd_img, qsd_sock, cpus)
        print(f"\n## {describe(cpus)}; {args.pairs} pairs of {args.time:g} s per comparison; min / median / max")
        allowed = f"this process and what it starts {cpus_of(0)}"
        if qsd is not None:
            allowed += ", qemu-storage-daemon " + "/".join(sorted({cpus_of(t) for t in threads_of(qsd.pid)}))
        print(f"CPUs allowed: {allowed}")
        qd1 = IO_CASES[0][1]

        def emu_qd1() -> float:
            return bench(emu_url, qd1, args.time, cpus, seen, child="emulator")["iops"]

        def ping_pong() -> float:
            return eventfd_ping_pong(args.time, seen)

        ping_pong()  # warm-up
        subj, base = interleave(emu_qd1, ping_pong, args.pairs)
        print("4 KiB randread QD1 against the eventfd ping-pong")
        print(f"  {'emu: emulator':22s} {'req/s':6s} {mmm(subj, 1.0, ',.0f')}")
        print(f"  {'eventfd ping-pong':22s} {'trip/s':6s} {mmm(base, 1.0, ',.0f')}")
        print(f"  {'requests / round trips':22s} {'x':6s} {mmm(ratios(subj, base), 1.0, '.2f')}")
        for name, cargs, figure in IO_CASES:

            def subject(seconds=args.time, cargs=cargs):
                return bench(emu_url, cargs, seconds, cpus, seen, child="emulator")

            if qsd is None:
                subject(WARM_UP)
                results = [subject() for _ in range(args.pairs)]
                values = [r[figure] for r in results]
                print(f"{name}\n  {'emu: emulator':22s} {mmm(values, 1.0, ',.0f')} (no qemu-storage-daemon to compare)")
                continue

            def baseline(seconds=args.time, cargs=cargs, pid=qsd.pid):
                return bench(f"vhost-user:{qsd_sock}?type=blk", cargs, seconds, cpus, seen,
                             ("qemu-storage-daemon", pid))  # fmt: skip

            baseline(WARM_UP)  # warm up both, in the other order than the first pair
            subject(WARM_UP)
            s, b = interleave(subject, baseline, args.pairs)
            ratio = report(name, figure, s, b, "emu: emulator", "qemu-storage-daemon")
            if name != IO_CASES[-1][0]:
                goals.append((f"{describe(cpus)}: {name} emu: / qsd >= 1.0x median", ratio >= 1.0, f"{ratio:.2f}x"))
            if figure == "mb_per_s":
                mbs = statistics.median(r[figure] for r in s)
                goals.append((f"{describe(cpus)}: {name} >= 2,000 MB/s median", mbs >= 2000, f"{mbs:,.0f} MB/s"))
        ran = ", ".join(f"{n} {seen.ran_on(n)}" for n in ("driver", "emulator", "qemu-storage-daemon", "ping-pong"))
        print(f"CPUs seen: {ran}")
    finally:
        if qsd is not None:
            stop(qsd)
        place(None)
    return goals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_placement_args(ap)
    ap.add_argument("--time", type=float, default=2.0, help="seconds per sample")
    ap.add_argument("--size", type=int, default=256, help="image size in MiB")
    ap.add_argument("--dir", default=None, help="where the images go (default: a temporary directory)")
    args = ap.parse_args()
    if args.pairs < 5:
        ap.error("--pairs: at least 5 pairs make a comparison")
    qsd_bin = shutil.which("qemu-storage-daemon")
    tmp = tempfile.mkdtemp(dir=args.dir)
    emu_img, qsd_img = os.path.join(tmp, "emu.img"), os.path.join(tmp, "qsd.img")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# block I/O through emu:: {machine()}; load average {load}; driver {PY} -m l4vctl bench")
    print(f"# images: {args.size} MiB of random data each in {tmp}")
    if qsd_bin:
        print(f"# baseline: {' '.join(qsd_command(qsd_bin, qsd_img, 'SOCK'))}")
    else:
        print("# qemu-storage-daemon is not installed: compared with the eventfd ping-pong only")
    goals = []
    try:
        write_images([emu_img, qsd_img] if qsd_bin else [emu_img], args.size << 20)
        for cpus in placements(args.cpus):
            goals += run_placement(cpus, args, qsd_bin, emu_img, qsd_img, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_goals(goals)


if __name__ == "__main__":
    main()
