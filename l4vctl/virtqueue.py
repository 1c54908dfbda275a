"""The driver side of a split virtqueue.

Descriptors come from a free list; a request is a chain of readable and
writable buffers (or one indirect descriptor pointing at a table of them).
Publishing follows the design rules: descriptors first, then the ring slot,
then ``avail.idx`` with one 16-bit store; every field the device reads while
it runs is written through a typed memoryview.  Completions are collected by
polling ``used.idx`` or by waiting on the driver's IRQ; kicks and interrupts
are suppressed as the device and the driver ask (NO_NOTIFY / NO_INTERRUPT, or
the event indices when VIRTIO_F_EVENT_IDX was negotiated).
"""

from __future__ import annotations

import select
import time

from l4vctl import catalog as cat
from l4vctl.barrier import full_barrier
from l4vctl.errors import ProtocolError, TimeoutExpired
from l4vctl.formats.fast import codec
from l4vctl.formats.fast import ring as ring_geometry

_DESC = codec("vring_desc").struct
DESC_SIZE = _DESC.size
NEXT = cat.VRING_DESC_F_NEXT
WRITE = cat.VRING_DESC_F_WRITE
INDIRECT = cat.VRING_DESC_F_INDIRECT
#: Seconds to poll used.idx before sleeping on the IRQ.
COMPLETION_SPIN = 100e-6
#: Longest sleep on the IRQ before the device's status is looked at again.
SLEEP_SLICE = 0.05
#: poll() events on the device connection that mean it went away.
HANGUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


def sleep_on(irq, watch: int | None, timeout: float, check=None) -> bool:
    """Sleep until ``irq`` fires (consuming it) or ``timeout``; True if it fired.

    ``watch`` is the device connection's descriptor: a hang-up on it calls
    ``check``, which raises when the device went away.
    """
    p = select.poll()
    p.register(irq.fd, select.POLLIN)
    if watch is not None and watch >= 0:
        p.register(watch, HANGUP)
    fired = False
    for fd, _events in p.poll(max(0, int(timeout * 1000 + 0.999))):
        if fd == irq.fd:
            irq.drain()
            fired = True
        elif check is not None:
            check()
    return fired


