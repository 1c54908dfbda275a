"""Hostile peers through shared memory and IRQs: both sides survive them.

* a driver that truncates, reseals or rewrites memory it shares with the
  emulator, or lends memory that is not a sealed memfd (SIGBUS class);
* a monitor that tries to write the device's page through its read-only fd;
* a device that serves an unsealed, short or non-memfd config page, or an IRQ
  that is not an eventfd;
* eventfds whose O_NONBLOCK a peer cleared, or whose counter is near 2^64;
* a DISCARD whose descriptors name 4 x 128 MiB of sparse memory.

Every test runs against real emulator processes or a real socket server and
real descriptors; every wait is bounded.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl import wire
from l4vctl.caps import PAGE, RIGHTS_RW, Dataspace, Irq, dataspace_problem
from l4vctl.errors import FormatError
from tests.emu import Cap, Session, call, emulator, wait_for

V = cat.L4VIRTIO_PROTOCOL
EINVAL = -cat.L4_EINVAL
FULL = 0xFFFFFFFFFFFFFFFE  # the largest value an eventfd counter holds


# -- helpers ---------------------------------------------------------------------------------------


def memfd(size: int, seals: int = 0, data: bytes = b"") -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if data:
        os.pwrite(fd, data, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def blocking(fd: int) -> None:
    """Clear O_NONBLOCK on the open file description (shared with the peer)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def bounded(fn, timeout: float = 3.0):
    """Run ``fn`` in a thread; fail (instead of hanging) if it does not return in time."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} blocked for more than {timeout} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def responsive(url: str, timeout: float = 2.0) -> bool:
    """Another client is served: a monitor attaches and reads the stats in time."""
    with Session(url, role="monitor", timeout=timeout, check=False) as m:
        return m.stats() is not None and m.get("magic") == cat.L4VIRTIO_MAGIC


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def emu(tmp_path):
    with emulator(tmp_path, "blk") as (url, proc):
        yield url, proc
        assert proc.poll() is None, f"the emulator died: exit {proc.returncode}"


# -- dataspaces and seals ------------------------------------------------------------------------


def test_created_dataspaces_are_sealed():
    ds = Dataspace.create("x", 4096)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(ds.fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(ds.fd, 1 << 20)
        with pytest.raises(PermissionError):  # nobody can add a write seal that locks the next mapping out
            fcntl.fcntl(ds.fd, fcntl.F_ADD_SEALS, 0x10)
        assert dataspace_problem(ds.fd, 4096) is None
    finally:
        ds.close()


HOSTILE_DS = {
    "unsealed memfd": lambda: memfd(0x4000),
    "grow-sealed only": lambda: memfd(0x4000, fcntl.F_SEAL_GROW),
    "regular file": lambda: _tmpfile(0x4000),
    "read-only file": lambda: _tmpfile(0x4000, os.O_RDONLY),
    "directory": lambda: os.open("/", os.O_RDONLY | os.O_DIRECTORY),
    "pipe": lambda: _pipe_end(),
    "socket": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach(),
    "eventfd": lambda: os.eventfd(0),
}


def _tmpfile(size: int, mode: int = os.O_RDWR) -> int:
    import tempfile

    fd, path = tempfile.mkstemp()
    try:
        os.ftruncate(fd, size)
        if mode != os.O_RDWR:
            os.close(fd)
            fd = os.open(path, mode)
    finally:
        os.unlink(path)
    return fd


def _pipe_end() -> int:
    r, w = os.pipe()
    os.close(r)
    return w


@pytest.mark.parametrize("kind", sorted(HOSTILE_DS))
def test_register_ds_refuses_what_a_peer_could_truncate(emu, kind):
    url, proc = emu
    with Session(url) as s:
        fd = HOSTILE_DS[kind]()
        try:
            result = call(s, V, cat.OP_REGISTER_DS, [0x200000, 0, 0x4000], [Cap(cat.CAP_DATASPACE, 5, 0, 0x4000)],
                          [fd])[0]  # fmt: skip
            assert result == EINVAL
            if kind == "unsealed memfd":
                os.ftruncate(fd, 0)  # what would have killed the emulator with SIGBUS
        finally:
            os.close(fd)
        assert responsive(url)
    assert proc.poll() is None


def test_truncated_ring_memory_cannot_kill_the_emulator(emu):
    """A driver whose ring memory is an unsealed memfd truncates it after setup: refused up front;
    with the sealed memory it must lend, the truncation itself fails."""
    url, _proc = emu
    with Session(url) as s:
        s.handshake()
        mem = s._memory[0]
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 0)
        vq = s.virtqueue(0)
        from l4vctl.drivers.blk import BlkDriver

        assert BlkDriver(s).get_id()  # the device still serves the rings
        assert vq.num
    assert responsive(url)


def test_driver_cannot_shrink_or_lock_the_config_page(emu):
    url, _proc = emu
    with Session(url) as s:
        r = s.channel.call(V, cat.OP_DEVICE_CONFIG)
        try:
            fd = r.fd(0, cat.CAP_DATASPACE)
        finally:
            r.close()
        try:
            for attempt in (lambda: os.ftruncate(fd, 0), lambda: os.ftruncate(fd, 1 << 20),
                            lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0x10)):  # fmt: skip
                with pytest.raises(PermissionError):
                    attempt()
        finally:
            os.close(fd)
    with Session(url) as s:  # the next driver still maps the page writable
        s.handshake()
    assert responsive(url)


def test_monitor_cannot_write_the_device_page(emu):
    url, _proc = emu
    with Session(url, role="monitor", check=False) as m:
        r = m.channel.call(V, cat.OP_DEVICE_CONFIG)
        try:
            fd = r.fd(0, cat.CAP_DATASPACE)
        finally:
            r.close()
        tried = 0
        try:
            os.fchmod(fd, 0o666)  # its owner may; it must not help
            try:
                rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            except OSError:
                rw = None
            for target in [fd] + ([rw] if rw is not None else []):
                for attempt in (
                    lambda t=target: os.pwrite(t, b"XXXX", 0),
                    lambda t=target: mmap.mmap(t, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
                    lambda t=target: os.ftruncate(t, 0),
                ):
                    tried += 1
                    with pytest.raises(OSError):
                        attempt()
            if rw is not None:
                os.close(rw)
        finally:
            os.close(fd)
        assert tried >= 3
    with Session(url) as s:  # the device's page is intact
        assert s.get("magic") == cat.L4VIRTIO_MAGIC
        s.handshake()


def test_monitor_copy_follows_the_device(tmp_path):
    with emulator(tmp_path, "blk") as (url, _proc):
        with Session(url, role="monitor", check=False) as m:
            assert m.status == 0
            with Session(url) as s:
                s.handshake()
                assert wait_for(lambda: m.status == s.status == cat.STATUS_RUNNING, 3)
                assert m.stats()["driver_attached"] == 1


# -- the driver side: a hostile device -------------------------------------------------------------


class HostileDevice:
    """A socket server that answers like a device, but hands out what ``serve`` says."""

    def __init__(self, path: str, config_fd=None, irq_fd=None, ds_offset: int = 0):
        self.path = path
        self.config_fd = config_fd  # callables making the fd to send
        self.irq_fd = irq_fd
        self.ds_offset = ds_offset
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(path)
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def good_page() -> int:
        page = pg.build_page("current", 2, features={cat.VERSION_1_BIT}, num_queues=1)
        return memfd(PAGE, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, bytes(page))

    def _run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                self._serve(conn)

    def _serve(self, conn) -> None:
        while not self.stop:
            try:
                f = wire.recv(conn, 0.2, any_version=True)
            except TimeoutError:
                continue
            except (wire.Closed, wire.WireError, OSError):
                return
            f.close_fds()
            words, caps, fds = [], [], []
            if f.kind == cat.KIND_HELLO:
                wire.send(
                    conn, wire.encode(cat.KIND_WELCOME, f.seq, 0, 0, [cat.WIRE_VERSION, f.words[2], cat.MAX_FRAME, 2])
                )
                continue
            if f.opcode == cat.OP_DEVICE_CONFIG and f.label == V:
                fd = (self.config_fd or self.good_page)()
                words, caps, fds = [self.ds_offset], [Cap(cat.CAP_DATASPACE, RIGHTS_RW, 0, PAGE)], [fd]
            elif f.opcode == cat.OP_GET_DEVICE_IRQ and f.label == V:
                fds = [(self.irq_fd or (lambda: os.eventfd(0, os.EFD_NONBLOCK)))()]
                caps = [Cap(cat.CAP_IRQ, 1, 0, 0)]
            try:
                wire.send(conn, wire.encode(cat.KIND_REPLY, f.seq, 0, f.opcode, words, caps), fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        self.sock.close()


HOSTILE_PAGES = {
    "unsealed memfd": (lambda: _page_fd(0), "not sealed against shrinking"),
    "short sealed memfd": (lambda: memfd(100, fcntl.F_SEAL_SHRINK), "holds 100 bytes"),
    "regular file": (lambda: _tmpfile(PAGE), "not a memfd"),
    "pipe": (_pipe_end, "not a memfd"),
    "directory": (lambda: os.open("/", os.O_RDONLY | os.O_DIRECTORY), "not a memfd"),
    "eventfd": (lambda: os.eventfd(0), "not a memfd"),
}


def _page_fd(seals: int) -> int:
    page = pg.build_page("current", 2, features={cat.VERSION_1_BIT}, num_queues=1)
    return memfd(PAGE, seals, bytes(page))


HOSTILE_IRQS = {
    "pipe with no reader": _pipe_end,
    "read-only file": lambda: _tmpfile(8, os.O_RDONLY),
    "directory": lambda: os.open("/", os.O_RDONLY | os.O_DIRECTORY),
    "socket": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach(),
    "memfd": lambda: memfd(8, fcntl.F_SEAL_SHRINK),
}


@pytest.fixture
def device_path(tmp_path):
    return str(tmp_path / "hostile.sock")


@pytest.mark.parametrize("kind", sorted(HOSTILE_PAGES))
def test_session_refuses_an_unsafe_config_page(device_path, kind):
    make, why = HOSTILE_PAGES[kind]
    dev = HostileDevice(device_path, config_fd=make)
    try:
        for role in ("monitor", "driver"):
            with pytest.raises(FormatError, match=why):
                with Session(f"unix:{device_path}", role=role, timeout=2):
                    pass
    finally:
        dev.close()


def test_session_refuses_a_page_beyond_its_dataspace(device_path):
    dev = HostileDevice(device_path, config_fd=lambda: _page_fd(fcntl.F_SEAL_SHRINK), ds_offset=PAGE)
    try:
        with pytest.raises(FormatError, match="holds 4096 bytes"):
            with Session(f"unix:{device_path}", timeout=2):
                pass
    finally:
        dev.close()


@pytest.mark.parametrize("kind", sorted(HOSTILE_IRQS))
def test_session_refuses_an_irq_that_is_not_an_eventfd(device_path, kind):
    dev = HostileDevice(device_path, irq_fd=HOSTILE_IRQS[kind])
    try:
        with pytest.raises(FormatError, match="device IRQ refused: it is an? .* not an eventfd"):
            with Session(f"unix:{device_path}", timeout=2):
                pass
    finally:
        dev.close()


def test_a_good_fake_device_attaches(device_path):
    dev = HostileDevice(device_path)
    try:
        with Session(f"unix:{device_path}", timeout=2) as s:
            assert s.get("device") == 2
    finally:
        dev.close()


@pytest.mark.parametrize("what", ["page", "irq"])
def test_cli_exits_4_with_one_line(device_path, what):
    kw = {"config_fd": lambda: _page_fd(0)} if what == "page" else {"irq_fd": _pipe_end}
    dev = HostileDevice(device_path, **kw)
    try:
        p = subprocess.run([sys.executable, "-m", "l4vctl", "negotiate", f"unix:{device_path}", "--timeout", "2"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    finally:
        dev.close()
    assert p.returncode == 4, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l4vctl: ") and "refused" in lines[0], p.stderr


# -- eventfds a peer made blocking ------------------------------------------------------------------


def test_irq_never_blocks_on_a_hostile_eventfd():
    fd = os.eventfd(0)  # blocking, as a hostile peer leaves it
    irq = Irq(fd)
    try:
        assert bounded(irq.drain) == 0
        os.eventfd_write(fd, FULL)
        assert bounded(irq.trigger) is False  # the counter is full: counted as pending
        assert bounded(irq.drain) == FULL
        assert bounded(irq.trigger) is True
    finally:
        irq.close()


def test_irq_adopt_restores_nonblocking_and_refuses_others():
    fd = os.eventfd(0)
    irq = Irq.adopt(fd)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        irq.close()
    for make in HOSTILE_IRQS.values():
        with pytest.raises(FormatError, match="not an eventfd"):
            Irq.adopt(make())


def test_a_write_a_peer_made_block_is_unblocked():
    """The race a poll cannot close: the peer fills the counter between poll and write."""
    code = (
        "import os, time\n"
        "import select\n"
        "from l4vctl.caps import _GUARD, Irq\n"
        "irq = Irq(os.eventfd(0))\n"
        "class Racing:\n"  # poll says there is room; the peer fills the counter right after
        "    def poll(self, ms):\n"
        f"        os.eventfd_write(irq.fd, {FULL})\n"
        "        return [(irq.fd, select.POLLOUT)]\n"
        "irq._poll = Racing()\n"
        "_GUARD.watch(irq)\n"
        "t = time.monotonic()\n"
        "ok = irq.trigger()\n"
        "print(round(time.monotonic() - t, 2), _GUARD.unblocked, ok)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    elapsed, unblocked, ok = p.stdout.split()
    assert float(elapsed) < 2 and int(unblocked) == 1 and ok == "True"


def _get_id_request(s, vq):
    """Queue a GET_ID request without waiting for it; returns its status byte view."""
    mem, addr = s.alloc(4096, "hostile-req")
    struct.pack_into("<IIQ", mem, 0, cat.BLK_T_GET_ID, 0, 0)
    mem[100] = 0xFF
    vq.add([(addr, 16, False), (addr + 32, 20, True), (addr + 100, 1, True)], "id")
    vq.kick()
    return mem[100:101]


def test_full_driver_irq_does_not_hang_the_emulator(emu):
    url, _proc = emu
    with Session(url, timeout=2) as s:
        s.handshake()
        vq = s.virtqueue(0)
        fd = s.driver_irq.fd
        blocking(fd)
        os.eventfd_write(fd, FULL)
        status = _get_id_request(s, vq)
        assert wait_for(lambda: status[0] == cat.BLK_S_OK, 3)  # completed although its IRQ could not fire
        assert responsive(url)
        status.release()
    assert responsive(url)


def test_kick_irq_made_blocking_does_not_hang_the_emulator(emu):
    url, _proc = emu
    with Session(url, timeout=2) as s:
        s.handshake()
        blocking(s.device_irq.fd)  # the device's own kick IRQ: the open file is shared
        vq = s.virtqueue(0)
        status = _get_id_request(s, vq)
        assert wait_for(lambda: status[0] == cat.BLK_S_OK, 3)
        assert s.stats()["status"] == cat.STATUS_RUNNING
        assert responsive(url)
        status.release()


@pytest.mark.parametrize("kind", sorted(HOSTILE_IRQS))
def test_icu_bind_refuses_what_is_not_an_eventfd(emu, kind):
    url, _proc = emu
    with Session(url) as s:
        fd = HOSTILE_IRQS[kind]()
        try:
            assert call(s, cat.L4_PROTO_IRQ, cat.ICU_OP_BIND, [0], [Cap(cat.CAP_IRQ, 1, 0)], [fd])[0] == EINVAL
        finally:
            os.close(fd)
    assert responsive(url)


# -- unbounded work from one request -------------------------------------------------------------------


def test_discard_naming_512_mib_is_refused_quickly(emu):
    url, proc = emu
    with Session(url, timeout=5) as s:
        s.handshake()
        vq = s.virtqueue(0)
        _big, base = s.alloc(4 * (128 << 20), "hostile-sparse")  # sparse: nothing touched
        mem, addr = s.alloc(4096, "hostile-req")
        struct.pack_into("<IIQ", mem, 0, cat.BLK_T_DISCARD, 0, 0)
        mem[100] = 0xFF
        bufs = [(addr, 16, False)] + [(base + i * (128 << 20), 128 << 20, False) for i in range(4)]
        bufs.append((addr + 100, 1, True))
        before = vm_hwm(proc.pid)
        t0 = time.monotonic()
        vq.add(bufs, "discard")
        vq.kick()
        assert responsive(url, timeout=2)  # another client is served meanwhile
        assert wait_for(lambda: mem[100] != 0xFF, 2)
        elapsed = time.monotonic() - t0
        assert mem[100] == cat.BLK_S_IOERR
        assert elapsed < 2
        assert vm_hwm(proc.pid) - before < 32 << 20
        # a well-formed one over the whole device completes as quickly
        struct.pack_into("<IIQ", mem, 0, cat.BLK_T_WRITE_ZEROES, 0, 0)
        struct.pack_into("<QII", mem, 16, 0, (64 << 20) // 512, 0)
        mem[100] = 0xFF
        vq.add([(addr, 32, False), (addr + 100, 1, True)], "wz")
        vq.kick()
        assert wait_for(lambda: mem[100] != 0xFF, 2) and mem[100] == cat.BLK_S_OK
        assert vm_hwm(proc.pid) - before < 32 << 20
    assert responsive(url)


def test_write_zeroes_over_a_large_image_file_is_fast(tmp_path):
    from l4vctl.drivers.blk import BlkDriver

    image = tmp_path / "big.img"
    with emulator(tmp_path, "blk", "--image", str(image), "--size", "4G") as (url, _proc):
        with Session(url, timeout=5) as s:
            s.handshake()
            d = BlkDriver(s)
            d.write(8, b"\x5a" * 4096)
            t0 = time.monotonic()
            d.write_zeroes(0, (4 << 30) // 512)
            d.discard(0, (4 << 30) // 512)
            assert time.monotonic() - t0 < 2
            assert bytes(d.read(8, 4096)) == bytes(4096)
    assert os.stat(image).st_blocks * 512 < 16 << 20
