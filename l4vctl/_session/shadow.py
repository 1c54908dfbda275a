"""Local copies of driver memory that is not mapped in this process.

A backend whose memory lives elsewhere (across a link to another machine)
serves it only as ranges (:class:`~l4vctl.backends.base.Memory` ``read`` and
``write``).  The session then gives drivers and virtqueues a local shadow of
each lent region, and the virtqueue moves bytes at the two moments the
device may look at them, as DMA-syncing drivers do: what the device will read
is pushed before the kick, what it wrote is pulled when its request completes.
Each push or pull is one batched round trip per region.
"""

from __future__ import annotations

from collections.abc import Iterable

from l4vctl.backends.base import Memory
from l4vctl.errors import ProtocolError

#: Granule of the comparison that finds what changed since the last push.
DIFF_GRANULE = 64
#: Every byte to a different one (for ranges whose memory content is not known).
_INVERT = bytes(b ^ 0xFF for b in range(256))


class _Region:
    __slots__ = ("base", "end", "memory", "shadow", "mirror")

    def __init__(self, base: int, memory: Memory, shadow: bytearray):
        self.base = base
        self.end = base + len(shadow)
        self.memory = memory
        self.shadow = shadow
        # what the memory holds, as far as this side knows: lent memory starts zeroed, and
        # the device writes only what completions say it did (pulled into both copies)
        self.mirror = bytearray(len(shadow))

    def changed(self, off: int, n: int) -> list[tuple[int, int]]:
        """The parts of ``off``..``off+n`` where the shadow differs from the mirror (granules, merged)."""
        shadow, mirror = self.shadow, self.mirror
        end = off + n
        if shadow[off:end] == mirror[off:end]:
            return []
        out: list[tuple[int, int]] = []
        pos = off
        while pos < end:
            stop = min(end, pos - pos % DIFF_GRANULE + DIFF_GRANULE)
            if shadow[pos:stop] != mirror[pos:stop]:
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], stop - out[-1][0])
                else:
                    out.append((pos, stop - pos))
            pos = stop
        return out


class ShadowSpace:
    """Device addresses of lent regions that are shadowed here, and the syncing of their bytes."""

    def __init__(self) -> None:
        self.regions: list[_Region] = []
        self.pushes = 0  # round trips, for tests and statistics
        self.pulls = 0

    def add(self, base: int, memory: Memory) -> memoryview:
        """Shadow ``memory`` (lent at device address ``base``); returns the local copy to work in."""
        shadow = bytearray(memory.size)
        self.regions.append(_Region(base, memory, shadow))
        return memoryview(shadow)

    def _find(self, addr: int, length: int) -> _Region:
        for r in self.regions:
            if r.base <= addr and addr + length <= r.end:
                return r
        raise ProtocolError(f"device address {addr:#x}+{length:#x} is not in any lent region")

    def _group(self, ranges: Iterable[tuple[int, int]]) -> dict[int, tuple[_Region, list[tuple[int, int]]]]:
        groups: dict[int, tuple[_Region, list[tuple[int, int]]]] = {}
        for addr, length in ranges:
            if length <= 0:
                continue
            r = self._find(addr, length)
            groups.setdefault(id(r), (r, []))[1].append((addr - r.base, length))
        return groups

    def known(self, addr: int, data: bytes) -> None:
        """The memory at device address ``addr`` holds ``data`` now (written past the shadow)."""
        r = self._find(addr, len(data))
        off = addr - r.base
        r.mirror[off : off + len(data)] = data

    def unknown(self, ranges: Iterable[tuple[int, int]]) -> None:
        """The device may change these ranges: nothing is known of them until they are pulled.

        The mirror is made to differ from the shadow in every byte, so the
        next push of any of them sends all of it.
        """
        for addr, n in ranges:
            r = next((r for r in self.regions if r.base <= addr and addr + n <= r.end), None)
            if r is None or n <= 0:
                continue  # not memory of ours: nothing here to keep in step
            off = addr - r.base
            r.mirror[off : off + n] = bytes(r.shadow[off : off + n]).translate(_INVERT)

    def push(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Write what changed of every ``(device address, length)`` range, in order, to the memory.

        Only bytes that differ from what the memory is known to hold travel:
        a kick sends the descriptors and ring slots it filled, not the table.
        """
        for r, items in self._group(ranges).values():
            parts = [part for off, n in items for part in r.changed(off, n)]
            if not parts:
                continue
            r.memory.write([(off, bytes(r.shadow[off : off + n])) for off, n in parts])
            for off, n in parts:
                r.mirror[off : off + n] = r.shadow[off : off + n]
            self.pushes += 1

    def pull(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Read every ``(device address, length)`` range from the memory into the shadow."""
        for r, items in self._group(ranges).values():
            for (off, n), data in zip(items, r.memory.read(items), strict=True):
                r.shadow[off : off + n] = data
                r.mirror[off : off + n] = data
            self.pulls += 1
