"""Monitor REGIONS and READ: a second client reads the driver's registered memory, read-only."""

from __future__ import annotations

import errno
import fcntl
import os
import time

import pytest

from l4vctl import catalog as cat
from l4vctl.caps import SEAL_GROW, SEAL_SHRINK, SEAL_WRITE, fd_kind
from l4vctl.drivers.console import ConsoleDriver
from l4vctl.errors import FormatError, UnavailableError, UsageError
from l4vctl.session import Session
from tests.emu import emulator

MON = cat.L4VCTL_PROTO_MONITOR


@pytest.fixture(params=["classic", "current"])
def console(request, tmp_path):
    """A console emulator process with a driver attached (receive buffers posted); yields (url, driver session)."""
    with emulator(tmp_path, "console", "--abi", request.param) as (url, _proc):
        with Session(url) as d:
            d.handshake()
            ConsoleDriver(d)
            yield url, d


def raw(s: Session, opcode: int, words=()):
    """A monitor request through the session's channel: (result, words, caps, fds); the caller closes fds."""
    r = s.channel.call(MON, opcode, list(words))
    return r.result, list(r.words), list(r.caps), list(r.fds)


def test_regions_are_what_the_driver_registered(console):
    url, d = console
    with Session(url, role="monitor") as m:
        regions = m.regions()
    assert regions and all(w for _b, _n, w in regions)
    lent = d._memory
    assert len(regions) == len(lent)
    for base, size, _w in regions:
        assert base % 4096 == 0 and size % 4096 == 0
    # every configured ring lies inside one listed region
    for q in d.queues:
        for addr in (q.desc, q.avail, q.used):
            assert any(b <= addr < b + n for b, n, _w in regions), hex(addr)


def test_read_returns_the_driver_bytes(console):
    url, d = console
    mem = d.ring_memory
    q = d.queues[0]
    with Session(url, role="monitor") as m:
        data = m.read_device_memory([(q.desc, 64), (q.avail, 8), (q.desc + 16, 16)])
    base = d.queues[0].desc
    want = bytes(mem[0:64]) + bytes(mem[q.avail - base : q.avail - base + 8]) + bytes(mem[16:32])
    assert bytes(data) == want
    assert bytes(data[64 + 2 : 64 + 4]) != b"\0\0"  # avail.idx: the receive buffers are posted


def test_read_copy_is_sealed_and_not_the_drivers_memfd(console):
    url, d = console
    q = d.queues[0]
    with Session(url, role="monitor") as m:
        result, words, caps, fds = raw(m, cat.MONITOR_OP_READ, [q.desc, 4096])
        try:
            assert result == 0 and words == [4096] and len(fds) == 1
            assert caps[0].type == cat.CAP_DATASPACE and caps[0].rights == 0x4  # R only
            fd = fds[0]
            assert fd_kind(fd) == "memfd"
            have = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert have & (SEAL_SHRINK | SEAL_GROW | SEAL_WRITE) == SEAL_SHRINK | SEAL_GROW | SEAL_WRITE
            # reopening it read-write gives no way to change it
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                with pytest.raises(OSError) as exc:
                    os.pwrite(rw, b"x", 0)
                assert exc.value.errno == errno.EPERM
            finally:
                os.close(rw)
            # a copy: not the inode of any memfd the driver lent
            ino = os.fstat(fd).st_ino
            assert all(os.fstat(ds.dataspace.fd).st_ino != ino for ds in d._link.lent if ds.dataspace is not None)
            assert os.pread(fd, 64, 0) == bytes(d.ring_memory[:64])
        finally:
            for f in fds:
                os.close(f)


