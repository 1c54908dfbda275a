"""The typed split-ring views agree with the Construct ring schemas."""

from __future__ import annotations

import os

import pytest

from l4vctl.formats import fast, records, ring
from l4vctl.formats.introspect import describe

NUMS = [1, 2, 4, 256, 32768]


def schema_offsets(num: int) -> dict[str, int]:
    out = {}
    for part, schema in (("avail", ring.vring_avail(num)), ("used", ring.vring_used(num))):
        out.update({f"{part}.{f.name}": f.offset for f in describe(schema)})
    return out


@pytest.mark.parametrize("num", NUMS)
def test_offsets_equal_the_schemas(num: int) -> None:
    assert fast.ring().offsets(num) == schema_offsets(num)


@pytest.mark.parametrize("num", NUMS)
def test_views_read_what_construct_parses(num: int) -> None:
    r = fast.ring()
    lay = r.simple_layout(num)
    buf = bytearray(os.urandom(lay["total"]))
    v = r.views(memoryview(buf), num, lay["desc"], lay["avail"], lay["used"])
    a = ring.vring_avail(num).parse(bytes(buf[lay["avail"] : lay["avail"] + r.avail_size(num)]))
    u = ring.vring_used(num).parse(bytes(buf[lay["used"] : lay["used"] + r.used_size(num)]))
    assert (v.avail_flags[0], v.avail_idx[0], v.used_event[0]) == (a.flags, a.idx, a.used_event)
    assert v.avail_ring.tolist() == list(a.ring)
    assert (v.used_flags[0], v.used_idx[0], v.avail_event[0]) == (u.flags, u.idx, u.avail_event)
    assert v.used_id.tolist() == [e.id for e in u.ring]
    assert v.used_len.tolist() == [e.len for e in u.ring]
    assert v.used_elem(num - 1) == (u.ring[-1].id, u.ring[-1].len)
    assert list(v.used_hdr) == [u.flags, u.idx]
    if num <= 256:
        d = ring.desc_table(num).parse(bytes(buf[: r.desc_size(num)]))
        assert [v.descriptor(i) for i in range(num)] == [(e.addr, e.len, e.flags, e.next) for e in d]
        assert v.descriptor(0).next == d[0].next
    v.release()


@pytest.mark.parametrize("num", [1, 2, 256])
def test_stores_through_views_land_where_construct_reads(num: int) -> None:
    r = fast.ring()
    lay = r.simple_layout(num)
    buf = bytearray(lay["total"])
    v = r.views(memoryview(buf), num, lay["desc"], lay["avail"], lay["used"])
    v.avail_flags[0], v.avail_idx[0], v.used_event[0] = 0x0101, 0x0202, 0x0303
    for i in range(num):
        v.avail_ring[i] = 0x1000 + i
        v.used_id[i], v.used_len[i] = 0x20000 + i, 0x30000 + i
    v.used_flags[0], v.used_idx[0], v.avail_event[0] = 0x0404, 0x0505, 0x0606
    a = ring.vring_avail(num).parse(bytes(buf[lay["avail"] : lay["avail"] + r.avail_size(num)]))
    u = ring.vring_used(num).parse(bytes(buf[lay["used"] : lay["used"] + r.used_size(num)]))
    assert (a.flags, a.idx, a.used_event, list(a.ring)) == (0x0101, 0x0202, 0x0303, [0x1000 + i for i in range(num)])
    assert (u.flags, u.idx, u.avail_event) == (0x0404, 0x0505, 0x0606)
    assert [(e.id, e.len) for e in u.ring] == [(0x20000 + i, 0x30000 + i) for i in range(num)]
    assert not any(buf[: r.desc_size(num)])  # nothing strayed into the descriptor table
    v.release()


def test_every_ring_field_is_its_own_typed_view() -> None:
    r = fast.ring()
    lay = r.simple_layout(8)
    v = r.views(memoryview(bytearray(lay["total"])), 8, lay["desc"], lay["avail"], lay["used"])
    for name in ("avail_flags", "avail_idx", "used_event", "used_flags", "used_idx", "avail_event"):
        view = getattr(v, name)
        assert (view.format, view.itemsize, len(view)) == ("H", 2, 1), name
    assert (v.avail_ring.format, len(v.avail_ring)) == ("H", 8)
    assert (v.used_id.format, v.used_id.itemsize, len(v.used_id)) == ("I", 4, 8)
    assert (v.used_len.format, v.used_len.itemsize, len(v.used_len)) == ("I", 4, 8)
    v.release()


def test_records_follow_the_schemas() -> None:
    assert records.Descriptor._fields == tuple(sc.name for sc in ring.vring_desc.subcons)
    assert records.UsedElem._fields == tuple(sc.name for sc in ring.vring_used_elem.subcons)
    r = fast.ring()
    assert records.Descriptor._fields == tuple(r.desc.fields)
    assert records.UsedElem._fields == tuple(r.used_elem.fields)


def test_views_refuse_short_memory() -> None:
    r = fast.ring()
    lay = r.simple_layout(16)
    with pytest.raises(ValueError):
        r.views(memoryview(bytearray(lay["total"] - 1)), 16, lay["desc"], lay["avail"], lay["used"])
    with pytest.raises(ValueError):
        short = memoryview(bytearray(r.desc_size(16) - 1))
        r.views_of(16, short, memoryview(bytearray(r.avail_size(16))), memoryview(bytearray(r.used_size(16))))
