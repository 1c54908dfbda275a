"""In-process time of a full driver handshake (attach to DRIVER_OK) over unix:.

Starts ``l4vctl emulate blk`` on a temporary socket, then times, per run,
opening a Session (HELLO, DEVICE_CONFIG, GET_DEVICE_IRQ, ICU bind) and the
handshake (reset, ACKNOWLEDGE, DRIVER, FEATURES_OK, REGISTER_DS,
CONFIG_QUEUE, DRIVER_OK).  Baseline, same run: one bare SEQPACKET round trip
(a 32-byte frame echoed by a forked process), so the handshake can be read as
"N round trips".

    python bench/handshake.py [--runs 300] [--mode ipc|cmd]
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
from _util import PY, machine


def echo_round_trip(runs: int) -> list[float]:
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
    msg = bytes(32)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        a.send(msg)
        a.recv(64)
        times.append(time.perf_counter() - t)
    a.close()
    os.waitpid(pid, 0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--mode", choices=["ipc", "cmd"], default="ipc")
    args = ap.parse_args()
    from l4vctl.session import Session

    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "blk.sock")
    cmd = [PY, "-m", "l4vctl", "emulate", "blk", "--socket", path, "-q"]
    if args.mode == "cmd":
        cmd.append("--cmd-mode")
    emu = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        emu.stdout.readline()  # the URL: the device is ready
        url = f"unix:{path}"
        for _ in range(20):  # warm up
            with Session(url, mode=args.mode) as s:
                s.handshake()
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            s = Session(url, mode=args.mode)
            s.open()
            s.handshake()
            times.append(time.perf_counter() - t)
            s.close()
        base = echo_round_trip(args.runs * 10)
    finally:
        emu.terminate()
        emu.wait(5)
        os.rmdir(tmp)
    med = statistics.median(times)
    bmed = statistics.median(base)
    print(f"# {machine()}; {args.runs} handshakes, mode {args.mode}")
    print(f"bare SEQPACKET round trip    median {bmed * 1e6:8.1f} us   1.00x")
    print(
        f"handshake attach..DRIVER_OK  median {med * 1e6:8.1f} us  {med / bmed:6.1f}x  "
        f"(p10 {sorted(times)[len(times) // 10] * 1e6:.0f} us, p90 {sorted(times)[9 * len(times) // 10] * 1e6:.0f} us)"
    )
    print(f"goal: median under 1000 us -> {'met' if med < 1e-3 else 'NOT met'}")


if __name__ == "__main__":
    main()
