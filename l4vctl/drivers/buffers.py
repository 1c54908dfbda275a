"""Equal-sized buffers in lent memory, for drivers that post many of them."""

from __future__ import annotations


class BufferPool:
    """``count`` buffers of ``size`` bytes in one dataspace registered with the device."""

    def __init__(self, session, count: int, size: int, name: str = "l4vctl-buffers"):
        self.size = size
        mem, addr = session.alloc(count * size, name)
        self.views = [mem[i * size : (i + 1) * size] for i in range(count)]
        self.addrs = [addr + i * size for i in range(count)]
        self.free = list(range(count - 1, -1, -1))

    def take(self) -> int:
        """Index of a free buffer, now in use (IndexError if none is free)."""
        return self.free.pop()

    def give(self, index: int) -> None:
        """Return buffer ``index`` to the free ones."""
        self.free.append(index)
