"""virtio-console model: port 0 bridged to stdio, files, a pty, or an echo.

Queue 0 (receiveq) carries input to the driver, queue 1 (transmitq) its
output.  ``io`` chooses the other end: ``stdio`` (the emulator's stdin and
stdout), ``pty`` (a new pseudo terminal; its name is logged), ``echo``
(output comes back as input), ``null``; ``output=FILE`` appends output to a
file and ``input=FILE`` feeds a file's bytes as input.
"""

from __future__ import annotations

import os
from typing import ClassVar

from l4vctl import catalog as cat
from l4vctl.emulator import log
from l4vctl.emulator.models import Option, Profile
from l4vctl.emulator.models.base import Model
from l4vctl.emulator.ring import BadChain
from l4vctl.parsing import parse_bool, parse_int

RX, TX = cat.CONSOLE_RX_QUEUE, cat.CONSOLE_TX_QUEUE
PENDING_MAX = 1 << 20
#: Bytes of one transmit chain the console copies out (the rest of a longer chain is dropped).
MAX_TX_CHAIN = 1 << 20


def parse_io(text) -> str:
    """The other end of port 0 ``text`` names (stdio, pty, echo or null); ValueError otherwise."""
    if text not in ("stdio", "pty", "echo", "null"):
        raise ValueError(f"{text!r} is not one of stdio, pty, echo, null")
    return text


