"""A virtio-console driver for port 0: send bytes, receive bytes."""

from __future__ import annotations

import select
import time

from l4vctl.drivers import require_class
from l4vctl.drivers.buffers import BufferPool

RX, TX = 0, 1


class ConsoleDriver:
    def __init__(self, session, *, buffers: int = 16, size: int = 4096):
        require_class(session, "console")
        self.session = session
        self.timeout = session.timeout
        self.rx = session.virtqueue(RX)
        self.tx = session.virtqueue(TX)
        n = max(1, min(buffers, self.rx.num, self.tx.num))
        self.rx_pool = BufferPool(session, n, size, "l4vctl-console-rx")
        self.tx_pool = BufferPool(session, n, size, "l4vctl-console-tx")
        while self.rx_pool.free:
            i = self.rx_pool.take()
            self.rx.add([(self.rx_pool.addrs[i], size, True)], i)
        self.rx.kick()

    def fileno(self) -> int:
        """The driver IRQ: readable when the device has something for us."""
        return self.session.driver_irq.fd

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
            self.session.wait_irq(min(left, 0.05))

    def wait_readable(self, fds, timeout: float) -> list:
        """select() over the driver IRQ and ``fds``."""
        r, _, _ = select.select([self.fileno(), *fds], [], [], timeout)
        return r
