"""Read-only views of split virtqueues in captured memory: ring state and descriptor chains.

The driver side (:mod:`l4vctl.virtqueue`) writes rings, the device side
(:mod:`l4vctl.emulator.ring`) consumes them; this module only looks, at memory
a :class:`~l4vctl.snapshot.Snapshot` captured (live through a monitor, or from
a saved archive).  Everything is decoded through the ring schemas' fast codecs
(:mod:`l4vctl.formats.fast`): the descriptor table of a 32768-entry queue is
turned into four lists with a handful of ``memoryview.cast`` calls.

A chain walk checks every bound — head and next indices against the table,
loops, chains longer than the queue, indirect tables whose size is not a
multiple of 16, nested indirect tables, memory outside what the driver
registered — and reports what it finds as :class:`Finding` records on the
chain.  Nothing a hostile driver writes makes a walk raise or run forever.
"""

from __future__ import annotations

import contextlib
import gc
import struct
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from l4vctl import catalog as cat
from l4vctl.formats.fast import native_format
from l4vctl.formats.fast import ring as ring_geometry

if TYPE_CHECKING:
    from l4vctl.snapshot import Snapshot

#: Descriptor flags (``vring_desc.flags``).
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
FLAG_NAMES = ((F_NEXT, "NEXT"), (F_WRITE, "WRITE"), (F_INDIRECT, "INDIRECT"))
#: Ring flags: avail NO_INTERRUPT, used NO_NOTIFY.
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

#: Finding kinds of a chain walk (stable names; ``--json`` shows them).
FINDING_KINDS = {
    "head-out-of-range": "the head index is not below the queue size",
    "next-out-of-range": "a next index is not below the size of its table",
    "loop": "the chain comes back to a descriptor it already used",
    "chain-too-long": "the chain has more descriptors than the queue has entries",
    "indirect-size": "an indirect table's length is zero or not a multiple of 16",
    "nested-indirect": "an indirect table holds an INDIRECT descriptor",
    "indirect-with-next": "a descriptor has both INDIRECT and NEXT",
    "indirect-not-negotiated": "an INDIRECT descriptor without VIRTIO_RING_F_INDIRECT_DESC",
    "outside-memory": "a buffer or table lies outside the memory the driver registered",
    "not-captured": "a table lies in memory that was not captured",
    "read-after-write": "a device-readable buffer follows a device-writable one",
    "no-table": "the queue's descriptor table was not captured",
    "index-corruption": "avail.idx is more than the queue size ahead of the device",
    "walk-error": "the walk stopped on something unforeseen (a bug in l4vctl)",
}


class Finding(NamedTuple):
    """A problem a walk found: a stable ``kind`` (see FINDING_KINDS) and a sentence."""

    kind: str
    message: str


class Buffer(NamedTuple):
    """One buffer of a chain: the descriptor that names it and where it sits."""

    desc_index: int  # descriptor index in its table
    addr: int
    len: int
    flags: int
    next: int
    level: int  # 0: the queue's table; 1: an indirect table
    table: int | None  # the indirect table's address (level 1), else None

    @property
    def write(self) -> bool:
        """Whether the device writes this buffer."""
        return bool(self.flags & F_WRITE)


def flag_names(flags: int) -> list[str]:
    """Names of descriptor flags, unknown bits as hex."""
    names = [name for bit, name in FLAG_NAMES if flags & bit]
    rest = flags & ~(F_NEXT | F_WRITE | F_INDIRECT)
    if rest:
        names.append(f"{rest:#x}")
    return names


