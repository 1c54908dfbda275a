"""The block device's data path, in this process: batches of requests served by one service call.

A real Device (the emulator's device core) serves a real driver-side
Virtqueue over one shared region; requests are offered many at a time, so
the device sees them as one batch: adjacent requests are coalesced into one
transfer, a batch costs one interrupt where the driver allows interrupts,
and a failing transfer fails only the requests whose data it could not move.
"""

from __future__ import annotations

import errno
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl.caps import Dataspace, Irq
from l4vctl.emulator.device import Device
from l4vctl.emulator.models import blk as blk_model
from l4vctl.emulator.models import model_class, parse_options
from l4vctl.formats.fast import ring as ring_geometry
from l4vctl.virtqueue import Virtqueue

SECTOR = 512
BASE = 0x100000
REGION = 8 << 20
IMAGE = 1 << 20
IN, OUT, FLUSH = cat.BLK_T_IN, cat.BLK_T_OUT, cat.BLK_T_FLUSH


class Request:
    """One request's memory: header, data pieces, status byte."""

    def __init__(self, rtype: int, sector: int, pieces: list[tuple[memoryview, int]], hdr, status):
        self.type = rtype
        self.sector = sector
        self.pieces = pieces  # (view, device address)
        self.hdr = hdr
        self.status = status

    @property
    def data(self) -> bytes:
        return b"".join(bytes(v) for v, _a in self.pieces)

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v, _a in self.pieces)


