"""The base of the device-class drivers."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from l4vctl.drivers import require_class
from l4vctl.drivers.buffers import BufferPool

if TYPE_CHECKING:
    from l4vctl.session import Session
    from l4vctl.virtqueue import Virtqueue


class Driver:
    """A driver for one device class over a Session whose handshake is done.

    A subclass names its class in ``CLASS``; constructing it refuses a device
    of another class before any request is sent, and keeps the session and
    the timeout of every wait (the session's unless given).
    """

    CLASS: ClassVar[str] = ""

    def __init__(self, session: Session, timeout: float | None = None) -> None:
        require_class(session, self.CLASS)
        self.session = session
        self.timeout: float = session.timeout if timeout is None else timeout

    #: Seconds between looks at the device's state while a receive waits.
    CHECK_EVERY = 0.5
    _checked = 0.0

    def look_now_and_then(self) -> None:
        """Check the device (state, connection) if CHECK_EVERY seconds passed: one that died says nothing."""
        import time

        now = time.monotonic()
        if now - self._checked >= self.CHECK_EVERY:
            self._checked = now
            self.session.check_device()

    def has_feature(self, bit: int) -> bool:
        """Whether feature ``bit`` was negotiated."""
        return bit in self.session.negotiated

    def _open_duplex(self, rx: int, tx: int, buffers: int, size: int, name: str,
                     rx_buffers: int | None = None, rx_size: int | None = None) -> None:  # fmt: skip
        """Set up a receive and a transmit queue, each with a pool of ``size``-byte buffers.

        The pools hold as many buffers as the smaller queue takes (``buffers``
        at most; ``rx_buffers`` and ``rx_size`` for the receive pool when
        given); every receive buffer is posted to the device at once.
        """
        session = self.session
        # each request's token is the index of its buffer in the queue's pool
        self.rx: Virtqueue[int] = session.virtqueue(rx)
        self.tx: Virtqueue[int] = session.virtqueue(tx)
        n = max(1, min(buffers, self.rx.num, self.tx.num))
        n_rx = n if rx_buffers is None else max(1, min(rx_buffers, self.rx.num))
        size_rx = size if rx_size is None else rx_size
        self.rx_pool = BufferPool(session, n_rx, size_rx, f"l4vctl-{name}-rx")
        self.tx_pool = BufferPool(session, n, size, f"l4vctl-{name}-tx")
        while self.rx_pool.free:
            i = self.rx_pool.take()
            self.rx.add([(self.rx_pool.addrs[i], size_rx, True)], i)
        self.rx.kick()
