"""A virtio-console driver for port 0: send bytes, receive bytes."""

from __future__ import annotations

import select
import time
from typing import TYPE_CHECKING

from l4vctl import catalog as cat
from l4vctl.drivers.base import Driver

if TYPE_CHECKING:
    from l4vctl.session import Session

RX, TX = cat.CONSOLE_RX_QUEUE, cat.CONSOLE_TX_QUEUE


class ConsoleDriver(Driver):
    """Port 0 of a console: bytes out on the transmit queue, bytes in on the receive queue."""

    CLASS = "console"

    def __init__(self, session: Session, *, buffers: int = 16, size: int = 4096, rx_buffers: int | None = None,
                 rx_size: int = 256) -> None:  # fmt: skip
        """``rx_buffers`` (default: as many as the receive queue holds) of ``rx_size`` bytes are
        posted for input: a console may use one per byte of a burst (L4Re's cons does, and
        fails when it runs out), so the queue is kept full."""
        super().__init__(session)
        self._open_duplex(RX, TX, buffers, size, "console", rx_buffers, rx_size)

    def fileno(self) -> int:
        """The driver IRQ: readable when the device has something for us."""
        irq = self.session.driver_irq
        assert irq is not None, "a driver runs on an attached session"
        return irq.fd

    def send(self, data: bytes) -> None:
        """Transmit all of ``data`` (waits until the device has taken it)."""
        view = memoryview(data)
        pool = self.tx_pool
        while view or self.tx.in_flight:
            while view and pool.free:
                i = pool.take()
                n = min(pool.size, len(view))
                pool.views[i][:n] = view[:n]
                self.tx.add([(pool.addrs[i], n, False)], i)
                view = view[n:]
            self.tx.kick()
            for i, _used in self.tx.wait(self.timeout):
                pool.give(i)

    def poll(self) -> bytes:
        """Whatever input has arrived (b"" if none); the buffers go back to the device."""
        out = bytearray()
        pool = self.rx_pool
        for i, used in self.rx.reap():
            out += pool.views[i][: min(used, pool.size)]
            self.rx.add([(pool.addrs[i], pool.size, True)], i)
        if out:
            self.rx.kick()
        for i, _used in self.tx.reap():
            self.tx_pool.give(i)
        return bytes(out)

    def receive(self, timeout: float) -> bytes:
        """Input that arrives within ``timeout`` seconds (b"" if none)."""
        deadline = time.monotonic() + timeout
        while True:
            self.rx.interrupts(True)
            data = self.poll()
            if data:
                return data
            left = deadline - time.monotonic()
            if left <= 0:
                self.session.check_device()
                return b""
            self.look_now_and_then()
            self.session.wait_irq(min(left, 0.05))

    def wait_readable(self, fds, timeout: float) -> list:
        """select() over the driver IRQ and ``fds``."""
        r, _, _ = select.select([self.fileno(), *fds], [], [], timeout)
        return r
