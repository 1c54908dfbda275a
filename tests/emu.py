"""Helpers to run real emulator processes and talk to them at the IPC level."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import time

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.caps import Dataspace, Irq
from l4vctl.session import Session
from l4vctl.wire import Cap


@contextlib.contextmanager
def emulator(tmp_path, kind: str = "blk", *args: str, name: str = "dev.sock"):
    """``l4vctl emulate KIND --socket PATH ARGS`` as a process; yields (url, proc)."""
    path = tmp_path / name
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4vctl", "emulate", kind, "--socket", str(path), "-q", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the emulator did not become ready"
        line = proc.stdout.readline().strip()
        assert line == f"unix:{path}", (line, proc.stderr.read() if proc.poll() is not None else "")
        yield line, proc
    finally:
        reap(proc)


@contextlib.contextmanager
def emulators(count: int, *args: str):
    """``l4vctl emulate -q ARGS`` serving ``count`` devices from one process; yields (urls, proc).

    The process prints one ready line per device, in the order given.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4vctl", "emulate", "-q", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield ready_lines(proc, count), proc
    finally:
        reap(proc)


def ready_lines(proc: subprocess.Popen, count: int, timeout: float = 20) -> list[str]:
    """The first ``count`` lines of a process's stdout, read unbuffered (they may come in one write)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"the emulator did not become ready: {data!r}"
        chunk = os.read(fd, 65536)
        assert chunk, (data, proc.stderr.read() if proc.stderr is not None and proc.poll() is not None else "")
        data += chunk
    lines = data.decode().splitlines()
    assert len(lines) == count, lines
    return lines


def reap(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a test's process however the test went: SIGTERM, then SIGKILL; close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def call(s: Session, label: int, opcode: int, words=(), caps=(), fds=(), timeout=None):
    """A raw IPC through a session's channel; returns (result, words, caps) and closes fds."""
    r = s.channel.call(label, opcode, list(words), list(caps), list(fds), timeout)
    out = (r.result, list(r.words), list(r.caps))
    r.close()
    return out


def set_status(s: Session, value: int) -> int:
    """SET_STATUS by IPC; returns the status the device shows afterwards."""
    result, _w, _c = call(s, cat.L4VIRTIO_PROTOCOL, cat.OP_SET_STATUS, [value])
    assert result == 0
    return s.status


def config_queue(s: Session, index: int) -> int:
    return call(s, cat.L4VIRTIO_PROTOCOL, cat.OP_CONFIG_QUEUE, [index])[0]


def register(s: Session, ds: Dataspace, base: int, offset: int = 0, size: int | None = None, rights: int = 5) -> int:
    size = ds.size if size is None else size
    return call(s, cat.L4VIRTIO_PROTOCOL, cat.OP_REGISTER_DS, [base, offset, size],
                [Cap(cat.CAP_DATASPACE, rights, 0, ds.size)], [ds.fd])[0]  # fmt: skip


def write_features(s: Session, bits) -> None:
    from l4vctl import page as pg

    off = s.hc.fields["driver_features_map"][0]
    for i, word in enumerate(pg.feature_words(s.abi, bits)):
        s._w32[(off >> 2) + i] = word


def write_queue(s: Session, index: int, **fields) -> None:
    """Store queue-config fields in the page (single stores)."""
    from l4vctl import page as pg

    qc = pg.queue_codec()
    base = s.get("queues_offset") + index * cat.QUEUE_ENTRY_STRIDE
    w16 = s.page.cast("H")
    w64 = s.page.cast("Q")
    try:
        for name, value in fields.items():
            off, size, _fmt, _count = qc.fields[name]
            if size == 2:
                w16[(base + off) >> 1] = value
            else:
                w64[(base + off) >> 3] = value
    finally:
        w16.release()
        w64.release()


def read_queue(s: Session, index: int) -> dict:
    from l4vctl import page as pg

    return pg.queue_codec().unpack(s.page, s.get("queues_offset") + index * cat.QUEUE_ENTRY_STRIDE)


def rings(num: int, base: int = 0x200000):
    """Device addresses of a simple ring layout at ``base`` and the bytes it needs."""
    from l4vctl.formats.fast import ring

    lay = ring().simple_layout(num)
    return base + lay["desc"], base + lay["avail"], base + lay["used"], lay["total"]


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.005):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


__all__ = ["Cap", "Dataspace", "Irq", "Session"]


def raw_connect(url: str) -> socket.socket:
    """A bare SEQPACKET connection to a unix: URL (5 s timeout), for frames made by hand."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(url[5:])
    return s


def hello(role: int = cat.ROLE_DRIVER, seq: int = 1) -> bytes:
    """A HELLO frame of the fd profile."""
    return wire.encode(cat.KIND_HELLO, seq, 0, 0, [cat.WIRE_VERSION, cat.WIRE_VERSION, role, cat.PROFILE_FD])


def listening(path) -> bool:
    """Whether a Unix socket is bound at ``path`` and listening (from /proc/net/unix, without connecting)."""
    want = str(path)
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == want and int(parts[3], 16) & 0x10000:  # __SO_ACCEPTCON
                return True
    return False
