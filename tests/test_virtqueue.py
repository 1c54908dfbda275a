"""The driver-side virtqueue: descriptors, publishing order, suppression, completions."""

from __future__ import annotations

import struct

import pytest

from l4vctl import catalog as cat
from l4vctl.caps import Irq
from l4vctl.errors import ProtocolError, TimeoutExpired
from l4vctl.formats.fast import ring
from l4vctl.virtqueue import QueueFull, Virtqueue, need_event

NUM = 8


@pytest.fixture
def vq():
    lay = ring().simple_layout(NUM)
    mem = memoryview(bytearray(lay["total"]))
    kick, irq = Irq.create(), Irq.create()
    q = Virtqueue(mem, NUM, kick_irq=kick, irq=irq, event_idx=False, indirect=True)
    q.lay = lay
    q.mem = mem
    yield q
    q.close()
    kick.close()
    irq.close()


def complete(q, head, length):
    """Play the device: put one used element and bump used.idx."""
    idx = struct.unpack_from("<H", q.mem, q.lay["used"] + 2)[0]
    struct.pack_into("<II", q.mem, q.lay["used"] + 4 + 8 * (idx % NUM), head, length)
    struct.pack_into("<H", q.mem, q.lay["used"] + 2, (idx + 1) & 0xFFFF)


def test_chain_layout_and_publish_order(vq):
    head = vq.add([(0x1000, 16, False), (0x2000, 512, True), (0x3000, 1, True)], "t")
    descs = [struct.unpack_from("<QIHH", vq.mem, 16 * d) for d in vq.chains[head]]
    assert [d[0] for d in descs] == [0x1000, 0x2000, 0x3000]
    assert [d[2] for d in descs] == [cat.VRING_DESC_F_NEXT, cat.VRING_DESC_F_NEXT | 2, 2]
    assert descs[0][3] == vq.chains[head][1] and descs[1][3] == vq.chains[head][2]
    assert vq.avail[1] == 0  # not yet published
    assert vq.kick() is True and vq.avail[1] == 1 and vq.avail[2] == head
    assert vq.kick_irq.drain() == 1


def test_kick_suppressed_by_no_notify(vq):
    vq.used_hdr[0] = cat.VRING_USED_F_NO_NOTIFY
    vq.add([(0x1000, 16, False)], 1)
    assert vq.kick() is False and vq.kick_irq.drain() == 0 and vq.avail[1] == 1


def test_free_list_and_queue_full(vq):
    heads = [vq.add([(0x1000, 16, False), (0x2000, 16, True)], i) for i in range(4)]
    with pytest.raises(QueueFull):
        vq.add([(0x1000, 16, False)], 9)
    vq.kick()
    complete(vq, heads[2], 16)
    assert vq.reap() == [(2, 16)] and len(vq.free) == 2 and vq.in_flight == 3


def test_indirect_takes_one_descriptor(vq):
    table = memoryview(bytearray(64))
    head = vq.add_indirect(table, 0x8000, [(0x1000, 16, False), (0x2000, 8, True)], "x")
    assert struct.unpack_from("<QIHH", vq.mem, 16 * head) == (0x8000, 32, cat.VRING_DESC_F_INDIRECT, 0)
    assert struct.unpack_from("<QIHH", table, 16) == (0x2000, 8, 2, 0)
    assert len(vq.free) == NUM - 1


def test_unknown_head_from_the_device_is_a_protocol_error(vq):
    vq.add([(0x1000, 16, False)], 1)
    vq.kick()
    complete(vq, 5, 0)  # descriptor 5 was never handed out
    with pytest.raises(ProtocolError, match="not in flight"):
        vq.reap()


def test_wait_times_out_with_a_clear_message(vq):
    vq.add([(0x1000, 16, False)], 1)
    vq.kick()
    with pytest.raises(TimeoutExpired, match="1 requests in flight"):
        vq.wait(0.05)


def test_interrupt_suppression(vq):
    vq.interrupts(False)
    assert vq.avail[0] == cat.VRING_AVAIL_F_NO_INTERRUPT
    vq.interrupts(True)
    assert vq.avail[0] == 0


def test_need_event_examples():
    assert need_event(5, 6, 5)  # moving from 5 to 6 passes event 5
    assert not need_event(5, 5, 4)  # 4 -> 5 does not pass 5
    assert need_event(3, 10, 0)  # a batch passes it too
    assert need_event(0xFFFF, 0, 0xFFFE)  # across the 16-bit wrap
    assert not need_event(0x8000, 10, 0)


def test_used_index_jump_past_in_flight_is_a_protocol_error(vq):
    head = vq.add([(0x1000, 16, True)], "t")
    vq.kick()
    complete(vq, head, 16)
    struct.pack_into("<H", vq.mem, vq.lay["used"] + 2, 200)  # a hostile device: 200 completions for 1 request
    with pytest.raises(ProtocolError, match="past the 1 requests in flight"):
        vq.reap()