class Rig:
    """A blk Device on an image file and a driver-side Virtqueue over one registered region."""

    def __init__(self, path, *, num: int = 256, event_idx: bool = False, indirect: bool = True, **opts: str):
        self.path = path
        self.rnd = random.Random(str(path))
        path.write_bytes(self.rnd.randbytes(IMAGE))
        raw = {"image": str(path), "num_max": str(num), **opts}
        if event_idx:
            raw["features"] = str(cat.EVENT_IDX_BIT)
        self.dev = dev = Device(model_class("blk")(parse_options("blk", raw)))
        self.ds = Dataspace.create("rig", REGION)
        self.mem = memoryview(self.ds.map())
        assert dev.register_ds(self.ds.fd, 5, BASE, 0, REGION) == 0
        dev.set_status(0)
        dev.set_status(3)
        bits = {cat.VERSION_1_BIT, cat.INDIRECT_DESC_BIT} | ({cat.EVENT_IDX_BIT} if event_idx else set())
        dev.set_words("driver_features_map", pg.feature_words(dev.abi, bits))
        dev.set_status(0x0B)
        assert dev.status == 0x0B
        lay = ring_geometry().simple_layout(num)
        struct.pack_into("<HHHHQQQ", dev.page, dev.queues_offset, num, num, 1, 0,
                         BASE + lay["desc"], BASE + lay["avail"], BASE + lay["used"])  # fmt: skip
        assert dev.setup_queue(0) == 0
        dev.set_status(0x0F)
        assert dev.status == 0x0F
        self.irq = Irq.create()
        dev.bind(Irq(os.dup(self.irq.fd)))
        self.vq: Virtqueue = Virtqueue(self.mem[: lay["total"]], num, kick_irq=dev.kick_irq, irq=self.irq,
                                       event_idx=event_idx, indirect=indirect)  # fmt: skip
        self.indirect = indirect
        self.next = -(-lay["total"] // 4096) * 4096

    def alloc(self, n: int) -> tuple[memoryview, int]:
        at = self.next
        self.next += -(-max(n, 1) // 64) * 64
        assert self.next <= REGION
        return self.mem[at : at + n], BASE + at

    def request(self, rtype: int, sector: int, pieces: list[int], data: bytes | None = None) -> Request:
        """Offer a request whose data lies in buffers of the lengths ``pieces`` (OUT data: ``data``)."""
        hdr, hdr_addr = self.alloc(16)
        struct.pack_into("<IIQ", hdr, 0, rtype, 0, sector)
        status, status_addr = self.alloc(1)
        status[0] = 0xFF
        views = [self.alloc(n) for n in pieces]
        device_writes = rtype == IN
        if data is not None:
            pos = 0
            for v, _a in views:
                v[:] = data[pos : pos + len(v)]
                pos += len(v)
        else:
            for v, _a in views:
                v[:] = b"\xee" * len(v)
        bufs = [(hdr_addr, 16, False), *((a, len(v), device_writes) for v, a in views), (status_addr, 1, True)]
        req = Request(rtype, sector, views, hdr, status)
        if self.indirect:
            table, table_addr = self.alloc(16 * len(bufs))
            self.vq.add_indirect(table, table_addr, bufs, req)
        else:
            self.vq.add(bufs, req)
        return req

    def raw(self, rtype: int, sector: int, data: list[tuple[int, int, bool]]) -> Request:
        """Offer a request whose data buffers are given as (device address, length, WRITE flag)."""
        hdr, hdr_addr = self.alloc(16)
        struct.pack_into("<IIQ", hdr, 0, rtype, 0, sector)
        status, status_addr = self.alloc(1)
        status[0] = 0xFF
        req = Request(rtype, sector, [], hdr, status)
        self.vq.add([(hdr_addr, 16, False), *data, (status_addr, 1, True)], req)
        return req

    def serve(self) -> list[Request]:
        """Publish what was offered, let the device serve it in one call, reap the completions."""
        self.vq.kick()
        self.dev.service()
        return [req for req, _used in self.vq.reap()]

    def image(self, offset: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(n)

    def close(self) -> None:
        self.vq.close()
        self.dev.close()
        self.irq.close()
        self.mem.release()
        self.ds.close()
        self.__dict__.clear()  # requests still in flight hold views of the memory: let them go with it


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "disk.img")
    yield r
    r.close()


@pytest.fixture
def calls(monkeypatch):
    """Count the preadv / pwritev calls (and their offsets and lengths) the device makes."""
    seen: list[tuple[str, int, int]] = []
    preadv, pwritev = os.preadv, os.pwritev

    def counting_preadv(fd, bufs, offset, *rest):
        seen.append(("read", offset, sum(len(b) for b in bufs)))
        return preadv(fd, bufs, offset, *rest)

    def counting_pwritev(fd, bufs, offset, *rest):
        seen.append(("write", offset, sum(len(b) for b in bufs)))
        return pwritev(fd, bufs, offset, *rest)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    monkeypatch.setattr(os, "pwritev", counting_pwritev)
    return seen


# -- coalescing ------------------------------------------------------------------------------------


def test_adjacent_reads_are_one_transfer_with_the_right_data(rig, calls):
    expect = rig.image(0, IMAGE)
    # 12 requests, each continuing the one before, data split over buffers of odd sizes
    shapes = [[512], [1024, 512], [4096], [512, 512, 512], [2048], [512], [8192, 512], [512], [1536], [4096], [512],
              [1024]]  # fmt: skip
    reqs = []
    sector = 10
    for pieces in shapes:
        reqs.append(rig.request(IN, sector, pieces))
        sector += sum(pieces) // SECTOR
    done = rig.serve()
    assert done == reqs  # completed in the order offered
    assert calls == [("read", 10 * SECTOR, (sector - 10) * SECTOR)]
    for r in reqs:
        assert r.status[0] == cat.BLK_S_OK
        assert r.data == expect[r.sector * SECTOR : r.sector * SECTOR + r.nbytes]


def test_adjacent_writes_are_one_transfer_and_in_the_image_when_completed(rig, calls):
    reqs = []
    sector = 100
    for n in (4096, 512, 1536, 65536, 512):
        data = rig.rnd.randbytes(n)
        reqs.append(rig.request(OUT, sector, [n // 2 if n > 512 else n, n - n // 2] if n > 512 else [n], data))
        sector += n // SECTOR
    assert rig.serve() == reqs
    assert calls == [("write", 100 * SECTOR, (sector - 100) * SECTOR)]
    for r in reqs:
        assert r.status[0] == cat.BLK_S_OK
        assert rig.image(r.sector * SECTOR, r.nbytes) == r.data


def test_only_continuing_requests_of_one_direction_are_coalesced(rig, calls):
    a = rig.request(IN, 0, [4096])
    b = rig.request(IN, 8, [4096])  # continues a
    c = rig.request(IN, 8, [4096])  # the same range again: not a continuation
    d = rig.request(OUT, 16, [4096], b"\x11" * 4096)  # continues c, but writes
    e = rig.request(OUT, 24, [512], b"\x22" * 512)  # continues d
    f = rig.request(IN, 16, [4608])  # reads what d and e wrote, after them
    assert rig.serve() == [a, b, c, d, e, f]
    assert calls == [("read", 0, 8192), ("read", 4096, 4096), ("write", 8192, 4608), ("read", 8192, 4608)]
    assert f.data == b"\x11" * 4096 + b"\x22" * 512


def test_groups_are_split_at_the_iovec_and_byte_limits(rig, calls, monkeypatch):
    monkeypatch.setattr(blk_model, "IOV_MAX", 5)
    monkeypatch.setattr(blk_model, "GROUP_BYTES", 8192)
    expect = rig.image(0, IMAGE)
    reqs = [rig.request(IN, i, [512]) for i in range(12)]  # 12 one-buffer requests: 5 + 5 + 2
    reqs += [rig.request(IN, 12 + 8 * i, [4096]) for i in range(3)]  # 8 KiB at most: 2 + 1
    assert rig.serve() == reqs
    assert [n for _k, _o, n in calls] == [2560, 2560, 1024 + 4096, 4096 + 4096]
    for r in reqs:
        assert r.data == expect[r.sector * SECTOR : r.sector * SECTOR + r.nbytes]


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.lists(st.integers(1, 6), min_size=1, max_size=3)),
                    min_size=1, max_size=40),
       indirect=st.booleans())  # fmt: skip
def test_property_a_batch_gives_what_serving_one_request_at_a_time_gives(tmp_path_factory, ops, indirect):
    rig = Rig(tmp_path_factory.mktemp("b") / "disk.img", indirect=indirect)
    try:
        model = bytearray(rig.image(0, IMAGE))
        reqs = []
        expect = []
        for is_write, sector, pieces in ops:
            sizes = [p * SECTOR for p in pieces]
            n = sum(sizes)
            if is_write:
                data = rig.rnd.randbytes(n)
                reqs.append(rig.request(OUT, sector, sizes, data))
                model[sector * SECTOR : sector * SECTOR + n] = data
                expect.append(None)
            else:
                reqs.append(rig.request(IN, sector, sizes))
                expect.append(bytes(model[sector * SECTOR : sector * SECTOR + n]))
        assert rig.serve() == reqs
        for r, want in zip(reqs, expect):
            assert r.status[0] == cat.BLK_S_OK
            if want is not None:
                assert r.data == want
        assert rig.image(0, IMAGE) == bytes(model)
    finally:
        rig.close()


def test_a_flush_runs_after_the_writes_before_it(rig, monkeypatch):
    events = []
    fdatasync, pwritev = os.fdatasync, os.pwritev

    def logging_fdatasync(fd):
        events.append("flush")
        return fdatasync(fd)

    def logging_pwritev(fd, bufs, offset, *rest):
        events.append(("write", offset))
        return pwritev(fd, bufs, offset, *rest)

    monkeypatch.setattr(os, "fdatasync", logging_fdatasync)
    monkeypatch.setattr(os, "pwritev", logging_pwritev)
    w1 = rig.request(OUT, 0, [512], b"a" * 512)
    w2 = rig.request(OUT, 1, [512], b"b" * 512)
    fl = rig.request(FLUSH, 0, [])
    w3 = rig.request(OUT, 2, [512], b"c" * 512)
    assert rig.serve() == [w1, w2, fl, w3]
    assert events == [("write", 0), "flush", ("write", 1024)]
    assert all(r.status[0] == cat.BLK_S_OK for r in (w1, w2, fl, w3))


# -- failures inside a group -----------------------------------------------------------------------


def failing_at(monkeypatch, bad: int) -> None:
    """Make preadv / pwritev fail with EIO whenever their range covers byte ``bad`` of the image."""
    preadv, pwritev = os.preadv, os.pwritev

    def check(bufs, offset):
        if offset <= bad < offset + sum(len(b) for b in bufs):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def bad_preadv(fd, bufs, offset, *rest):
        check(bufs, offset)
        return preadv(fd, bufs, offset, *rest)

    def bad_pwritev(fd, bufs, offset, *rest):
        check(bufs, offset)
        return pwritev(fd, bufs, offset, *rest)

    monkeypatch.setattr(os, "preadv", bad_preadv)
    monkeypatch.setattr(os, "pwritev", bad_pwritev)


def test_a_failing_read_in_a_group_fails_only_its_own_request(rig, monkeypatch):
    expect = rig.image(0, IMAGE)
    failing_at(monkeypatch, 5 * 4096 + 100)  # inside the sixth request
    reqs = [rig.request(IN, 8 * i, [4096]) for i in range(8)]
    assert rig.serve() == reqs
    assert [r.status[0] for r in reqs] == [cat.BLK_S_OK] * 5 + [cat.BLK_S_IOERR] + [cat.BLK_S_OK] * 2
    for r in reqs:
        if r.status[0] == cat.BLK_S_OK:
            assert r.data == expect[r.sector * SECTOR : r.sector * SECTOR + 4096]
    assert rig.dev.status == 0x0F  # a request's failure, not the device's


def test_a_failing_write_in_a_group_fails_only_its_own_request(rig, monkeypatch):
    before = rig.image(0, IMAGE)
    failing_at(monkeypatch, 2 * 4096)  # the first byte of the third request
    datas = [bytes([i + 1]) * 4096 for i in range(4)]
    reqs = [rig.request(OUT, 8 * i, [4096], d) for i, d in enumerate(datas)]
    assert rig.serve() == reqs
    assert [r.status[0] for r in reqs] == [cat.BLK_S_OK, cat.BLK_S_OK, cat.BLK_S_IOERR, cat.BLK_S_OK]
    for i, d in enumerate(datas):
        assert rig.image(i * 4096, 4096) == (before[i * 4096 : (i + 1) * 4096] if i == 2 else d)


def test_used_lengths_count_the_data_and_the_status_byte(rig, monkeypatch):
    failing_at(monkeypatch, 4096)
    reqs = [rig.request(IN, 8 * i, [4096]) for i in range(3)]
    rig.vq.kick()
    rig.dev.service()
    assert [used for _r, used in rig.vq.reap()] == [4097, 1, 4097]
    assert [r.status[0] for r in reqs] == [cat.BLK_S_OK, cat.BLK_S_IOERR, cat.BLK_S_OK]


def test_a_bad_chain_ends_the_batch_after_serving_the_requests_before_it(rig):
    good = [rig.request(OUT, i, [512], bytes([i + 1]) * 512) for i in range(3)]
    # a chain whose data buffer lies outside every region
    hdr, hdr_addr = rig.alloc(16)
    struct.pack_into("<IIQ", hdr, 0, OUT, 0, 3)
    _s, status_addr = rig.alloc(1)
    rig.vq.add([(hdr_addr, 16, False), (0xDEAD0000, 512, False), (status_addr, 1, True)], None)
    rig.vq.kick()
    rig.dev.service()
    assert rig.dev.status & cat.STATUS_DEVICE_NEEDS_RESET
    assert "not inside one registered region" in rig.dev.last_error
    for r in good:
        assert rig.image(r.sector * SECTOR, 512) == r.data  # served before the device stopped


def test_a_bad_head_index_ends_the_batch_after_serving_the_heads_before_it(rig):
    good = [rig.request(OUT, i, [512], bytes([i + 1]) * 512) for i in range(3)]
    vq = rig.vq
    vq.views.avail_ring[vq.avail_idx % vq.num] = vq.num + 5  # not a head of this queue
    vq.avail_idx += 1
    vq.kick()
    rig.dev.service()
    assert rig.dev.status & cat.STATUS_DEVICE_NEEDS_RESET
    assert f"head index {vq.num + 5} is not below the queue size" in rig.dev.last_error
    for r in good:
        assert rig.image(r.sector * SECTOR, 512) == r.data


def test_a_short_image_reads_zeros_past_its_end(rig, calls):
    reqs = [rig.request(IN, 2040 + i, [512]) for i in range(8)]  # the last 8 sectors
    expect = rig.image(0, IMAGE)
    os.truncate(rig.path, IMAGE - 2048)  # the file shrinks under the device: 4 sectors are gone
    assert rig.serve() == reqs
    assert all(r.status[0] == cat.BLK_S_OK for r in reqs)
    for r in reqs[:4]:
        assert r.data == expect[r.sector * SECTOR : r.sector * SECTOR + 512]
    for r in reqs[4:]:
        assert r.data == bytes(512)


# -- the rules every request is checked against ---------------------------------------------------


def test_reading_into_read_only_memory_needs_a_reset(rig):
    ro = Dataspace.create("ro", 4096)
    try:
        assert rig.dev.register_ds(ro.fd, cat.CAP_RIGHT_R, 0x4000000, 0, 4096) == 0
        rig.raw(IN, 0, [(0x4000000, 512, True)])
        rig.serve()
        assert rig.dev.status & cat.STATUS_DEVICE_NEEDS_RESET
        assert "read-only memory" in rig.dev.last_error
    finally:
        ro.close()


def test_reading_into_a_buffer_without_the_write_flag_is_tolerated(rig):
    view, addr = rig.alloc(512)
    r = rig.raw(IN, 3, [(addr, 512, False)])
    assert rig.serve() == [r]
    assert r.status[0] == cat.BLK_S_OK and bytes(view) == rig.image(3 * SECTOR, 512)
    assert rig.dev.status == 0x0F


@pytest.mark.parametrize(
    "opts,pieces,why",
    [
        ({"size_max": "4096"}, [8192], "exceeds size_max"),
        ({"seg_max": "2"}, [512, 512, 512], "exceed seg_max"),
        ({}, [700], "not a multiple of 512"),
        ({}, [1024, 100], "not a multiple of 512"),
    ],
)
def test_requests_outside_the_limits_get_ioerr(tmp_path, opts, pieces, why, capfd):
    rig = Rig(tmp_path / "disk.img", **opts)
    try:
        bad = rig.request(IN, 0, pieces)
        good = rig.request(IN, 16, [512])
        assert rig.serve() == [bad, good]
        assert (bad.status[0], good.status[0]) == (cat.BLK_S_IOERR, cat.BLK_S_OK)
        assert why in capfd.readouterr().err
        assert rig.dev.status == 0x0F
    finally:
        rig.close()


# -- interrupts --------------------------------------------------------------------------------------


def test_a_batch_gets_one_interrupt(rig):
    before = rig.dev.irqs_sent
    reqs = [rig.request(IN, rig.rnd.randrange(2000), [512]) for _ in range(40)]  # scattered: 40 transfers
    assert rig.serve() == reqs
    assert rig.dev.irqs_sent == before + 1
    assert rig.dev.queues[0].notified == 1


def test_no_interrupt_suppresses_the_batch_interrupt(rig):
    rig.vq.interrupts(False)  # NO_INTERRUPT
    reqs = [rig.request(IN, 8 * i, [4096]) for i in range(20)]
    assert rig.serve() == reqs
    assert rig.dev.irqs_sent == 0


@pytest.mark.parametrize("event,interrupts", [(0, 1), (15, 1), (39, 1), (40, 0), (100, 0)])
def test_event_idx_interrupts_once_if_the_batch_passes_used_event(tmp_path, event, interrupts):
    rig = Rig(tmp_path / "disk.img", event_idx=True)
    try:
        reqs = [rig.request(IN, rig.rnd.randrange(2000), [512]) for _ in range(40)]
        rig.vq.kick()
        rig.dev.queues[0].used_event_view[0] = event  # interrupt when used.idx passes ``event``
        rig.dev.service()
        assert [r for r, _u in rig.vq.reap()] == reqs
        assert rig.dev.irqs_sent == interrupts
    finally:
        rig.close()


def test_completions_are_visible_before_the_batch_ends(rig, monkeypatch):
    """A driver that polls sees the first completions while the device still serves the batch."""
    seen = []
    used_idx = rig.vq.views.used_idx
    preadv = os.preadv

    def watching_preadv(fd, bufs, offset, *rest):
        seen.append(used_idx[0])
        return preadv(fd, bufs, offset, *rest)

    monkeypatch.setattr(os, "preadv", watching_preadv)
    reqs = [rig.request(IN, 8 * (3 * i % 64), [4096]) for i in range(24)]  # not adjacent: 24 transfers
    assert rig.serve() == reqs
    assert seen[0] == 0 and seen[-1] >= blk_model.PUBLISH_EVERY
    assert rig.dev.irqs_sent == 1


# -- threads -------------------------------------------------------------------------------------------


def test_io_threads_serve_a_batch_as_if_in_order(tmp_path):
    rig = Rig(tmp_path / "disk.img", io_threads="3")
    try:
        model = bytearray(rig.image(0, IMAGE))
        reqs, expect = [], []
        rnd = random.Random(7)
        for _ in range(120):
            sector = rnd.randrange(64)
            n = rnd.randrange(1, 5) * SECTOR
            if rnd.random() < 0.5:
                data = rnd.randbytes(n)
                reqs.append(rig.request(OUT, sector, [n], data))
                model[sector * SECTOR : sector * SECTOR + n] = data
                expect.append(None)
            else:
                reqs.append(rig.request(IN, sector, [n]))
                expect.append(bytes(model[sector * SECTOR : sector * SECTOR + n]))
            if rnd.random() < 0.05:
                reqs.append(rig.request(FLUSH, 0, []))
                expect.append(None)
        assert rig.serve() == reqs
        for r, want in zip(reqs, expect):
            assert r.status[0] == cat.BLK_S_OK
            if want is not None:
                assert r.data == want
        assert rig.image(0, IMAGE) == bytes(model)
    finally:
        rig.close()


# -- the driver's early kicks ---------------------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
def test_early_kicks_publish_only_while_the_device_polls(tmp_path, event_idx):
    from l4vctl.drivers.blk import BlkDriver

    rig = Rig(tmp_path / "disk.img", event_idx=event_idx)
    try:
        driver = type("D", (), {"vq": rig.vq})()  # kick_if_polled needs nothing but the queue
        rig.dev.poll_mode(True)  # the device polls: it asks for no kicks
        rig.request(IN, 0, [512])
        BlkDriver.kick_if_polled(driver)
        assert rig.vq.views.avail_idx[0] == 1 and rig.dev.kick_irq.drain() == 0  # published, not kicked
        rig.dev.service()
        rig.dev.poll_mode(False)  # the device sleeps: it wants a kick
        rig.request(IN, 1, [512])
        BlkDriver.kick_if_polled(driver)
        assert rig.vq.views.avail_idx[0] == 1  # left for the kick that comes with the whole batch
        rig.vq.kick()
        assert rig.vq.views.avail_idx[0] == 2 and rig.dev.kick_irq.drain() == 1
    finally:
        rig.close()
