"""The device-side ring walker against hostile rings.

In-process property tests drive a real Device (the emulator's device core)
with random descriptor tables and rings; process-level tests send hand-made
hostile chains to an emulator and watch it enter DEVICE_NEEDS_RESET, raise a
config interrupt and keep serving.
"""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4vctl import catalog as cat
from l4vctl.caps import Dataspace
from l4vctl.emulator.device import Device
from l4vctl.emulator.models import model_class, parse_options
from l4vctl.emulator.ring import need_event
from l4vctl.session import Session

BASE = 0x10000
REGION = 0x10000  # 64 KiB
NUM = 8
DESC, AVAIL, USED = 0x0, 0x100, 0x200  # offsets of the rings in the region
DATA = 0x1000


class Rig:
    """A Device in this process with one registered region and queue 0 enabled."""

    def __init__(self, kind="blk", abi="current", features=(), **opts):
        extra = {"features": ",".join(str(b) for b in features)} if features else {}
        options = parse_options(kind, {"abi": abi, "num_max": str(NUM), **extra, **opts})
        self.dev = Device(model_class(kind)(options))
        self.ds = Dataspace.create("rig", REGION)
        self.mem = self.ds.map()
        d = self.dev
        assert d.register_ds(self.ds.fd, 5, BASE, 0, REGION) == 0
        d.set_status(0)
        d.set_status(3)
        bits = {cat.VERSION_1_BIT, cat.INDIRECT_DESC_BIT, *features}
        from l4vctl import page as pg

        d.set_words("driver_features_map", pg.feature_words(abi, bits))
        d.set_status(0x0B)
        assert d.status == 0x0B, "features refused"
        qoff = d.queues_offset
        struct.pack_into("<HHHHQQQ", d.page, qoff, NUM, NUM, 1, 0, BASE + DESC, BASE + AVAIL, BASE + USED)
        assert d.setup_queue(0) == 0
        d.set_status(0x0F)
        assert d.status == 0x0F

    def desc(self, i, addr, length, flags, nxt, table=DESC):
        struct.pack_into("<QIHH", self.mem, table + 16 * i, addr, length, flags, nxt)

    def offer(self, *heads, idx=None):
        ring = self.dev.queues[0].avail
        start = ring[1]
        for k, h in enumerate(heads):
            ring[2 + (start + k) % NUM] = h
        ring[1] = (start + len(heads)) & 0xFFFF if idx is None else idx

    def used_idx(self):
        return struct.unpack_from("<H", self.mem, USED + 2)[0]

    def close(self):
        self.dev.close()
        self.ds.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def blk_request(r, head=0, sector=0, data_len=512, data_flags=2, status_addr=None):
    """A well-formed 3-descriptor IN request at descriptors head..head+2."""
    struct.pack_into("<IIQ", r.mem, DATA, cat.BLK_T_IN, 0, sector)
    r.desc(head, BASE + DATA, 16, 1, head + 1)
    r.desc(head + 1, BASE + DATA + 0x100, data_len, data_flags | 1, head + 2)
    r.desc(head + 2, status_addr or (BASE + DATA + 0x80), 1, 2, 0)


def test_well_formed_request_completes(rig):
    blk_request(rig)
    rig.mem[DATA + 0x80] = 0xFF
    rig.offer(0)
    rig.dev.service()
    assert rig.used_idx() == 1 and rig.mem[DATA + 0x80] == cat.BLK_S_OK
    assert struct.unpack_from("<II", rig.mem, USED + 4) == (0, 513)


@pytest.mark.parametrize(
    "setup,reason",
    [
        (lambda r: r.offer(NUM), "head index 8 is not below the queue size"),
        (lambda r: r.offer(0, idx=NUM + 1), "more than the queue size"),
        (lambda r: (blk_request(r), r.desc(1, BASE + DATA + 0x100, 512, 3, 9), r.offer(0)), "next index 9 is outside"),
        (lambda r: (r.desc(0, BASE + DATA, 16, 1, 1), r.desc(1, BASE + DATA, 16, 1, 0), r.offer(0)), "a loop"),
        (lambda r: (blk_request(r), r.desc(1, BASE + REGION - 8, 512, 3, 2), r.offer(0)),
         "not inside one registered region"),
        (lambda r: (r.desc(0, 0x900000, 48, 4, 0), r.offer(0)), "indirect table"),
        (lambda r: (r.desc(0, BASE + 0x3000, 8, 4, 0), r.offer(0)), "holds no descriptor"),
        (lambda r: (r.desc(0, BASE + 0x3000, 32, 4, 0), r.desc(0, BASE, 16, 4, 0, table=0x3000), r.offer(0)),
         "another indirect descriptor"),
        (lambda r: (r.desc(0, BASE + DATA, 16, 1, 1), r.desc(1, BASE + 0x3000, 16, 4, 0), r.offer(0)),
         "indirect flag inside a chain"),
        (lambda r: (r.desc(0, BASE + DATA, 8, 0, 0), r.offer(0)), "header is 8 bytes"),
    ],
)  # fmt: skip
def test_hostile_chain_means_needs_reset_with_a_reason(rig, setup, reason):
    setup(rig)
    rig.dev.service()
    assert rig.dev.status & cat.STATUS_DEVICE_NEEDS_RESET
    assert reason in rig.dev.last_error
    assert rig.dev.get("irq_status") & cat.IRQ_STATUS_CONFIG  # config interrupt (current era)
    assert rig.used_idx() == 0  # the bad request is not returned