class Chain:
    """A walked descriptor chain: buffers in order, indirect tables met, findings."""

    __slots__ = ("head", "slot", "avail_index", "buffers", "tables", "findings")

    def __init__(self, head: int, slot: int | None = None, avail_index: int | None = None):
        self.head = head
        self.slot = slot  # the avail ring slot that offered it, if known
        self.avail_index = avail_index  # the free-running avail index, if known
        self.buffers: list[Buffer] = []
        #: ``(descriptor index, table address, length)`` of each indirect descriptor followed.
        self.tables: list[tuple[int, int, int]] = []
        self.findings: list[Finding] = []

    @property
    def ok(self) -> bool:
        """True when the walk found nothing wrong."""
        return not self.findings

    def readable(self) -> list[Buffer]:
        """Buffers the device reads."""
        return [b for b in self.buffers if not b.write]

    def writable(self) -> list[Buffer]:
        """Buffers the device writes."""
        return [b for b in self.buffers if b.write]

    def to_json(self) -> dict[str, Any]:
        """The chain with the stable keys ``queue-show --json`` documents."""
        return {
            "head": self.head,
            "slot": self.slot,
            "avail_index": self.avail_index,
            "buffers": [
                {
                    "index": b.desc_index,
                    "addr": b.addr,
                    "len": b.len,
                    "flags": b.flags,
                    "flag_names": flag_names(b.flags),
                    "next": b.next,
                    "write": b.write,
                    "indirect_level": b.level,
                    "table": b.table,
                }
                for b in self.buffers
            ],
            "indirect_tables": [{"index": i, "addr": a, "len": n} for i, a, n in self.tables],
            "findings": [{"kind": f.kind, "message": f.message} for f in self.findings],
        }