class ConsoleModel(Model):
    """A one-port console whose other end the ``io``, ``output`` and ``input`` options choose."""

    KIND = "console"
    DEVICE_ID = cat.DEVICE_ID_CONSOLE
    DEFAULT_QUEUES = 2  # port 0: receive 0, transmit 1
    MIN_QUEUES = 2
    DEFAULT_NUM_MAX = 128
    PROFILES: ClassVar[dict[str, Profile]] = {
        # a virtio port of cons: no CONSOLE_F_SIZE, 32 zero bytes of config, queue entries kept at a reset
        "l4re-cons": Profile(
            "l4re-cons",
            options={"cols": "0", "rows": "0", "num_max": "256"},
            config_size=32,
            keep_queue_entries=True,
        ),
    }
    OPTIONS = (
        Option("cols", parse_int, 80, "columns (VIRTIO_CONSOLE_F_SIZE; cols and rows 0: not offered)"),
        Option("rows", parse_int, 25, "rows (VIRTIO_CONSOLE_F_SIZE; cols and rows 0: not offered)"),
        Option(
            "io",
            parse_io,
            None,
            "other end of port 0: stdio, pty, echo or null (default: stdio for 'emulate', echo for emu:)",
        ),
        Option("pty", parse_bool, False, "same as --io pty: port 0 is a new pseudo terminal"),
        Option("output", str, None, "append the driver's output to this file"),
        Option("input", str, None, "feed this file to the driver as input"),
    )

    def __init__(self, options: dict):
        super().__init__(options)
        if options["pty"]:
            if options["io"] not in (None, "pty"):
                raise ValueError("--pty and --io exclude each other")
            options["io"] = "pty"
        self.io = options["io"] or "echo"
        self.in_fd = self.out_fd = -1
        self.pty_slave: str | None = None
        self.file_in = -1
        self.pending = bytearray()
        self.transmitted = 0
        if self.io == "stdio":
            self.out_fd = os.dup(1)
            try:
                self.in_fd = os.dup(0)
                os.set_blocking(self.in_fd, False)
            except OSError as exc:  # no usable stdin (closed, or a file that refuses O_NONBLOCK)
                log.info("console input from stdin unavailable: %s", exc.strerror)
                if self.in_fd >= 0:
                    os.close(self.in_fd)
                self.in_fd = -1
        elif self.io == "pty":
            master, slave = os.openpty()
            self.pty_slave = os.ttyname(slave)
            self._slave_fd = slave  # kept open so the pty survives until a terminal attaches
            os.set_blocking(master, False)
            self.in_fd = self.out_fd = master
            log.warning("console port 0 is the pty %s", self.pty_slave)
        if options["output"]:
            try:
                self.out_fd = os.open(options["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ValueError(f"cannot open {options['output']}: {exc.strerror}") from None
        if options["input"]:
            try:
                self.file_in = os.open(options["input"], os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise ValueError(f"cannot open {options['input']}: {exc.strerror}") from None

    def features(self) -> set[int]:
        """CONSOLE_F_SIZE, unless the cols and rows options are both 0."""
        bits = self.base_features()
        if self.options["cols"] or self.options["rows"]:
            bits.add(cat.CONSOLE_F_SIZE)
        return bits

    def config(self) -> dict:
        """Columns and rows.  max_nr_ports stays 0: it is valid only with MULTIPORT, which is not offered."""
        return {"cols": self.options["cols"], "rows": self.options["rows"]}

    def required_queues(self) -> list[int]:
        """Port 0's receive and transmit queues."""
        return [RX, TX]

    def describe(self) -> str:
        """The console and its other end (the pty's name for a pty)."""
        return f"console ({self.pty_slave or self.io})"

    # -- input side ---------------------------------------------------------------------

    def watch(self) -> list:
        """The input fd of stdio or the pty, if there is one."""
        if self.in_fd >= 0 and self.io in ("stdio", "pty"):
            return [(self.in_fd, self._input_ready)]
        return []

    def _input_ready(self) -> None:
        try:
            data = os.read(self.in_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stop_input()
            return
        self._queue_input(data)
        self.deliver()

    def _stop_input(self) -> None:
        server = getattr(self.device, "server", None)
        if server is not None:
            server.unwatch(self.in_fd)

    def _queue_input(self, data: bytes) -> None:
        room = PENDING_MAX - len(self.pending)
        if len(data) > room:
            log.warning("console input buffer full: %d bytes dropped", len(data) - room)
            data = data[:room]
        self.pending += data

    def deliver(self) -> None:
        """Move pending input (and file input) into the driver's receive buffers."""
        dev = self.device
        if dev is None or len(dev.queues) <= RX:
            return
        q = dev.queues[RX]
        ring = q.ring
        if ring is None:
            return
        while ring.available() and (self.pending or self.file_in >= 0):
            head = ring.pop()
            segs = ring.chain(head)
            written = 0
            for seg in segs:
                if not seg.writable:
                    raise BadChain("queue 0: a receive buffer lies in read-only memory")
                view = seg.view
                if self.pending:
                    n = min(len(view), len(self.pending))
                    view[:n] = self.pending[:n]
                    del self.pending[:n]
                elif self.file_in >= 0:
                    n = os.readv(self.file_in, [view])
                    if n == 0:
                        os.close(self.file_in)
                        self.file_in = -1
                else:
                    n = 0
                written += n
                if n < len(view):
                    break
            if written == 0:
                ring.rewind()
                break
            ring.complete(head, written)
        ring.publish()

    # -- queues -----------------------------------------------------------------------

    def process(self, queue, ring) -> None:
        """Transmitq: write out (or echo) the output; receiveq: deliver pending input; others are consumed."""
        if queue.index == TX:
            for _ in range(ring.available()):
                head = ring.pop()
                segs = ring.chain(head)
                total = sum(len(s) for s in segs)
                if total > MAX_TX_CHAIN:  # only the head of a huge chain is copied
                    log.warning("queue %d: a transmit chain of %d bytes: only the first %d are output", queue.index,
                                total, MAX_TX_CHAIN)  # fmt: skip
                data = bytearray(min(total, MAX_TX_CHAIN))
                pos = 0
                for seg in segs:
                    n = min(len(seg), len(data) - pos)
                    data[pos : pos + n] = seg.view[:n]
                    pos += n
                    if pos == len(data):
                        break
                out = bytes(data)
                self.transmitted += len(out)
                if self.io == "echo":
                    self._queue_input(out)
                if self.out_fd >= 0 and out:
                    self._write_out(out)
                ring.complete(head, 0)
            if self.io == "echo":
                self.deliver()
        elif queue.index == RX:
            self.deliver()
        else:  # control queues of a multiport console are not emulated: consume
            super().process(queue, ring)

    def _write_out(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.out_fd, view)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.warning("console output failed: %s (output dropped)", exc.strerror)
                return
            view = view[n:]

    def close(self) -> None:
        """Close the input, output and pty descriptors."""
        fds = {self.in_fd, self.out_fd, self.file_in, getattr(self, "_slave_fd", -1)}
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.in_fd = self.out_fd = self.file_in = -1
