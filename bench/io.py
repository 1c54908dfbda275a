"""Block I/O through the emulator against a same-run eventfd ping-pong baseline.

Baseline: two processes bouncing a counter through a pair of eventfds (one
round trip = one wake-up each way), the cost of one notification-driven
request with no work at all.  Measured: ``l4vctl bench`` workloads on an
embedded emulator, printed as req/s and as a ratio to the ping-pong rate.

Goals (issue 4): 4 KiB random read at QD32 >= 50,000 req/s; 64 KiB
sequential read at QD32 >= 2 GB/s.

    python bench/io.py [--time 5] [--pin]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import PY, machine


def eventfd_ping_pong(seconds: float) -> float:
    a = os.eventfd(0)
    b = os.eventfd(0)
    pid = os.fork()
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
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < end:
        os.eventfd_write(a, 1)
        os.eventfd_read(b)
        n += 1
    elapsed = time.perf_counter() - start
    os.eventfd_write(a, 2)
    os.waitpid(pid, 0)
    os.close(a)
    os.close(b)
    return n / elapsed


def run_bench(args: list[str]) -> dict:
    out = subprocess.run([PY, "-m", "l4vctl", "bench", *args, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["result"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", type=float, default=5.0)
    ap.add_argument("--pin", action="store_true", help="run everything on CPU 0 (driver and device share it)")
    args = ap.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {0})
    t = f"{args.time}s"
    base = eventfd_ping_pong(min(args.time, 3.0))
    print(f"# {machine()}")
    print(f"eventfd ping-pong (baseline)     {base:10,.0f} round trips/s  1.00x")
    cases = [
        ("4 KiB randread QD1", ["emu:blk?size=256M", "--workload", "randread", "--bs", "4k", "--qd", "1"]),
        ("4 KiB randread QD32", ["emu:blk?size=256M", "--workload", "randread", "--bs", "4k", "--qd", "32"]),
        ("64 KiB seqread QD32", ["emu:blk?size=256M", "--workload", "seqread", "--bs", "64k", "--qd", "32"]),
        ("4 KiB randwrite QD32", ["emu:blk?size=256M", "--workload", "randwrite", "--bs", "4k", "--qd", "32"]),
    ]
    results = {}
    for name, cargs in cases:
        r = run_bench([*cargs, "--time", t])
        results[name] = r
        print(f"{name:32s} {r['iops']:10,.0f} req/s  {r['iops'] / base:5.2f}x   {r['mb_per_s']:9,.1f} MB/s   "
              f"p50 {r['latency_us']['p50']:7.1f} us  p99 {r['latency_us']['p99']:7.1f} us")  # fmt: skip
    rr = results["4 KiB randread QD32"]["iops"]
    sr = results["64 KiB seqread QD32"]["mb_per_s"]
    print(f"goal 4 KiB randread QD32 >= 50,000 req/s: {'met' if rr >= 50_000 else 'NOT met'} ({rr:,.0f})")
    print(f"goal 64 KiB seqread QD32 >= 2,000 MB/s:   {'met' if sr >= 2000 else 'NOT met'} ({sr:,.0f})")


if __name__ == "__main__":
    main()