def test_indirect_needs_negotiation():
    r = Rig(features=())
    try:
        d = r.dev
        d.negotiated.discard(cat.INDIRECT_DESC_BIT)
        r.desc(0, BASE + 0x3000, 48, 4, 0)
        r.offer(0)
        d.service()
        assert "INDIRECT_DESC was not negotiated" in d.last_error
    finally:
        r.close()


def test_status_in_read_only_memory(rig):
    ro = Dataspace.create("ro", 4096)
    try:
        assert rig.dev.register_ds(ro.fd, cat.CAP_RIGHT_R, 0x400000, 0, 4096) == 0
        blk_request(rig, status_addr=0x400000)
        rig.offer(0)
        rig.dev.service()
        assert "not writable device memory" in rig.dev.last_error
    finally:
        ro.close()


def test_classic_era_has_no_irq_status():
    r = Rig(abi="classic")
    try:
        r.offer(NUM)
        r.dev.service()
        assert r.dev.status & cat.STATUS_DEVICE_NEEDS_RESET and r.dev.get("irq_status") == 0
    finally:
        r.close()


def test_no_interrupt_and_event_idx_suppression(rig):
    irq_before = rig.dev.irqs_sent
    from l4vctl.caps import Irq

    rig.dev.bind(Irq.create())
    struct.pack_into("<H", rig.mem, AVAIL, cat.VRING_AVAIL_F_NO_INTERRUPT)
    blk_request(rig)
    rig.offer(0)
    rig.dev.service()
    assert rig.used_idx() == 1 and rig.dev.irqs_sent == irq_before
    struct.pack_into("<H", rig.mem, AVAIL, 0)
    rig.offer(0)
    rig.dev.service()
    assert rig.dev.irqs_sent == irq_before + 1


def test_event_idx_decides_interrupts():
    from l4vctl.caps import Irq

    r = Rig(features=(cat.EVENT_IDX_BIT,))
    try:
        r.dev.bind(Irq.create())
        blk_request(r)
        q = r.dev.queues[0]
        q.used_event_view[0] = 5  # interrupt only when used.idx passes 5
        for _ in range(5):
            r.offer(0)
            r.dev.service()
        assert r.used_idx() == 5 and r.dev.irqs_sent == 0
        r.offer(0)
        r.dev.service()
        assert r.dev.irqs_sent == 1
    finally:
        r.close()


def test_need_event():
    assert need_event(0, 1, 0) and not need_event(1, 1, 0)
    assert need_event(0xFFFF, 0, 0xFFFF)  # wrap-around
    assert not need_event(10, 5, 0)


descs = st.tuples(
    st.one_of(st.integers(BASE, BASE + REGION), st.integers(0, 1 << 64 - 1)),
    st.integers(0, 0x2000),
    st.integers(0, 7),
    st.integers(0, 12),
)


@settings(max_examples=300, deadline=None)
@given(table=st.lists(descs, min_size=NUM, max_size=NUM), heads=st.lists(st.integers(0, 12), max_size=12),
       jump=st.integers(0, 20))  # fmt: skip
def test_random_rings_never_crash_or_hang(table, heads, jump):
    r = Rig()
    try:
        for i, (addr, length, flags, nxt) in enumerate(table):
            r.desc(i, min(addr, (1 << 64) - 1), length, flags, nxt)
        struct.pack_into("<IIQ", r.mem, DATA, cat.BLK_T_IN, 0, 0)
        r.offer(*heads[:NUM], idx=(len(heads[:NUM]) + (jump if jump > 16 else 0)) & 0xFFFF)
        t = time.monotonic()
        r.dev.service()
        assert time.monotonic() - t < 2
        st_ = r.dev.status
        if st_ & cat.STATUS_DEVICE_NEEDS_RESET:
            assert r.dev.last_error
        else:
            assert st_ == 0x0F
            assert r.used_idx() == r.dev.queues[0].next_avail  # everything taken was returned
    finally:
        r.close()


def test_emulator_process_survives_a_hostile_driver_and_serves_the_next():
    with Session("emu:blk") as s:
        s.handshake()
        vq = s.virtqueue(0)
        vq.desc[0:16] = struct.pack("<QIHH", 0xDEAD0000, 16, 0, 0)  # outside every region
        vq.avail[2] = 0
        vq.avail_idx = 1
        vq.kick()
        deadline = time.monotonic() + 5
        while not s.status & cat.STATUS_DEVICE_NEEDS_RESET and time.monotonic() < deadline:
            time.sleep(0.005)
        assert s.status & cat.STATUS_DEVICE_NEEDS_RESET
        assert s.get("irq_status") & cat.IRQ_STATUS_CONFIG
        assert s.driver_irq.wait(1)  # the config interrupt arrived
        assert s.stats()["device_errors"] == 1
        # reset and start over on the same connection
        s.handshake()
        from l4vctl.drivers.blk import BlkDriver

        assert BlkDriver(s).read(0, 512) == bytes(512)