@pytest.mark.parametrize(
    ("words", "code"),
    [
        ([], -cat.L4_EINVAL),  # no range
        ([0x200000], -cat.L4_EINVAL),  # odd number of words
        ([0x200000, 0], -cat.L4_EINVAL),  # empty range
        ([0x200000, 16] * 65, -cat.L4_EINVAL),  # more than 64 ranges
        ([0x200000, 65 << 20], -cat.L4_EINVAL),  # more than 64 MiB
        ([0x10, 16], -cat.L4_ERANGE),  # below every region
        ([0xFFFFFFFFFFFFFFF0, 0x20], -cat.L4_ERANGE),  # wraps around the address space
    ],
)
def test_bad_reads_are_refused(console, words, code):
    url, _d = console
    with Session(url, role="monitor") as m:
        result, out, _caps, fds = raw(m, cat.MONITOR_OP_READ, words)
        for f in fds:
            os.close(f)
        assert (result, out, fds) == (code, [], [])
        # the device still serves the monitor afterwards
        assert m.regions()


def test_range_across_two_regions_is_out_of_range(console):
    url, _d = console
    with Session(url, role="monitor") as m:
        regions = sorted(m.regions())
        (b0, n0, _), (b1, _n1, _) = regions[0], regions[1]
        assert b0 + n0 == b1  # the driver lends consecutive addresses
        with pytest.raises(FormatError, match="not inside the driver's registered memory"):
            m.read_device_memory([(b0 + n0 - 8, 16)])


def test_client_side_checks(console):
    url, _d = console
    with Session(url, role="monitor") as m:
        with pytest.raises(UsageError):
            m.read_device_memory([])
        with pytest.raises(UsageError):
            m.read_device_memory([(0x200000, 16)] * 65)
        with pytest.raises(UsageError):
            m.read_device_memory([(0x200000, 0)])


def test_no_driver_no_regions(tmp_path):
    with emulator(tmp_path, "rng") as (url, _proc):
        with Session(url, role="monitor") as m:
            assert m.regions() == []
            with pytest.raises(FormatError):
                m.read_device_memory([(0x200000, 16)])
    with Session("emu:blk?size=1M", role="monitor") as m:
        assert m.regions() == []


def test_saved_page_has_no_memory_interface(tmp_path):
    path = tmp_path / "page.bin"
    with Session("emu:rng", role="monitor") as m:
        path.write_bytes(m.page_bytes())
    with Session(f"dump:{path}") as s:
        assert s.regions() is None
        with pytest.raises(UnavailableError):
            s.read_device_memory([(0x200000, 16)])


def test_a_monitor_that_does_not_take_its_replies_gets_no_second_copy(console):
    """Each READ reply holds a fresh copy: a second READ while the first reply is unread is -L4_EBUSY."""
    from l4vctl import wire
    from tests.emu import hello, raw_connect

    url, d = console
    q = d.queues[0]
    read = [q.desc, 4096]
    with raw_connect(url) as sock:
        wire.send(sock, hello(cat.ROLE_MONITOR))
        welcome = wire.recv(sock, 5)
        assert welcome.label == 0
        for seq in (2, 3):  # both sent before either reply is read
            wire.send(sock, wire.encode(cat.KIND_REQUEST, seq, MON, cat.MONITOR_OP_READ, read))
        # read nothing until both replies are here (SIOCINQ counts every packet queued on a
        # SEQPACKET socket): taking the first reply earlier would let the device see it read
        deadline = time.monotonic() + 10
        while _queued(sock) < 2 * wire.HEADER_SIZE:
            assert time.monotonic() < deadline, "the device did not answer both READs"
            time.sleep(0.005)
        first, second = wire.recv(sock, 5), wire.recv(sock, 5)
        try:
            assert (first.seq, first.label, len(first.fds)) == (2, 0, 1)
            assert (second.seq, second.label, second.fds) == (3, -cat.L4_EBUSY, [])
        finally:
            first.close_fds()
        wire.send(sock, wire.encode(cat.KIND_REQUEST, 4, MON, cat.MONITOR_OP_READ, read))  # replies taken: served
        third = wire.recv(sock, 5)
        try:
            assert (third.seq, third.label, len(third.fds)) == (4, 0, 1)
        finally:
            third.close_fds()


def _queued(sock) -> int:
    """Bytes of every packet waiting on a SEQPACKET socket (SIOCINQ)."""
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), 0x541B, buf)
    return int.from_bytes(buf, "little")