class DescTable:
    """A descriptor table decoded in bulk: four lists, one per ``vring_desc`` field."""

    __slots__ = ("size", "addr", "len", "flags", "next")

    addr: list[int]
    len: list[int]
    flags: list[int]
    next: list[int]

    def __init__(self, data: memoryview | bytes):
        g = ring_geometry()
        dsize = g.desc.size
        mem = memoryview(data).cast("B")
        self.size = len(mem) // dsize
        mem = mem[: self.size * dsize]
        for name in ("addr", "len", "flags", "next"):
            off, size, fmt, _count = g.desc.fields[name]
            if self.size == 0:
                setattr(self, name, [])
                continue
            words = mem.cast(native_format(fmt))  # type: ignore[call-overload]  # a format known at run time
            step = dsize // size
            setattr(self, name, words[off // size :: step].tolist())
            words.release()


def ring_ranges(num: int, desc: int, avail: int, used: int) -> list[tuple[str, int, int]]:
    """``(part, device address, size)`` of a queue's descriptor table, available and used rings."""
    g = ring_geometry()
    return [("desc", desc, g.desc_size(num)), ("avail", avail, g.avail_size(num)), ("used", used, g.used_size(num))]


def valid_num(num: int) -> bool:
    """Whether ``num`` is a queue size a split ring can have (a power of two up to 32768)."""
    return 0 < num <= cat.MAX_QUEUE_SIZE and not num & (num - 1)


class QueueState:
    """One ready queue as captured: page entry, ring indices, rings and a chain walker.

    Fields of a ring that was not captured are None; ``findings`` says why.
    """

    def __init__(self, snap: Snapshot, entry: dict[str, Any], next_avail: int | None = None):
        g = ring_geometry()
        self.snap = snap
        self.index: int = entry["index"]
        self.num: int = entry["num"]
        self.ready: bool = bool(entry["ready"])
        self.desc_addr: int = entry["desc_addr"]
        self.avail_addr: int = entry["avail_addr"]
        self.used_addr: int = entry["used_addr"]
        self.notify_index = entry.get("device_notify_index")
        negotiated = snap.negotiated
        self.event_idx = cat.EVENT_IDX_BIT in negotiated
        self.indirect = cat.INDIRECT_DESC_BIT in negotiated
        #: The device's next avail index (monitor STATS; None offline without saved STATS).
        self.next_avail = next_avail
        self.findings: list[Finding] = []
        self._reg_hit = (0, 0)  # the registered region a buffer was last found in: [start, end)
        self.table: DescTable | None = None
        self.avail_flags: int | None = None
        self.avail_idx: int | None = None
        self.used_event: int | None = None
        self.used_flags: int | None = None
        self.used_idx: int | None = None
        self.avail_event: int | None = None
        self.avail_ring: list[int] | None = None
        #: the used ring's elements: ids (heads) and lengths, slot by slot
        self.used_ids: list[int] | None = None
        self.used_lens: list[int] | None = None
        num = self.num
        if not valid_num(num):
            self.findings.append(Finding("no-table", f"queue {self.index}: num {num} is not a valid queue size"))
            return
        off = g.offsets(num)
        word = native_format(g.avail_word)
        wsize = struct.calcsize("<" + g.avail_word)
        desc = self._area("descriptor table", self.desc_addr, g.desc_size(num))
        if desc is not None:
            self.table = DescTable(desc)
        avail = self._area("available ring", self.avail_addr, g.avail_size(num))
        if avail is not None:
            words = avail.cast(word)  # type: ignore[call-overload]  # a format known at run time
            self.avail_flags = words[off["avail.flags"] // wsize]
            self.avail_idx = words[off["avail.idx"] // wsize]
            self.avail_ring = words[off["avail.ring"] // wsize : off["avail.ring"] // wsize + num].tolist()
            if self.event_idx:
                self.used_event = words[off["avail.used_event"] // wsize]
        used = self._area("used ring", self.used_addr, g.used_size(num))
        if used is not None:
            hdr = used.cast(word)  # type: ignore[call-overload]  # a format known at run time
            self.used_flags = hdr[off["used.flags"] // wsize]
            self.used_idx = hdr[off["used.idx"] // wsize]
            if self.event_idx:
                self.avail_event = hdr[off["used.avail_event"] // wsize]
            esize = g.used_elem.size
            area = used[off["used.ring"] : off["used.ring"] + esize * num]
            elems = area.cast(native_format(g.used_elem_word))  # type: ignore[call-overload]
            stride = g.used_stride
            self.used_ids = elems[g.used_id_at :: stride].tolist()
            self.used_lens = elems[g.used_len_at :: stride].tolist()

    def _area(self, what: str, addr: int, size: int) -> memoryview | None:
        snap = self.snap
        if snap.contains(addr, size):
            return snap.read(addr, size)
        where = f"queue {self.index}: {what} at {addr:#x}+{size:#x}"
        if snap.registered is not None and not snap.in_registered(addr, size):
            self.findings.append(Finding("outside-memory", f"{where} is outside the driver's registered memory"))
        else:
            self.findings.append(Finding("not-captured", f"{where} was not captured"))
        return None

    # -- indices ---------------------------------------------------------------------------

    def in_flight_start(self) -> int | None:
        """The first avail index the device has not consumed: next_avail (STATS), else used.idx."""
        if self.next_avail is not None:
            return self.next_avail & 0xFFFF
        return self.used_idx

    def pending(self) -> int | None:
        """Chains offered and not yet consumed (avail.idx - start, mod 2^16), None if unknown."""
        start = self.in_flight_start()
        if start is None or self.avail_idx is None:
            return None
        return (self.avail_idx - start) & 0xFFFF

    def head_at(self, avail_index: int) -> int | None:
        """The head in the avail slot of free-running index ``avail_index`` (None: ring not captured)."""
        if self.avail_ring is None:
            return None
        return self.avail_ring[avail_index % self.num]

    def in_flight(self) -> tuple[list[tuple[int, int, int]], list[Finding]]:
        """``(avail index, slot, head)`` of every chain offered and not yet consumed, and findings.

        More than ``num`` pending is index corruption: reported, and only ``num`` are listed.
        """
        found: list[Finding] = []
        start, count = self.in_flight_start(), self.pending()
        if start is None or count is None or self.avail_ring is None:
            return [], found
        if count > self.num:
            what = "next_avail" if self.next_avail is not None else "used.idx"
            msg = (
                f"queue {self.index}: avail.idx {self.avail_idx} is {count} ahead of {what} {start}, "
                f"more than the {self.num} entries of the queue"
            )
            found.append(Finding("index-corruption", msg))
            count = self.num
        num = self.num
        ring = self.avail_ring
        out = []
        for k in range(count):
            idx = (start + k) & 0xFFFF
            out.append((idx, idx % num, ring[idx % num]))
        return out, found

    def outstanding(self) -> tuple[list[tuple[int, int, int, str]], list[Finding]]:
        """``(avail index, slot, head, state)`` of every chain offered and not yet used, and findings.

        The window runs from used.idx to avail.idx (in the order a device that
        completes in order uses them).  ``state`` is "in-device" for a chain the
        device has taken (below next_avail), "pending" for one it has not,
        "offered" when next_avail is unknown.  A window longer than ``num`` is
        index corruption: reported, and only ``num`` are listed.
        """
        found: list[Finding] = []
        if self.used_idx is None or self.avail_idx is None or self.avail_ring is None:
            return [], found
        start = self.used_idx
        count = (self.avail_idx - start) & 0xFFFF
        if count > self.num:
            msg = (
                f"queue {self.index}: avail.idx {self.avail_idx} is {count} ahead of used.idx {start}, "
                f"more than the {self.num} entries of the queue"
            )
            found.append(Finding("index-corruption", msg))
            count = self.num
        taken = None
        if self.next_avail is not None:
            taken = (self.next_avail - start) & 0xFFFF
            if taken > count:
                taken = None  # next_avail outside the window: the device and the rings disagree
        num, ring = self.num, self.avail_ring
        cut = count if taken is None else taken
        first = "offered" if taken is None else "in-device"
        with gc_paused():
            out = [(idx, idx % num, ring[idx % num], first) for idx in ((start + k) & 0xFFFF for k in range(cut))]
            out += [
                (idx, idx % num, ring[idx % num], "pending")
                for idx in ((start + k) & 0xFFFF for k in range(cut, count))
            ]
        return out, found

    def used_lengths(self, completions: int | None = None) -> dict[int, int]:
        """Head -> length of the latest completion of it still in the used ring.

        ``completions`` (the device's completed counter, if known) tells whether
        the ring has wrapped; else used.idx does (slots never written are skipped).
        """
        ids, lens = self.used_ids, self.used_lens
        if ids is None or lens is None or self.used_idx is None:
            return {}
        num = self.num
        valid = num if (completions or 0) >= num or self.used_idx >= num else self.used_idx
        out: dict[int, int] = {}
        for k in range(valid):
            slot = (self.used_idx - 1 - k) % num
            out.setdefault(ids[slot], lens[slot])
        return out

    @property
    def used_ring(self) -> list[tuple[int, int]] | None:
        """The used ring's elements as ``(id, len)`` pairs, slot by slot (None: not captured)."""
        if self.used_ids is None or self.used_lens is None:
            return None
        return list(zip(self.used_ids, self.used_lens, strict=True))

    # -- chains ----------------------------------------------------------------------------

    def walk(self, head: int, avail_index: int | None = None) -> Chain:
        """The chain starting at descriptor ``head``, every bound checked; never raises."""
        slot = avail_index % self.num if avail_index is not None and self.num else None
        chain = Chain(head, slot, avail_index)
        table = self.table
        if table is None:
            chain.findings.append(Finding("no-table", f"queue {self.index}: descriptor table not available"))
            return chain
        if not 0 <= head < self.num:
            chain.findings.append(Finding("head-out-of-range", f"head {head} is not below the queue size {self.num}"))
            return chain
        try:
            if not self._plain(chain, table, head):
                chain.buffers = []
                # a whole chain, indirect entries included, has at most num descriptors
                self._walk_table(chain, table, head, 0, None, [self.num])
        except Exception as exc:  # a walk must report, never raise: an unforeseen case is a finding too
            chain.findings.append(Finding("walk-error", f"the walk stopped: {exc}"))
        return chain

    def walk_many(self, items: Iterable[tuple[int, int | None]]) -> list[Chain]:
        """:meth:`walk` of every ``(head, avail index)``, the common case without per-chain method calls.

        The cyclic garbage collector is paused meanwhile: tens of thousands of
        new chains (none of them in a cycle) would otherwise set off full
        collections that cost more than the walks.
        """
        with gc_paused():
            return self._walk_many(items)

    def _walk_many(self, items: Iterable[tuple[int, int | None]]) -> list[Chain]:
        table = self.table
        if table is None:
            return [self.walk(head, idx) for head, idx in items]
        addrs, lens, flags_, nexts = table.addr, table.len, table.flags, table.next
        num = self.num
        new_chain, new_buffer = Chain, tuple.__new__
        out: list[Chain] = []
        append = out.append
        lo, hi = self._reg_hit
        odd = F_INDIRECT | F_NEXT
        for head, idx in items:
            if not 0 <= head < num:
                append(self.walk(head, idx))
                continue
            flags = flags_[head]
            length = lens[head]
            addr = addrs[head]
            if flags & odd or (length and not (lo <= addr and addr + length <= hi)):
                append(self.walk(head, idx))  # anything but one plain buffer in known memory
                lo, hi = self._reg_hit
                continue
            chain = new_chain(head, None if idx is None else idx % num, idx)
            chain.buffers.append(new_buffer(Buffer, (head, addr, length, flags, nexts[head], 0, None)))
            append(chain)
        return out

    def _plain(self, chain: Chain, table: DescTable, head: int) -> bool:
        """The common case fast: a chain in the queue's table with nothing to report.

        False as soon as anything is unusual (an INDIRECT descriptor, a next
        index out of range, more than ``num`` descriptors — a loop among them
        —, readable after writable, memory outside the registered regions);
        the full walk then goes over the chain again and says what it is.
        """
        addrs, lens, flags_, nexts = table.addr, table.len, table.flags, table.next
        lo, hi = self._reg_hit
        bufs = chain.buffers
        num = self.num
        i = head
        count = 0
        wrote = False
        while True:
            flags = flags_[i]
            if flags & F_INDIRECT:
                return False
            addr, length = addrs[i], lens[i]
            if length and not (lo <= addr and addr + length <= hi):
                if not self._registered(addr, length):
                    return False
                lo, hi = self._reg_hit
            if flags & F_WRITE:
                wrote = True
            elif wrote:
                return False
            bufs.append(tuple.__new__(Buffer, (i, addr, length, flags, nexts[i], 0, None)))
            if not flags & F_NEXT:
                return True
            count += 1
            i = nexts[i]
            if count >= num or i >= num:
                return False

    def _registered(self, addr: int, length: int) -> bool:
        """Whether registered memory holds the range; remembers the region that did (all of it when unknown)."""
        registered = self.snap.registered
        if registered is None:
            self._reg_hit = (0, 1 << 65)
            return True
        for base, size, _w in registered:
            if base <= addr and addr + length <= base + size:
                self._reg_hit = (base, base + size)
                return True
        return False

    def _walk_table(self, chain: Chain, table: DescTable, start: int, level: int, where: int | None,
                    budget: list[int]) -> None:  # fmt: skip
        """Walk one table from ``start``; ``budget[0]`` counts down the descriptors a chain may still use."""
        addrs, lens, flags_, nexts = table.addr, table.len, table.flags, table.next
        size = table.size
        seen: set[int] = set()
        i = start
        wrote = level > 0 and any(b.write for b in chain.buffers)
        snap = self.snap
        check = snap.registered is not None
        in_registered = snap.in_registered
        while True:
            if i in seen:
                chain.findings.append(Finding("loop", f"descriptor {i}{_in(where)} is reached twice: a loop"))
                return
            seen.add(i)
            budget[0] -= 1
            if budget[0] < 0:
                chain.findings.append(
                    Finding("chain-too-long", f"the chain has more than {self.num} descriptors (the queue size)")
                )
                return
            addr, length, flags, nxt = addrs[i], lens[i], flags_[i], nexts[i]
            if flags & F_INDIRECT:
                self._indirect(chain, i, addr, length, flags, level, where, budget)
                return
            if length and check and not in_registered(addr, length):
                msg = f"buffer {addr:#x}+{length:#x} of descriptor {i}{_in(where)} is outside the registered memory"
                chain.findings.append(Finding("outside-memory", msg))
            if flags & F_WRITE:
                wrote = True
            elif wrote:
                msg = f"descriptor {i}{_in(where)} is device-readable after a writable one"
                chain.findings.append(Finding("read-after-write", msg))
            chain.buffers.append(Buffer(i, addr, length, flags, nxt, level, where))
            if not flags & F_NEXT:
                return
            if nxt >= size:
                chain.findings.append(Finding("next-out-of-range", f"descriptor {i}{_in(where)} has next {nxt}, "
                                              f"not below the table size {size}"))  # fmt: skip
                return
            i = nxt

    def _indirect(self, chain: Chain, i: int, addr: int, length: int, flags: int, level: int, where: int | None,
                  budget: list[int]) -> None:  # fmt: skip
        """Follow the INDIRECT descriptor ``i`` (the chain ends with its table)."""
        if level:
            chain.findings.append(
                Finding("nested-indirect", f"descriptor {i}{_in(where)} is INDIRECT inside an indirect table")
            )
            return
        if flags & F_NEXT:
            chain.findings.append(Finding("indirect-with-next", f"descriptor {i} has both INDIRECT and NEXT"))
        if not self.indirect:
            msg = f"descriptor {i} is INDIRECT but INDIRECT_DESC was not negotiated"
            chain.findings.append(Finding("indirect-not-negotiated", msg))
        chain.tables.append((i, addr, length))
        dsize = ring_geometry().desc.size
        snap = self.snap
        if length == 0 or length % dsize:
            chain.findings.append(Finding("indirect-size", f"indirect table of descriptor {i} has length "
                                          f"{length}, not a positive multiple of {dsize}"))  # fmt: skip
            return
        if snap.registered is not None and not snap.in_registered(addr, length):
            chain.findings.append(Finding("outside-memory", f"indirect table {addr:#x}+{length:#x} of "
                                          f"descriptor {i} is outside the driver's registered memory"))  # fmt: skip
            return
        if not snap.contains(addr, length):
            chain.findings.append(Finding("not-captured", f"indirect table {addr:#x}+{length:#x} was not captured"))
            return
        self._walk_table(chain, DescTable(snap.read(addr, length)), 0, 1, addr, budget)

    # -- output ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Ring state with the stable keys ``queue-show --json`` documents."""
        return {
            "index": self.index,
            "num": self.num,
            "ready": self.ready,
            "desc_addr": self.desc_addr,
            "avail_addr": self.avail_addr,
            "used_addr": self.used_addr,
            "event_idx": self.event_idx,
            "indirect": self.indirect,
            "avail": {"flags": self.avail_flags, "idx": self.avail_idx, "used_event": self.used_event},
            "used": {"flags": self.used_flags, "idx": self.used_idx, "avail_event": self.avail_event},
            "next_avail": self.next_avail,
            "pending": self.pending(),
            "findings": [{"kind": f.kind, "message": f.message} for f in self.findings],
        }


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while bulk work makes many acyclic objects."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _in(where: int | None) -> str:
    return "" if where is None else f" of the indirect table at {where:#x}"


def queue_states(snap: Snapshot) -> list[QueueState]:
    """A QueueState for every ready queue of the snapshot's page."""
    return [_state(snap, entry) for entry in snap.decoded.get("queues", []) if entry.get("ready") and entry.get("num")]


def queue_state(snap: Snapshot, index: int) -> QueueState | None:
    """The QueueState of queue ``index``, None if it is not ready (or does not exist)."""
    for entry in snap.decoded.get("queues", []):
        if entry.get("index") == index:
            return _state(snap, entry) if entry.get("ready") and entry.get("num") else None
    return None


def _state(snap: Snapshot, entry: dict[str, Any]) -> QueueState:
    stats = (snap.device_side or {}).get("queues") or []
    i = entry["index"]
    q = stats[i] if i < len(stats) and isinstance(stats[i], dict) else {}
    next_avail = q.get("next_avail") if q.get("enabled") and isinstance(q.get("next_avail"), int) else None
    return QueueState(snap, entry, next_avail)
