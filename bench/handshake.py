"""In-process time of a full driver handshake (attach to DRIVER_OK) over unix:.

Starts ``l4vctl emulate blk`` on a temporary socket, then times opening a
Session (HELLO, DEVICE_CONFIG, GET_DEVICE_IRQ, ICU bind) and the handshake
(reset, ACKNOWLEDGE, DRIVER, FEATURES_OK, REGISTER_DS, CONFIG_QUEUE,
DRIVER_OK).  Baseline, same run: the bare SEQPACKET round trip (a 32-byte
frame echoed by a forked process), so the handshake can be read as "N round
trips".

Subject and baseline are interleaved in ``--pairs`` pairs (alternating which
goes first); each sample of a pair is the median of ``--runs`` handshakes or
of ``--trips`` round trips.  Every case runs twice by default: unpinned, and
with every process (this one, the emulator, the echo process) on CPU 0.
Prints min / median / max of both figures and of their ratio, and the CPUs
each process may run on and did run on.

    python bench/handshake.py [--pairs 7] [--runs 40] [--trips 400] [--mode ipc|cmd] [--cpus all|0]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import PY, add_placement_args, cpus_of, describe, interleave, machine, mmm, place, placements, ratios

#: Median handshake goals in seconds: unpinned (idle CPUs) and every process on one CPU.
GOAL = {False: 1e-3, True: 1.5e-3}


def last_cpu(pid: int = 0) -> int | None:
    """The CPU a process last ran on (field 39 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid or 'self'}/stat") as f:
            text = f.read()
        return int(text.rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


class Seen:
    """The CPUs processes were seen running on, sampled after every measurement."""

    def __init__(self) -> None:
        self.cpus: dict[str, set[int]] = {}

    def sample(self, **pids: int) -> None:
        for name, pid in pids.items():
            cpu = last_cpu(pid)
            if cpu is not None:
                self.cpus.setdefault(name, set()).add(cpu)

    def ran_on(self, name: str) -> str:
        return ",".join(map(str, sorted(self.cpus.get(name, ())))) or "?"


class Echo:
    """A forked process that sends back every SEQPACKET frame it gets."""

    def __init__(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            a.close()
            try:
                while True:
                    data = b.recv(64)
                    if not data:
                        break
                    b.send(data)
            finally:
                os._exit(0)
        b.close()
        self.sock = a
        self.pid = pid

    def round_trips(self, n: int) -> float:
        """Median seconds of ``n`` round trips."""
        a = self.sock
        msg = bytes(32)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            a.send(msg)
            a.recv(64)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def close(self) -> None:
        self.sock.close()
        os.waitpid(self.pid, 0)


def handshakes(url: str, mode: str, n: int) -> float:
    """Median seconds of ``n`` attach..DRIVER_OK handshakes."""
    from l4vctl.session import Session

    times = []
    for _ in range(n):
        t = time.perf_counter()
        s = Session(url, mode=mode)
        s.open()
        s.handshake()
        times.append(time.perf_counter() - t)
        s.close()
    return statistics.median(times)


def run_case(cpus: set[int] | None, args) -> float:
    """One placement: emulator and echo process started and pinned, pairs measured and printed."""
    from l4vctl.session import Session

    place(cpus)  # this process first: the children inherit it
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "blk.sock")
    cmd = [PY, "-m", "l4vctl", "emulate", "blk", "--socket", path, "-q"]
    if args.mode == "cmd":
        cmd.append("--cmd-mode")
    emu = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    echo = Echo()
    seen = Seen()
    try:
        place(cpus, emu.pid)  # explicitly, in case the emulator changed its own placement
        place(cpus, echo.pid)
        assert emu.stdout is not None
        emu.stdout.readline()  # the URL: the device is ready
        url = f"unix:{path}"
        for _ in range(20):  # warm up both sides
            with Session(url, mode=args.mode) as s:
                s.handshake()
        echo.round_trips(args.trips)

        def subject() -> float:
            t = handshakes(url, args.mode, args.runs)
            seen.sample(driver=0, emulator=emu.pid)
            return t

        def baseline() -> float:
            t = echo.round_trips(args.trips)
            seen.sample(driver=0, echo=echo.pid)
            return t

        subj, base = interleave(subject, baseline, args.pairs)
        allowed = f"driver {cpus_of(0)}, emulator {cpus_of(emu.pid)}, echo {cpus_of(echo.pid)}"
    finally:
        echo.close()
        emu.terminate()
        emu.wait(5)
        try:
            os.rmdir(tmp)
        except OSError:
            pass
        place(None)
    ratio = ratios(subj, base)
    print(f"\n## {describe(cpus)}; {args.pairs} pairs, mode {args.mode}; min / median / max")
    print(f"CPUs allowed: {allowed}")
    ran = ", ".join(f"{name} {seen.ran_on(name)}" for name in ("driver", "emulator", "echo"))
    print(f"CPUs seen:    {ran}")
    print(f"handshake attach..DRIVER_OK (median of {args.runs:4}) us  {mmm(subj, 1e6, '.1f')}")
    print(f"bare SEQPACKET round trip   (median of {args.trips:4}) us  {mmm(base, 1e6, '.1f')}")
    print(f"handshake / round trip                            x  {mmm(ratio, 1.0, '.1f')}")
    med = statistics.median(subj)
    goal = GOAL[cpus is not None and len(cpus) == 1]
    print(f"goal: median under {goal * 1e6:.0f} us -> {'met' if med < goal else 'NOT met'} ({med * 1e6:.1f} us)")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_placement_args(ap)
    ap.set_defaults(pairs=7)
    ap.add_argument("--runs", type=int, default=40, help="handshakes per subject sample")
    ap.add_argument("--trips", type=int, default=400, help="round trips per baseline sample")
    ap.add_argument("--mode", choices=["ipc", "cmd"], default="ipc")
    args = ap.parse_args()
    if args.pairs < 5:
        ap.error("--pairs: at least 5 pairs make a comparison")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# handshake benchmark: {machine()}; load average {load}")
    for cpus in placements(args.cpus):
        run_case(cpus, args)


if __name__ == "__main__":
    main()
