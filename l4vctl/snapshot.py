"""A read-only snapshot of a device: its config page, the driver's ring memory, the device's counters.

:meth:`Snapshot.capture` takes one from a session — live as a monitor (the
page, monitor STATS, and the driver's memory through monitor REGIONS/READ,
see docs/wire-protocol.md) or offline from ``dump:FILE`` (a plain page, or a
memory archive written by ``dump-config --with-memory``: page, memory and the
STATS saved with it).  :meth:`Snapshot.save` writes a memory archive,
:meth:`Snapshot.load` reads one (or a plain page).  :mod:`l4vctl.ringread`
reads queues and chains out of a snapshot.

Capture is built for large queues: every ready queue's descriptor table,
available and used ring travel in one READ (ranges merged where they touch),
and nothing is decoded until a reader asks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat
from l4vctl.errors import FormatError, UsageError

if TYPE_CHECKING:
    from l4vctl.session import Session

MEMORY_CHOICES = ("rings", "all", "none")
#: Ranges closer than this are read as one (the gap's bytes come along).
MERGE_GAP = 4096


class Region:
    """Captured memory at a device address: ``base``, ``size``, the bytes, and whether the device may write it."""

    __slots__ = ("base", "size", "data", "writable")

    def __init__(self, base: int, size: int, data: bytes | memoryview, writable: bool):
        if len(data) != size:
            raise ValueError(f"region {base:#x}: {len(data)} bytes for size {size:#x}")
        self.base = base
        self.size = size
        self.data = data
        self.writable = writable

    def contains(self, addr: int, size: int) -> bool:
        """Whether the region holds all of ``[addr, addr + size)``."""
        return self.base <= addr and addr + size <= self.base + self.size

    def __repr__(self) -> str:
        return f"<Region {self.base:#x}+{self.size:#x} {'rw' if self.writable else 'ro'}>"


def memory_note(s: Session) -> str:
    """Why a session's backend gives no access to the driver's memory."""
    scheme = getattr(s.backend, "scheme", "") or s.url.partition(":")[0]
    if scheme == "l4re":
        return "l4re: ring memory not reachable through the bridge"
    if scheme == "vhost-user":
        return "vhost-user: the back-end's ring memory is its own; l4vctl has no view of it"
    if not s.live:
        return f"{scheme}: a saved page holds no memory (save one with 'dump-config --with-memory')"
    return f"{scheme}: the device has no monitor interface to the driver's memory"


class Snapshot:
    """Page, decoded page, captured memory and device counters of one device at one moment.

    ``registered`` lists ``(base, size, writable)`` of the memory the driver
    registered (None when unknown); ``regions`` is what was captured of it.
    ``device_side`` is the monitor STATS dict, taken live or saved in an
    archive (``live`` tells which).
    """

    def __init__(self, page: bytes, abi: str, decoded: dict, regions: list[Region] | None = None, *,
                 registered: list[tuple[int, int, bool]] | None = None, device_side: dict | None = None,
                 memory_note: str | None = None, taken: float | None = None, source: str = "",
                 live: bool = False) -> None:  # fmt: skip
        self.page = page
        self.abi = abi
        self.decoded = decoded
        self.regions: list[Region] = sorted(regions or [], key=lambda r: r.base)
        self.registered = registered  # a property: setting it also forgets the last lookup
        self.device_side = device_side
        self.memory_note = memory_note
        self.taken = time.time() if taken is None else taken
        self.source = source
        self.live = live
        self._last: Region | None = None

    @property
    def registered(self) -> list[tuple[int, int, bool]] | None:
        """``(base, size, writable)`` of the memory the driver registered; None when unknown."""
        return self._registered

    @registered.setter
    def registered(self, value: list[tuple[int, int, bool]] | None) -> None:
        self._registered = value
        self._reg_last = (0, 0)  # the registered region found last (base, size)

    # -- memory ------------------------------------------------------------------------------

    def _find(self, addr: int, size: int) -> Region | None:
        last = self._last
        if last is not None and last.contains(addr, size):
            return last
        for r in self.regions:
            if r.contains(addr, size):
                self._last = r
                return r
        return None

    def contains(self, addr: int, size: int) -> bool:
        """Whether one captured region holds all of ``[addr, addr + size)``."""
        return size >= 0 and self._find(addr, size) is not None

    def read(self, addr: int, size: int) -> memoryview:
        """The captured bytes at ``[addr, addr + size)``; FormatError (exit 4) unless one region holds them."""
        r = self._find(addr, size) if size >= 0 else None
        if r is None:
            raise FormatError(f"memory {addr:#x}+{size:#x} was not captured")
        start = addr - r.base
        return memoryview(r.data)[start : start + size]

    def in_registered(self, addr: int, size: int) -> bool:
        """Whether one region the driver registered holds all of the range (True when that is unknown)."""
        if self.registered is None:
            return True
        b, n = self._reg_last
        if b <= addr and addr + size <= b + n:
            return True
        for b, n, _w in self.registered:
            if b <= addr and addr + size <= b + n:
                self._reg_last = (b, n)
                return True
        return False

    @property
    def negotiated(self) -> frozenset[int]:
        """Feature bits the driver accepted, as the page shows them."""
        cached = self.__dict__.get("_negotiated")
        if cached is None:
            try:
                cached = frozenset(self.decoded["features"]["accepted"]["bits"])
            except (KeyError, TypeError):
                cached = frozenset()
            self._negotiated = cached
        return cached

    @property
    def device_class(self) -> str | None:
        """The device class ("blk", "net", ...) of the page, None if unknown."""
        dev = self.decoded.get("device") or {}
        return dev.get("class")

    # -- capture ------------------------------------------------------------------------------

    @classmethod
    def capture(cls, s: Session, *, memory: str = "rings") -> Snapshot:
        """A snapshot of an open session (monitor or driver, live or saved).

        ``memory``: "rings" (every ready queue's descriptor table and rings),
        "all" (every registered region) or "none".
        """
        if memory not in MEMORY_CHOICES:
            raise UsageError(f"memory must be one of {', '.join(MEMORY_CHOICES)}, not {memory!r}")
        page = s.page_bytes()
        decoded = s.decode().result
        if not s.live:
            return cls._from_saved(s, page, decoded)
        device_side = s.stats()
        registered = s.regions()
        snap = cls(page, s.abi, decoded, registered=registered, device_side=device_side, source=s.url, live=True)
        if registered is None:
            snap.memory_note = memory_note(s)
            return snap
        if not registered:
            snap.memory_note = "the driver has registered no memory"
            return snap
        if memory == "rings":
            snap.fetch(s, snap.ring_ranges())
        elif memory == "all":
            snap.fetch(s, [(b, n) for b, n, _w in registered])
        return snap

    @classmethod
    def _from_saved(cls, s: Session, page: bytes, decoded: dict) -> Snapshot:
        archive = getattr(s.backend, "archive", None)
        if archive is None:
            return cls(page, s.abi, decoded, source=s.url, memory_note=memory_note(s))
        m = archive.manifest
        registered = m.get("registered")
        return cls(
            page,
            s.abi,
            decoded,
            [Region(base, size, data, w) for base, size, w, data in archive.regions],
            registered=[(r["base"], r["size"], bool(r.get("writable"))) for r in registered]
            if registered is not None
            else None,
            device_side=m.get("device_side"),
            memory_note=m.get("memory_note"),
            taken=m.get("taken") if isinstance(m.get("taken"), (int, float)) else None,
            source=s.url,
        )

    def ring_ranges(self) -> list[tuple[int, int]]:
        """``(addr, size)`` of every ready queue's descriptor table, available and used ring."""
        from l4vctl.ringread import ring_ranges, valid_num

        out = []
        for q in self.decoded.get("queues", []):
            if q.get("ready") and valid_num(q.get("num", 0)):
                out += [
                    (a, n) for _part, a, n in ring_ranges(q["num"], q["desc_addr"], q["avail_addr"], q["used_addr"])
                ]
        return out

    def fetch(self, s: Session, ranges: Iterable[tuple[int, int]]) -> None:
        """Read more of the driver's memory into the snapshot (live sessions; ranges outside
        the registered memory, or already captured, are skipped)."""
        if not s.live or self.registered is None:
            return
        wanted = []
        for addr, size in ranges:
            if size <= 0 or self.contains(addr, size):
                continue
            for base, rsize, _w in self.registered:
                lo, hi = max(addr, base), min(addr + size, base + rsize)
                if lo < hi:
                    wanted.append((lo, hi - lo))
        for batch in _batches(self._merge(wanted)):
            data = s.read_device_memory(batch)
            pos = 0
            for addr, size in batch:
                self.regions.append(Region(addr, size, data[pos : pos + size], self._writable(addr)))
                pos += size
        self._tidy()

    def _tidy(self) -> None:
        """Sort the regions and drop those another region covers (a later, larger read)."""
        regions = sorted(self.regions, key=lambda r: (r.base, -r.size))
        kept: list[Region] = []
        for r in regions:
            if kept and kept[-1].contains(r.base, r.size):
                continue
            kept.append(r)
        self.regions = kept
        self._last = None

    def _writable(self, addr: int) -> bool:
        for base, size, w in self.registered or []:
            if base <= addr < base + size:
                return w
        return False

    def _merge(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Sort ranges and join those that overlap or nearly touch inside one registered region."""
        out: list[list[int]] = []
        for addr, size in sorted(ranges):
            if out:
                last = out[-1]
                end = last[0] + last[1]
                if addr <= end + MERGE_GAP and self._same_region(last[0], max(end, addr + size)):
                    last[1] = max(end, addr + size) - last[0]
                    continue
            out.append([addr, size])
        return [(a, n) for a, n in out]

    def _same_region(self, start: int, end: int) -> bool:
        return any(b <= start and end <= b + n for b, n, _w in self.registered or [])

    # -- archive ------------------------------------------------------------------------------

    def manifest_meta(self) -> dict[str, Any]:
        """The manifest keys of an archive of this snapshot (besides page and regions)."""
        return {
            "source": self.source,
            "taken": self.taken,
            "abi": self.abi,
            "registered": None
            if self.registered is None
            else [{"base": b, "size": n, "writable": w} for b, n, w in self.registered],
            "device_side": self.device_side,
            "memory_note": self.memory_note,
        }

    def save(self, path_or_file: Any) -> None:
        """Write a memory archive (docs/memory-archive.md) to a path or a binary file object."""
        from l4vctl import archive

        pieces = archive.build(
            self.page, [(r.base, r.size, r.writable, r.data) for r in self.regions], self.manifest_meta()
        )
        if hasattr(path_or_file, "write"):
            for piece in pieces:
                path_or_file.write(piece)
            return
        with open(path_or_file, "wb") as f:
            for piece in pieces:
                f.write(piece)

    @classmethod
    def load(cls, path: str) -> Snapshot:
        """A snapshot of a saved file: a memory archive, or a plain page (then without memory)."""
        from l4vctl.session import Session

        url = path if path.startswith("dump:") else f"dump:{path}"
        with Session(url) as s:
            return cls.capture(s, memory="all")


def _batches(ranges: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Ranges split into READ calls: each at most MONITOR_READ_MAX_RANGES ranges and MONITOR_READ_MAX_BYTES bytes."""
    limit = cat.MONITOR_READ_MAX_BYTES
    out: list[list[tuple[int, int]]] = [[]]
    total = 0
    for addr, size in ranges:
        while size:
            if len(out[-1]) == cat.MONITOR_READ_MAX_RANGES or total == limit:
                out.append([])
                total = 0
            part = min(size, limit - total)
            out[-1].append((addr, part))
            total += part
            addr += part
            size -= part
    return [b for b in out if b]