class QueueFull(Exception):
    """Not enough free descriptors for the request."""


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did the index pass ``event`` going from old to new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class Virtqueue:
    """One split virtqueue configured by a :class:`~l4vctl.session.Session`."""

    def __init__(self, memory: memoryview, num: int, *, kick_irq, irq, event_idx: bool, indirect: bool,
                 index: int = 0, check=None, watch: int | None = None):  # fmt: skip
        geo = ring_geometry()
        lay = geo.simple_layout(num)
        self.index = index
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.kick_irq = kick_irq
        self.irq = irq
        self.check = check  # called when waits time out: raises if the device failed
        self.watch = watch  # the device connection's fd: a hang-up ends waits at once (check raises)
        self._poller = None
        self.desc = memory[lay["desc"] : lay["desc"] + geo.desc_size(num)]
        self.avail = memory[lay["avail"] : lay["avail"] + geo.avail_size(num)].cast("H")
        used = memory[lay["used"] : lay["used"] + geo.used_size(num)]
        self.used_hdr = used[0:4].cast("H")
        self.used_ring = used[4 : 4 + 8 * num].cast("I")
        self.avail_event = used[4 + 8 * num : 6 + 8 * num].cast("H")
        self._views = [self.desc, self.avail, used, self.used_hdr, self.used_ring, self.avail_event]
        self.free = list(range(num - 1, -1, -1))
        self.tokens: list = [None] * num
        self.chains: list = [None] * num
        self.avail_idx = self.avail[1]
        self.last_used = self.used_hdr[1]
        self.kicked_idx = self.avail_idx
        self.kicks = 0
        self.in_flight = 0

    # -- submitting -------------------------------------------------------------------

    def add(self, bufs, token) -> int:
        """Queue a chain of ``(addr, len, device_writes)`` buffers; returns its head."""
        n = len(bufs)
        free = self.free
        if n > len(free) or n == 0:
            raise QueueFull(f"queue {self.index}: {n} descriptors wanted, {len(free)} free")
        descs = [free.pop() for _ in range(n)]
        pack = _DESC.pack_into
        table = self.desc
        last = n - 1
        for i, (addr, length, write) in enumerate(bufs):
            flags = WRITE if write else 0
            if i < last:
                pack(table, descs[i] * DESC_SIZE, addr, length, flags | NEXT, descs[i + 1])
            else:
                pack(table, descs[i] * DESC_SIZE, addr, length, flags, 0)
        return self._offer(descs, token)

    def add_indirect(self, table_view: memoryview, table_addr: int, bufs, token) -> int:
        """Queue a request as one indirect descriptor; ``table_view`` is driver memory
        at device address ``table_addr`` with room for ``len(bufs)`` descriptors."""
        n = len(bufs)
        if not self.free:
            raise QueueFull(f"queue {self.index}: no free descriptor")
        pack = _DESC.pack_into
        last = n - 1
        for i, (addr, length, write) in enumerate(bufs):
            flags = WRITE if write else 0
            if i < last:
                pack(table_view, i * DESC_SIZE, addr, length, flags | NEXT, i + 1)
            else:
                pack(table_view, i * DESC_SIZE, addr, length, flags, 0)
        d = self.free.pop()
        pack(self.desc, d * DESC_SIZE, table_addr, n * DESC_SIZE, INDIRECT, 0)
        return self._offer([d], token)

    def _offer(self, descs: list[int], token) -> int:
        head = descs[0]
        self.chains[head] = descs
        self.tokens[head] = token
        self.avail[2 + self.avail_idx % self.num] = head  # the slot, before the index
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.in_flight += 1
        return head

    def kick(self) -> bool:
        """Publish new buffers (one store of avail.idx) and notify the device if it wants."""
        new = self.avail_idx
        self.avail[1] = new
        old = self.kicked_idx
        if new == old:
            return False
        self.kicked_idx = new
        full_barrier()  # avail.idx is visible before the device's wish is read
        if self.event_idx:
            wanted = need_event(self.avail_event[0], new, old)
        else:
            wanted = not self.used_hdr[0] & cat.VRING_USED_F_NO_NOTIFY
        if wanted:
            self.kick_irq.trigger()
            self.kicks += 1
        return wanted

    # -- completing ---------------------------------------------------------------------

    def reap(self) -> list[tuple[object, int]]:
        """Completed requests as ``(token, bytes written)``, oldest first."""
        used_idx = self.used_hdr[1]
        last = self.last_used
        if used_idx == last:
            return []
        if (used_idx - last) & 0xFFFF > self.in_flight:
            raise ProtocolError(
                f"queue {self.index}: the device moved used.idx from {last} to {used_idx},"
                f" past the {self.in_flight} requests in flight"
            )
        out = []
        ring = self.used_ring
        num = self.num
        tokens = self.tokens
        chains = self.chains
        free = self.free
        while last != used_idx:
            slot = (last % num) * 2
            head = ring[slot]
            if head >= num or chains[head] is None:
                raise ProtocolError(f"queue {self.index}: the device completed head {head}, which is not in flight")
            out.append((tokens[head], ring[slot + 1]))
            tokens[head] = None
            free.extend(chains[head])
            chains[head] = None
            last = (last + 1) & 0xFFFF
        self.last_used = last
        self.in_flight -= len(out)
        if self.event_idx:
            self.avail[2 + num] = last  # used_event: interrupt at the next completion
        return out

    def interrupts(self, on: bool) -> None:
        """Ask the device for interrupts (on) or to skip them while we poll (off)."""
        if self.event_idx:
            self.avail[2 + self.num] = self.last_used if on else (self.last_used + 0x7FFF) & 0xFFFF
        else:
            self.avail[0] = 0 if on else cat.VRING_AVAIL_F_NO_INTERRUPT

    def wait(self, timeout: float) -> list[tuple[object, int]]:
        """At least one completion, polling briefly and then sleeping on the IRQ."""
        done = self.reap()
        if done:
            return done
        start = time.perf_counter()
        spin_until = start + COMPLETION_SPIN
        deadline = start + timeout
        used = self.used_hdr
        last = self.last_used
        while time.perf_counter() < spin_until:
            if used[1] != last:
                return self.reap()
        while True:
            self.interrupts(True)
            full_barrier()
            done = self.reap()  # anything that came before interrupts were on
            if done:
                return done
            left = deadline - time.perf_counter()
            if left <= 0:
                if self.check is not None:
                    self.check()
                raise TimeoutExpired(
                    f"queue {self.index}: no completion within {timeout:g} s ({self.in_flight} requests in flight)"
                )
            self.sleep(min(left, SLEEP_SLICE))
            done = self.reap()
            if done:
                return done
            if self.check is not None:
                self.check()

    def sleep(self, timeout: float) -> None:
        """Sleep until the IRQ fires (consuming it), the device connection hangs up, or ``timeout``.

        One poll() covers both descriptors.  A hang-up calls ``check``, which
        raises (the device went away); the connection is not watched after a
        hang-up that ``check`` did not confirm, so that it cannot spin.
        """
        p = self._poller
        if p is None:
            p = self._poller = select.poll()
            p.register(self.irq.fd, select.POLLIN)
            if self.watch is not None and self.watch >= 0:
                p.register(self.watch, HANGUP)
        ms = max(0, int(timeout * 1000 + 0.999))
        irq_fd = self.irq.fd
        for fd, _events in p.poll(ms):
            if fd == irq_fd:
                self.irq.drain()
            else:
                if self.check is not None:
                    self.check()
                p.unregister(fd)
                self.watch = None

    def close(self) -> None:
        self._poller = None
        for view in reversed(self._views):
            view.release()
        self._views = []
