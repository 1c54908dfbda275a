"""virtio-rng model: writable buffers filled from the OS entropy source.

As L4Re's rng server does, the device fills the first buffer of each chain
completely and reports that buffer's length; it does not follow NEXT.
With ``record=FILE`` every byte handed out is also appended to FILE, in the
order the buffers were completed, so a test can check what a driver read.
"""

from __future__ import annotations

import os

from l4vctl import catalog as cat
from l4vctl.emulator.models import Option
from l4vctl.emulator.models.base import Model
from l4vctl.emulator.ring import BadChain


class RngModel(Model):
    """An entropy source: the first buffer of each chain filled from /dev/urandom."""

    KIND = "rng"
    DEVICE_ID = cat.DEVICE_ID_RNG
    DEFAULT_QUEUES = 1
    DEFAULT_NUM_MAX = 128
    FEATURES = frozenset({cat.INDIRECT_DESC_BIT})
    OPTIONS = (Option("record", str, None, "append every byte handed out to this file (created if missing)"),)

    def __init__(self, options: dict):
        super().__init__(options)
        self.record = -1
        if options.get("record"):
            try:
                self.record = os.open(options["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise ValueError(f"cannot open record file {options['record']}: {exc.strerror}") from None
        self.fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)

    def process(self, queue, ring) -> None:
        """Fill the first buffer of every available chain; BadChain if it lies in read-only memory."""
        for _ in range(ring.available()):
            head = ring.pop()
            first = ring.chain(head)[0]
            if not first.writable:
                raise BadChain(f"queue {queue.index}: the entropy buffer lies in read-only memory")
            filled = 0
            view = first.view
            while filled < len(view):
                filled += os.readv(self.fd, [view[filled:]])
            if self.record >= 0:
                os.write(self.record, view[:filled])
            ring.complete(head, filled)

    def close(self) -> None:
        """Close /dev/urandom and the record file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.record >= 0:
            os.close(self.record)
            self.record = -1
