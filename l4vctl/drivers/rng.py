"""A virtio-rng driver: entropy from the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

from l4vctl.drivers.base import Driver
from l4vctl.drivers.buffers import BufferPool
from l4vctl.errors import ProtocolError, UsageError

if TYPE_CHECKING:
    from l4vctl.session import Session
    from l4vctl.virtqueue import Virtqueue


class RngDriver(Driver):
    """Entropy from queue 0 of an entropy device, ``depth`` buffers of ``chunk`` bytes in flight."""

    CLASS = "rng"

    def __init__(self, session: Session, *, chunk: int = 4096, depth: int = 8) -> None:
        super().__init__(session)
        # each request's token: (buffer index, bytes asked for)
        self.vq: Virtqueue[tuple[int, int]] = session.virtqueue(0)
        self.depth = max(1, min(depth, self.vq.num))
        self.pool = BufferPool(session, self.depth, chunk, "l4vctl-rng-buffers")

    def read(self, nbytes: int, progress=None) -> bytes:
        """``nbytes`` of entropy."""
        if nbytes < 0:
            raise UsageError("the byte count must not be negative")
        out = bytearray()
        pool, vq = self.pool, self.vq
        pending = 0  # bytes asked for and not yet returned
        while len(out) < nbytes:
            while pool.free and len(out) + pending < nbytes:
                i = pool.take()
                want = min(pool.size, nbytes - len(out) - pending)
                vq.add([(pool.addrs[i], want, True)], (i, want))
                pending += want
            vq.kick()
            for (i, want), used in vq.wait(self.timeout):
                pending -= want
                pool.give(i)
                if used == 0 or used > want:
                    raise ProtocolError(f"the entropy device returned {used} bytes for a {want}-byte buffer")
                out += pool.views[i][:used]
                if progress is not None:
                    progress(used)
        return bytes(out[:nbytes])
