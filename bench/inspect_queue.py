"""Reading a 32768-entry queue as a monitor: Snapshot.capture, the queue view, queue-show.

An emulator process (rng, num_max 32768) gets a driver in this process that
offers 32768 one-buffer chains and never lets the device run (the queues are
set up, DRIVER_OK is not), so every chain stays in flight.  A second session,
a monitor, then measures:

- capture: ``Snapshot.capture(monitor)`` — page, monitor STATS, REGIONS and
  one READ of the descriptor table (512 KiB), available (64 KiB) and used
  ring (256 KiB);
- capture+walk: capture, the QueueState, and a walk of all 32768 chains;
- queue-show: the command's work (``queue_show.show``): capture, buffer
  memory, walks and payload decoding of all 32768 chains, without rendering;
- queue-show process: ``l4vctl queue-show URL --queue 0 --json`` as a new
  process, output to /dev/null (Python start-up and JSON output included).

Printed: min / median / max in milliseconds over --runs runs, the CPUs, and
whether the goal (read a 32768-entry queue in < 50 ms) is met.

    python bench/inspect_queue.py [--runs 15] [--num 32768] [--process-runs 5]
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


def offer_all(s, num: int) -> None:
    """Queues up without DRIVER_OK, then every slot of queue 0 offered (avail.idx published)."""
    from l4vctl import catalog as cat

    s.reset()
    s.write_status(cat.STATUS_ACKNOWLEDGE)
    s.write_status(cat.STATUS_ACKNOWLEDGE | cat.STATUS_DRIVER)
    s.negotiate(None, (), (), s.get("device"))
    s.setup_queues(num)
    _mem, addr = s.alloc(num * 16)
    vq = s.virtqueue(0)
    for i in range(num):
        vq.add([(addr + 16 * i, 16, True)], i)
    vq._avail_idx[0] = vq.avail_idx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--num", type=int, default=32768)
    ap.add_argument("--process-runs", type=int, default=5)
    args = ap.parse_args()

    from l4vctl.commands.queue_show import show
    from l4vctl.ringread import gc_paused, queue_state
    from l4vctl.session import Session
    from l4vctl.snapshot import Snapshot

    print(f"# {machine()}; this process may run on CPUs {cpus_of()}")
    print(f"# load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_emulator(os.path.join(tmp, "rng.sock"), "rng", "--num-max", str(args.num))
        try:
            with Session(url) as driver:
                offer_all(driver, args.num)
                with Session(url, role="monitor") as m:

                    def capture():
                        return Snapshot.capture(m)

                    def capture_walk():
                        q = queue_state(Snapshot.capture(m), 0)
                        window, _found = q.outstanding()
                        chains = q.walk_many((h, i) for i, _slot, h, _st in window)
                        assert len(chains) == args.num and all(c.ok for c in chains)

                    def command():
                        with gc_paused():  # as the command runs it
                            r = show(m, 0)
                        assert len(r["chains"]) == args.num

                    results = {
                        "capture": timed(capture, args.runs),
                        "capture+walk": timed(capture_walk, args.runs),
                        "queue-show (no rendering)": timed(command, max(3, args.runs // 3)),
                    }
                    snap = capture()
                    size = sum(r.size for r in snap.regions)
                    procs = []
                    for _ in range(args.process_runs):
                        t = time.perf_counter()
                        subprocess.run([PY, "-m", "l4vctl", "queue-show", url, "--queue", "0", "--json"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)  # fmt: skip
                        procs.append(time.perf_counter() - t)
                    results["queue-show process (--json)"] = procs
        finally:
            proc.terminate()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
    print(f"# queue of {args.num} entries, {args.num} chains in flight; capture reads {size} bytes of ring memory")
    print(f"{'what':<30} {'ms min / median / max':>26}")
    for what, times in results.items():
        print(f"{what:<30} {mmm(times, 1e3, '.2f'):>26}")
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    print_goals([
        (f"Snapshot.capture of a {args.num}-entry queue < 50 ms (median)", med["capture"] < 0.05,
         f"{med['capture'] * 1e3:.2f} ms"),
        (f"capture and walk every chain of a {args.num}-entry queue < 50 ms (median)",
         med["capture+walk"] < 0.05, f"{med['capture+walk'] * 1e3:.2f} ms"),
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
