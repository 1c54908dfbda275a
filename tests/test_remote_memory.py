"""Sessions whose device memory is not mapped here, as a remote backend's is.

The memory contract of the backends (``Memory.read``/``write`` of ranges,
``view()`` None when not mapped locally) is what a bridge to a real L4Re
system implements.  Here a real emulator is driven through memories that
refuse local views: the page is read and written in ranges, queue set-up
writes its entries in ranges, and the virtqueues work in local shadows that
are pushed before each kick and pulled on each completion.  Data must arrive
intact, in both directions, with every ring feature.
"""

from __future__ import annotations

import os

import pytest

from l4vctl.backends.base import Memory
from l4vctl.drivers.blk import BlkDriver
from l4vctl.drivers.console import ConsoleDriver
from l4vctl.drivers.net import NetDriver, frame
from l4vctl.drivers.rng import RngDriver
from l4vctl.session import Session


class FarMemory(Memory):
    """A memory reached only through ranges (its bytes are in a local mapping it keeps to itself)."""

    def __init__(self, inner: Memory):
        self.inner = inner
        self.size = inner.size
        self.reads = 0
        self.writes = 0

    def read(self, ranges):
        self.reads += 1
        return self.inner.read(ranges)

    def write(self, items):
        self.writes += 1
        self.inner.write(items)

    def close(self):
        self.inner.close()


def far_session(url: str, **kw) -> tuple[Session, list[FarMemory]]:
    """A session whose config page and lent memory are all FarMemory."""
    s = Session(url, **kw)
    memories: list[FarMemory] = []
    real_connect = s.backend.connect

    def connect(role="driver", timeout=5.0):
        ch = real_connect(role, timeout)
        real_map, real_lend = ch.map_config, ch.lend

        def map_config(fd, size, offset, writable):
            m = FarMemory(real_map(fd, size, offset, writable))
            memories.append(m)
            return m

        def lend(size, name):
            lent = real_lend(size, name)
            lent.memory = FarMemory(lent.memory)
            memories.append(lent.memory)
            return lent

        ch.map_config = map_config
        ch.lend = lend
        return ch

    s.backend.connect = connect
    return s, memories


FEATURES = {
    "plain": ["flush"],
    "indirect": ["flush", "indirect_desc"],
    "event_idx": ["flush", "event_idx"],
    "both": ["flush", "indirect_desc", "event_idx"],
}


@pytest.mark.parametrize("mode", ["ipc", "cmd"])
@pytest.mark.parametrize("features", list(FEATURES))
def test_blk_data_round_trips_through_far_memory(mode, features):
    url = "emu:blk?size=4M" + ("&cmd_mode=1" if mode == "cmd" else "")
    s, memories = far_session(url, mode=mode)
    with s:
        assert s.page is None  # nothing is mapped here
        s.handshake(want=FEATURES[features])
        assert s.status & 0x04  # DRIVER_OK
        drv = BlkDriver(s, depth=8, segments=3, max_io=16 * 1024)
        data = os.urandom(200 * 1024)  # many requests, several in flight, chains of 5 buffers
        drv.write(64, data)
        drv.flush()
        assert drv.read(64, len(data)) == bytes(data)
        assert drv.read(0, 4096) == bytes(4096)  # never written
        assert drv.get_id()  # a device-written string
    ring_and_buffers = memories[1:]
    assert ring_and_buffers and all(m.reads and m.writes for m in ring_and_buffers)


def test_far_and_local_sessions_see_the_same_disk(tmp_path):
    img = tmp_path / "d.img"
    url = f"emu:blk?size=1M&image={img}"
    s, _ = far_session(url)
    with s:
        s.handshake(want=["flush", "indirect_desc", "event_idx"])
        BlkDriver(s).write(8, b"\x5a" * 8192)
    with open(img, "rb") as f:
        f.seek(8 * 512)
        assert f.read(8192) == b"\x5a" * 8192


def test_rng_through_far_memory():
    s, _ = far_session("emu:rng")
    with s:
        s.handshake()
        got = RngDriver(s).read(3000)
        assert len(got) == 3000 and len(set(got)) > 200


def test_console_echo_through_far_memory():
    s, _ = far_session("emu:console")
    with s:
        s.handshake()
        con = ConsoleDriver(s)
        con.send(b"far away")
        got = b""
        for _ in range(50):
            got += con.receive(0.1)
            if len(got) >= 8:
                break
        assert got == b"far away"


def test_net_loopback_through_far_memory():
    s, _ = far_session("emu:net?loop=1")
    with s:
        s.handshake()
        net = NetDriver(s)
        sent = frame(b"\x52\x54\x00\x12\x34\x56", net.mac, 0x88B5, b"hello far memory")
        net.send(sent)
        got: list[bytes] = []
        for _ in range(40):
            got += net.receive(0.05)
            if got:
                break
        assert sent in got


def test_a_second_handshake_on_far_memory_still_completes_requests():
    # the ring memory is reused and zeroed: what the far side holds must be known again,
    # or a descriptor equal to the old one would not be sent
    s, _ = far_session("emu:blk?size=1M")
    with s:
        for round_ in range(3):
            s.handshake()
            drv = BlkDriver(s)
            drv.write(round_, bytes([0x41 + round_]) * 512)
            assert drv.read(0, 1536)[512 * round_ : 512 * round_ + 4] == bytes([0x41 + round_]) * 4
