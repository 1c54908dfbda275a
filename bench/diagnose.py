"""``l4vctl diagnose`` on a 32768-entry queue: the work apart from the interval.

An emulator process (rng, num_max 32768, fault stop-completing) gets a driver
in this process that offers 32768 one-buffer chains on a running device; the
device takes them all and completes none, so the queue is full and stalled.
A second session, a monitor, then measures:

- look: ``diagnosis.look(monitor)`` — the page, monitor STATS, REGIONS and one
  READ of each ready queue's ring words (12 bytes whatever the queue's size);
- diagnose work: two looks and the analysis (``diagnose --interval 0`` but for
  the sleep), the figure the goal is about;
- diagnose process: ``l4vctl diagnose URL --interval 0.01 --json`` as a new
  process (Python start-up, the 10 ms interval and JSON output included).

Printed: min / median / max in milliseconds over --runs runs, the CPUs, the
load average, and whether the goal (a 32768-entry queue read in < 50 ms apart
from the interval) is met.

    python bench/diagnose.py [--runs 15] [--num 32768] [--process-runs 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import PY, cpus_of, machine, mmm, print_goals, start_emulator, timed


def fill(s, num: int) -> None:
    """Handshake with queues of ``num`` entries, then every slot of queue 0 offered and kicked."""
    s.handshake(queue_size=num)
    _mem, addr = s.alloc(num * 16)
    vq = s.virtqueue(0)
    for i in range(num):
        vq.add([(addr + 16 * i, 16, True)], i)
    vq.kick()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--num", type=int, default=32768)
    ap.add_argument("--process-runs", type=int, default=5)
    args = ap.parse_args()

    from l4vctl import diagnosis as dg
    from l4vctl.catalog import Role
    from l4vctl.session import Session

    print(f"# {machine()}; this process may run on CPUs {cpus_of()}")
    print(f"# load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_emulator(
            os.path.join(tmp, "rng.sock"), "rng", "--num-max", str(args.num), "--inject", "stop-completing"
        )
        try:
            with Session(url, timeout=30) as driver:
                fill(driver, args.num)
                with Session(url, role=Role.MONITOR) as m:
                    deadline = time.monotonic() + 30
                    while m.stats()["queues"][0]["next_avail"] != args.num % 65536:
                        if time.monotonic() > deadline:
                            raise SystemExit("the device did not take every request")
                        time.sleep(0.01)

                    def look():
                        state = dg.look(m)
                        assert state.queues[0].ring_source == "memory"  # the words came from the driver's memory
                        return state

                    def work():
                        found = dg.diagnose(dg.look(m), dg.look(m), 0.0)
                        assert any(f["kind"] == "device-stalled" for f in found), found

                    results = {
                        "look": timed(look, args.runs),
                        "diagnose work (2 looks + analysis)": timed(work, args.runs),
                    }
                    procs = []
                    for _ in range(args.process_runs):
                        t = time.perf_counter()
                        argv = [PY, "-m", "l4vctl", "diagnose", url, "--interval", "0.01", "--json"]
                        r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
                        procs.append(time.perf_counter() - t)
                        assert r.returncode == 6, r.returncode
                    results["diagnose process (--json)"] = procs
        finally:
            proc.terminate()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
    print(f"# queue of {args.num} entries, all taken by the device and none completed")
    print(f"{'what':<38} {'ms min / median / max':>26}")
    for what, times in results.items():
        print(f"{what:<38} {mmm(times, 1e3, '.2f'):>26}")
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    key = "diagnose work (2 looks + analysis)"
    print_goals([
        (f"diagnose reads a {args.num}-entry queue in < 50 ms apart from the interval (median)", med[key] < 0.05,
         f"{med[key] * 1e3:.2f} ms"),
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
