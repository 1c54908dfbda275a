"""Snapshot capture, archives and the read-only queue views, against real emulator processes."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4vctl import catalog as cat
from l4vctl.errors import FormatError, UsageError
from l4vctl.formats.fast import ring as geometry
from l4vctl.ringread import FINDING_KINDS, QueueState, queue_state, queue_states
from l4vctl.session import Session
from l4vctl.snapshot import Region, Snapshot
from tests.test_queue_show import publish, stalled, write_desc

ABIS = pytest.mark.parametrize("abi", ["classic", "current"])


@ABIS
def test_capture_modes(tmp_path, abi):
    with stalled(tmp_path, "rng", abi) as (url, s):
        mem, addr = s.alloc(8192)
        mem[:5] = b"bytes"
        vq = s.virtqueue(0)
        vq.add([(addr, 64, True)], 0)
        publish(vq)
        with Session(url, role="monitor") as m:
            none = Snapshot.capture(m, memory="none")
            rings = Snapshot.capture(m)
            every = Snapshot.capture(m, memory="all")
            with pytest.raises(UsageError):
                Snapshot.capture(m, memory="some")
        assert none.live and none.regions == [] and none.registered and none.memory_note is None
        assert none.device_side["queues"][0]["avail_idx"] == 1
        assert none.abi == abi and none.page == s.page_bytes()[: len(none.page)]
        q = s.queues[0]
        g = geometry()
        for snap in (rings, every):
            assert snap.contains(q.desc, g.desc_size(q.num))
            assert bytes(snap.read(q.desc, 16)) == bytes(vq.desc[:16])
        assert not rings.contains(addr, 5)  # buffers are not ring memory
        assert bytes(every.read(addr, 5)) == b"bytes"
        assert sum(r.size for r in every.regions) == sum(n for _b, n, _w in every.registered)
        with pytest.raises(FormatError):
            rings.read(addr, 5)
        with pytest.raises(FormatError):
            every.read(0x10, 1)
        (state,) = queue_states(rings)
        assert (state.avail_idx, state.used_idx, state.next_avail, state.pending()) == (1, 0, 0, 1)
        chain = state.walk(state.head_at(0), 0)
        assert chain.ok and [(b.addr, b.len, b.write) for b in chain.buffers] == [(addr, 64, True)]


@ABIS
def test_event_idx_words(tmp_path, abi):
    with stalled(tmp_path, "rng", abi, "--feature", "event_idx") as (url, s):
        vq = s.virtqueue(0)
        assert vq.event_idx
        vq._used_event[0] = 77
        vq.avail_event[0] = 55  # the device's word; no device runs before DRIVER_OK
        with Session(url, role="monitor") as m:
            q = queue_state(Snapshot.capture(m), 0)
        assert q is not None and q.event_idx
        assert (q.used_event, q.avail_event) == (77, 55)
        assert q.to_json()["avail"]["used_event"] == 77


@ABIS
def test_archive_round_trip_in_python(tmp_path, abi):
    with stalled(tmp_path, "console", abi) as (url, s):
        _mem, addr = s.alloc(4096)
        vq = s.virtqueue(cat.CONSOLE_RX_QUEUE)
        vq.add([(addr, 100, True)], 0)
        publish(vq)
        with Session(url, role="monitor") as m:
            snap = Snapshot.capture(m, memory="all")
    buf = io.BytesIO()
    snap.save(buf)
    path = tmp_path / "c.l4vm"
    snap.save(path)
    assert path.read_bytes() == buf.getvalue()
    back = Snapshot.load(str(path))
    assert back.page == snap.page and back.abi == snap.abi and not back.live
    assert [(r.base, r.size, r.writable, bytes(r.data)) for r in back.regions] == [
        (r.base, r.size, r.writable, bytes(r.data)) for r in snap.regions
    ]
    assert back.registered == snap.registered
    assert back.device_side == snap.device_side
    assert back.taken == snap.taken
    assert [q.to_json() for q in queue_states(back)] == [q.to_json() for q in queue_states(snap)]
    (q,) = [q for q in queue_states(back) if q.pending()]
    assert [(b.addr, b.len) for b in q.walk(q.head_at(0), 0).buffers] == [(addr, 100)]


def test_plain_page_has_no_memory(tmp_path):
    page = tmp_path / "p.bin"
    with Session("emu:rng", role="monitor") as m:
        page.write_bytes(m.page_bytes())
        live = Snapshot.capture(m)
    assert live.registered == [] and live.memory_note == "the driver has registered no memory"
    snap = Snapshot.load(str(page))
    assert snap.regions == [] and snap.registered is None and snap.device_side is None
    assert "saved page holds no memory" in snap.memory_note


def test_large_queue(tmp_path):
    """A 32768-entry queue, every slot offered: captured in one READ, every chain walked."""
    num = cat.MAX_QUEUE_SIZE
    with stalled(tmp_path, "rng", "current", "--num-max", str(num), queue_size=num) as (url, s):
        _mem, addr = s.alloc(num * 16)
        vq = s.virtqueue(0)
        assert vq.num == num
        for i in range(num):
            vq.add([(addr + 16 * i, 16, True)], i)
        publish(vq)
        with Session(url, role="monitor") as m:
            snap = Snapshot.capture(m)
        q = queue_state(snap, 0)
        window, found = q.outstanding()
        assert not found and len(window) == num
        chains = [q.walk(head, idx) for idx, _slot, head, _state in window]
        assert all(c.ok for c in chains)
        assert sorted(c.buffers[0].addr for c in chains) == [addr + 16 * i for i in range(num)]


# -- the walker on its own: hand-made snapshots ------------------------------------------------

BASE = 0x200000


def fake_snapshot(num: int, table: bytes, extra: list[Region] = (), indirect: bool = True) -> Snapshot:
    """A snapshot of one queue whose descriptor table is ``table`` and whose avail ring offers 0..num-1."""
    g = geometry()
    desc, avail, used = BASE, BASE + 0x100000, BASE + 0x180000
    avail_bytes = struct.pack(f"<HH{num}HH", 0, num, *range(num), 0)
    used_bytes = bytes(g.used_size(num))
    regions = [Region(desc, len(table), table, True), Region(avail, len(avail_bytes), avail_bytes, True),
               Region(used, len(used_bytes), used_bytes, True), *extra]  # fmt: skip
    decoded = {
        "queues": [{"index": 0, "num": num, "ready": 1, "desc_addr": desc, "avail_addr": avail, "used_addr": used}],
        "features": {"accepted": {"bits": [cat.INDIRECT_DESC_BIT] if indirect else []}},
        "device": {"class": None},
    }
    registered = [(r.base, r.size, True) for r in regions]
    return Snapshot(b"", "current", decoded, regions, registered=registered)


descriptor = st.tuples(
    st.one_of(st.integers(0, 2**64 - 1), st.integers(BASE, BASE + 0x200), st.integers(0x300000, 0x300400)),
    st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 16, 24, 32, 48, 64, 256])),
    st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]),
    st.integers(0, 0xFFFF) | st.integers(0, 40),
)


@given(
    num=st.sampled_from([1, 2, 4, 8, 16, 32]),
    descs=st.lists(descriptor, min_size=32, max_size=32),
    inner=st.lists(descriptor, min_size=0, max_size=64),
    indirect=st.booleans(),
)
def test_walker_never_raises_and_stops(num, descs, inner, indirect):
    table = b"".join(struct.pack("<QIHH", *d) for d in descs[:num])
    # an area of descriptors where random INDIRECT descriptors may point
    area = b"".join(struct.pack("<QIHH", *d) for d in inner).ljust(0x400, b"\0")
    snap = fake_snapshot(num, table, [Region(0x300000, len(area), area, True)], indirect)
    q = QueueState(snap, snap.decoded["queues"][0])
    assert not q.findings
    for head in [*range(num), num, 0xFFFF]:
        chain = q.walk(head)
        assert len(chain.buffers) <= num
        assert {f.kind for f in chain.findings} <= set(FINDING_KINDS) - {"walk-error"}
        assert len(chain.tables) <= 1
        chain.to_json()
    window, _found = q.outstanding()
    assert len(window) == num
    # the bulk walk (with its fast path for plain chains) says exactly what single walks say
    heads = [*range(num), num, 0xFFFF]
    bulk = q.walk_many((h, i) for i, h in enumerate(heads))
    assert [c.to_json() for c in bulk] == [q.walk(h, i).to_json() for i, h in enumerate(heads)]


def test_walker_on_uncaptured_table():
    snap = fake_snapshot(4, bytes(64))
    snap.regions = [r for r in snap.regions if r.base != BASE]  # the table was not captured
    q = QueueState(snap, snap.decoded["queues"][0])
    assert [f.kind for f in q.findings] == ["not-captured"]
    assert [f.kind for f in q.walk(0).findings] == ["no-table"]
    snap.registered = []
    q = QueueState(snap, snap.decoded["queues"][0])
    assert [f.kind for f in q.findings] == ["outside-memory"]


def test_walker_follows_a_good_indirect_table():
    inner = struct.pack("<QIHH", BASE + 0x10, 16, 1, 1) + struct.pack("<QIHH", BASE + 0x20, 32, 2, 0)
    table = struct.pack("<QIHH", 0x300000, 32, 4, 0).ljust(64, b"\0")
    snap = fake_snapshot(4, table, [Region(0x300000, 32, inner, True)])
    chain = QueueState(snap, snap.decoded["queues"][0]).walk(0)
    assert chain.ok, chain.findings
    assert [(b.addr, b.len, b.write, b.level, b.table) for b in chain.buffers] == [
        (BASE + 0x10, 16, False, 1, 0x300000),
        (BASE + 0x20, 32, True, 1, 0x300000),
    ]
    assert chain.tables == [(0, 0x300000, 32)]
    no_feature = fake_snapshot(4, table, [Region(0x300000, 32, inner, True)], indirect=False)
    chain = QueueState(no_feature, no_feature.decoded["queues"][0]).walk(0)
    assert [f.kind for f in chain.findings] == ["indirect-not-negotiated"]


def test_hostile_table_written_by_a_real_driver(tmp_path):
    """Every slot of a small queue names a loop: the walk ends at once every time."""
    with stalled(tmp_path, "rng", "classic", queue_size=4) as (url, s):
        _mem, addr = s.alloc(4096)
        vq = s.virtqueue(0)
        for i in range(4):
            write_desc(vq, i, addr, 16, 1, (i + 1) % 4)
        for _ in range(4):
            vq._avail_ring[vq.avail_idx % 4] = 0
            vq.avail_idx += 1
        publish(vq)
        with Session(url, role="monitor") as m:
            q = queue_state(Snapshot.capture(m), 0)
        chains = [q.walk(h, i) for i, _slot, h, _st in q.outstanding()[0]]
        assert [[f.kind for f in c.findings] for c in chains] == [["loop"]] * 4
        assert all(len(c.buffers) == 4 for c in chains)


# -- the archive parser on hostile input ---------------------------------------------------------


def _small_archive() -> bytes:
    from l4vctl import archive

    page = bytes(range(256)) * 16
    regions = [(0x200000, 64, True, b"a" * 64), (0x300000, 32, False, b"b" * 32)]
    meta = {"source": "test", "taken": 1.5, "abi": "current", "registered": None, "device_side": None,
            "memory_note": None}  # fmt: skip
    return b"".join(bytes(p) for p in archive.build(page, regions, meta))


def test_archive_parse_round_trip():
    from l4vctl import archive

    a = archive.parse(_small_archive())
    assert bytes(a.page) == bytes(range(256)) * 16
    assert [(b, n, w, bytes(d)) for b, n, w, d in a.regions] == [
        (0x200000, 64, True, b"a" * 64),
        (0x300000, 32, False, b"b" * 32),
    ]
    assert a.manifest["source"] == "test"


@given(st.binary(max_size=300))
def test_archive_parser_refuses_random_bytes(tail):
    from l4vctl import archive

    with pytest.raises(FormatError):
        archive.parse(archive.MAGIC + tail)


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8), st.integers(0, 4500))
def test_archive_parser_on_damaged_archives(edits, cut):
    """Flipped bytes and cut files: a FormatError or a consistent archive, nothing else."""
    from l4vctl import archive

    data = bytearray(_small_archive())
    for pos, value in edits:
        data[pos % len(data)] = value
    data = data[: len(data) - cut] if cut < len(data) else data
    try:
        a = archive.parse(bytes(data))
    except FormatError:
        return
    assert len(a.page) >= 256
    for base, size, _w, blob in a.regions:
        assert len(blob) == size and base + size <= 1 << 64


def test_archive_manifest_nested_too_deep():
    from l4vctl import archive
    from l4vctl.formats.fast import codec

    text = b"[" * 100_000 + b"]" * 100_000
    hdr = codec("archive_header").pack({"magic": archive.MAGIC, "version": 1, "flags": 0, "manifest_size": len(text)})
    with pytest.raises(FormatError, match="not JSON"):
        archive.parse(hdr + text)
