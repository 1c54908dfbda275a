"""The L4Re bridge on a real L4Re system under QEMU: link rate, memory transfers, probe, negotiate.

Boots the system of tests/l4re_system.py (cons, l4vio_switch, ahci-drv,
l4vagent on COM2), then, interleaved and repeated:

- **raw**: the link's byte rate, from ECHO requests to the agent (N random
  bytes out in 4 KiB frames, the same bytes back, as many frames in flight as
  memory transfers use: 2N bytes on the line);
- **memory**: the same N random (incompressible) bytes written to a
  dataspace the agent allocated and read back through the remote memory
  contract (WRITE then READ frames, 4 KiB of data each), as 2N bytes per
  second; the ratio memory/raw is the protocol's efficiency;
- **page**: reading a whole fresh config page (zero runs on the line);
- **probe / negotiate**: in-process, on a link that is already up, and the
  whole ``l4vctl probe`` command (process start and link set-up included).

    python bench/bridge.py [--pairs 5] [--bytes 16384] [--cpus all|0]

Each case runs unpinned and then with this process and QEMU on CPU 0 (``--cpus``
picks one of the two).  Prints min/median/max per case and the CPUs each
process ran on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _util import PY, add_placement_args, cpus_of, describe, interleave, machine, place, placements

from tests.l4re_system import L4reSystem


def stats(xs: list[float]) -> str:
    return f"min {min(xs):.3g}  median {statistics.median(xs):.3g}  max {max(xs):.3g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    add_placement_args(ap)
    ap.add_argument("--bytes", type=int, default=16384, help="bytes per raw echo / memory transfer")
    args = ap.parse_args()

    print(f"bridge benchmark: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        system = L4reSystem(Path(tmp))
        system.start()
        boot = time.perf_counter() - t
        try:
            assert system.proc is not None
            print(f"boot to the agent's ready line: {boot:.2f} s (SDK unpacked and agent built before)")
            for cpus in placements(args.cpus):
                place(cpus)
                place(cpus, system.proc.pid)
                print(f"\n{describe(cpus)}: this process on CPUs {cpus_of(0)}, QEMU on {cpus_of(system.proc.pid)}")
                run(args, system)
        finally:
            system.stop()


def run(args, system) -> None:
    """One placement: every case, interleaved pairs."""
    from l4vctl import catalog as cat
    from l4vctl.backends import open_backend
    from l4vctl.backends.l4re import CHUNK, WINDOW, L4reChannel, RemoteMemory
    from l4vctl.session import Session

    backend = open_backend(system.url("con0"))
    link = backend.open_link(10.0)  # type: ignore[attr-defined]
    r = link.agent(cat.AGENT_OP_ALLOC_DS, [args.bytes, 0])
    mem = RemoteMemory(link, r.caps[0].handle, 0, r.caps[0].size)
    con = dict(link.devices())
    inv = {v: k for k, v in con.items()}
    channel = L4reChannel(link, inv["con0"], "con0", "monitor", "")
    cfg = channel.call(cat.L4VIRTIO_PROTOCOL, cat.OP_DEVICE_CONFIG)
    page = channel.config_memory(cfg, 0, cfg.words[0], False)

    def raw_once() -> float:
        data = os.urandom(args.bytes)
        t = time.perf_counter()
        chunks = [data[off : off + CHUNK] for off in range(0, args.bytes, CHUNK)]
        for i in range(0, len(chunks), WINDOW):  # as many in flight as memory transfers have
            part = chunks[i : i + WINDOW]
            frames = [(cat.KIND_REQUEST, 0, [], c, len(c)) for c in part]
            replies = link.pipeline(frames, cat.L4VCTL_PROTO_AGENT, cat.AGENT_OP_ECHO)
            assert [r.data for r in replies] == part
        return 2 * args.bytes / (time.perf_counter() - t)

    def memory_once() -> float:
        data = os.urandom(args.bytes)
        t = time.perf_counter()
        mem.write([(0, data)])
        back = mem.read([(0, args.bytes)])[0]
        rate = 2 * args.bytes / (time.perf_counter() - t)
        assert back == data
        return rate

    memory, raw = interleave(memory_once, raw_once, args.pairs)  # alternating which goes first
    page_t = []
    for _ in range(args.pairs):
        t = time.perf_counter()
        page.read([(0, cat.PAGE_SIZE)])
        page_t.append(time.perf_counter() - t)
    ratios = [m / r for m, r in zip(memory, raw, strict=True)]
    print(f"raw link (ECHO, {args.bytes} B each way):    {stats([x / 1024 for x in raw])} KiB/s on the line")
    print(f"memory (WRITE+READ, {args.bytes} B):        {stats([x / 1024 for x in memory])} KiB/s")
    print(f"memory / raw, pair by pair:            {stats(ratios)}")
    print(f"whole config page read (4096 B):       {stats([x * 1000 for x in page_t])} ms")
    link.bye()
    link.close()

    probe, negotiate, command = [], [], []
    for _ in range(args.pairs):
        s = Session(system.url("con0"), role="monitor")
        t = time.perf_counter()
        with s:
            s.header()
        probe.append(time.perf_counter() - t)
        s = Session(system.url("con0"))
        t = time.perf_counter()
        with s:
            s.handshake()
        negotiate.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([PY, "-m", "l4vctl", "probe", system.url("con0")], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        command.append(time.perf_counter() - t)
    print(f"probe, session open to header read:    {stats([x * 1000 for x in probe])} ms (link set-up included)")
    print(f"handshake to DRIVER_OK with 2 queues:  {stats([x * 1000 for x in negotiate])} ms")
    print(f"'l4vctl probe' whole command:          {stats([x * 1000 for x in command])} ms")


if __name__ == "__main__":
    main()
