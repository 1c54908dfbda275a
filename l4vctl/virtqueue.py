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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from l4vctl import catalog as cat
from l4vctl.barrier import full_barrier
from l4vctl.errors import ProtocolError, TimeoutExpired
from l4vctl.formats.fast import SplitRingViews
from l4vctl.formats.fast import ring as ring_geometry
from l4vctl.waiting import Spin
from l4vctl.wire import HANGUP

if TYPE_CHECKING:
    from l4vctl._session.shadow import ShadowSpace

_DESC = ring_geometry().desc.struct  # packs in Descriptor field order
DESC_SIZE = _DESC.size
NEXT = cat.VRING_DESC_F_NEXT
WRITE = cat.VRING_DESC_F_WRITE
INDIRECT = cat.VRING_DESC_F_INDIRECT
#: Longest poll of used.idx before sleeping on the IRQ (see l4vctl.waiting).
COMPLETION_SPIN = 100e-6
#: Longest sleep on the IRQ before the device's status is looked at again.
SLEEP_SLICE = 0.05

#: What the driver hands in with a request and gets back with its completion.
T = TypeVar("T")


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


class Virtqueue(Generic[T]):
    """One split virtqueue configured by a :class:`~l4vctl.session.Session`.

    ``memory`` holds the rings in the simple layout of L4Re drivers; they
    are reached through :attr:`views` (typed views derived from the ring
    schemas).  ``desc``, ``avail`` and ``used_hdr`` are the descriptor
    table's bytes, the available ring's words and the used ring header's
    words, for inspection.  Each request carries a token of the driver's
    (type ``T``), handed back with its completion.
    """

    def __init__(self, memory: memoryview, num: int, *, kick_irq, irq, event_idx: bool, indirect: bool,
                 index: int = 0, check=None, watch: int | None = None, dma: ShadowSpace | None = None,
                 ring_addrs: tuple[int, int, int] = (0, 0, 0), peer: int | None = None):  # fmt: skip
        lay = ring_geometry().simple_layout(num)
        self.index = index
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.kick_irq = kick_irq
        self.irq = irq
        self.check = check  # called when waits time out: raises if the device failed
        self.watch = watch  # the device connection's fd: a hang-up ends waits at once (check raises)
        self._poller: select.poll | None = None
        #: How long wait() polls used.idx; ``peer`` is the device's process, if known
        self.spin = Spin(COMPLETION_SPIN, peer)
        views: SplitRingViews = ring_geometry().views(memory, num, lay["desc"], lay["avail"], lay["used"])
        self.views = views
        self.desc = views.desc
        self.avail = views.avail
        self.used_hdr = views.used_hdr
        self.avail_event = views.avail_event
        # the fields the hot paths touch, bound once (each store is one store)
        self._avail_flags = views.avail_flags
        self._avail_idx = views.avail_idx
        self._avail_ring = views.avail_ring
        self._used_event = views.used_event
        self._used_flags = views.used_flags
        self._used_idx = views.used_idx
        self._used_id = views.used_id
        self._used_len = views.used_len
        self.free = list(range(num - 1, -1, -1))
        # by head: the request's token (a T) while it is in flight, else None
        self.tokens: list[Any] = [None] * num
        self.chains: list[list[int] | None] = [None] * num
        self.avail_idx = views.avail_idx[0]
        self.last_used = views.used_idx[0]
        self.kicked_idx = self.avail_idx
        self.kicks = 0
        self.in_flight = 0
        # memory that is not mapped here: ``memory`` is a shadow, synced through ``dma`` (see _session.shadow)
        self._dma = dma
        if dma is not None:
            self._dma_setup(num, *ring_addrs)

    def _dma_setup(self, num: int, desc: int, avail: int, used: int) -> None:
        """The ranges (device addresses) that move between the shadow and the memory, from the ring schema."""
        g = ring_geometry()
        offs = g.offsets(num)
        idx, ring = offs["avail.idx"], offs["avail.ring"]
        flags = (avail, idx)  # avail.flags
        rest = (avail + ring, g.avail_size(num) - ring)  # avail.ring and used_event
        self._ring_push = [(desc, g.desc_size(num)), flags, rest]
        self._idx_push = [(avail + idx, ring - idx)]  # avail.idx, last
        self._hdr_push = [flags, (avail + offs["avail.used_event"], g.avail_size(num) - offs["avail.used_event"])]
        self._used_pull = [(used, g.used_size(num))]
        # what a kick needs to know of the used ring: its flags (NO_NOTIFY) and avail_event
        ring_at = offs["used.ring"]
        self._wish_pull = [
            (used, ring_at),
            (used + offs["used.avail_event"], g.used_size(num) - offs["used.avail_event"]),
        ]
        self._used_ring_at = used + ring_at
        self._used_elem = g.used_elem.size
        self._bufs: list[Sequence[tuple[int, int, bool]] | None] = [None] * num
        self._to_push: list[tuple[int, int]] = []
        self._to_pull: list[tuple[int, int]] = []

    def _note(self, head: int, bufs: Sequence[tuple[int, int, bool]], table: tuple[int, int] | None = None) -> None:
        """Remember a request's buffers: the device-readable ones go out with the next kick."""
        self._bufs[head] = bufs
        push = self._to_push
        if table is not None:
            push.append(table)
        push.extend((addr, length) for addr, length, write in bufs if not write)
        # until its completion is pulled, what the device may write is not known here
        self._dma.unknown([(addr, length) for addr, length, write in bufs if write])  # type: ignore[union-attr]

    # -- submitting -------------------------------------------------------------------

    def add(self, bufs: Sequence[tuple[int, int, bool]], token: T) -> int:
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
        head = self._offer(descs, token)
        if self._dma is not None:
            self._note(head, bufs)
        return head

    def add_indirect(
        self, table_view: memoryview, table_addr: int, bufs: Sequence[tuple[int, int, bool]], token: T
    ) -> int:
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
        head = self._offer([d], token)
        if self._dma is not None:
            self._note(head, bufs, (table_addr, n * DESC_SIZE))
        return head

    def _offer(self, descs: list[int], token: T) -> int:
        head = descs[0]
        self.chains[head] = descs
        self.tokens[head] = token
        self._avail_ring[self.avail_idx % self.num] = head  # the slot, before the index
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.in_flight += 1
        return head

    def kick(self) -> bool:
        """Publish new buffers (one store of avail.idx) and notify the device if it wants."""
        new = self.avail_idx
        self._avail_idx[0] = new
        old = self.kicked_idx
        if new == old:
            return False
        self.kicked_idx = new
        dma = self._dma
        if dma is not None:
            # request data, then descriptors and ring, then the index; then what the device wishes
            dma.push(self._to_push + self._ring_push + self._idx_push)
            self._to_push = []
            dma.pull(self._wish_pull)
        full_barrier()  # avail.idx is visible before the device's wish is read
        if self.event_idx:
            wanted = need_event(self.avail_event[0], new, old)
        else:
            wanted = not self._used_flags[0] & cat.VRING_USED_F_NO_NOTIFY
        if wanted:
            self.kick_irq.trigger()
            self.kicks += 1
        return wanted

    # -- completing ---------------------------------------------------------------------

    def reap(self) -> list[tuple[T, int]]:
        """Completed requests as ``(token, bytes written)``, oldest first."""
        dma = self._dma
        if dma is not None:
            dma.pull(self._new_used())
        used_idx = self._used_idx[0]
        last = self.last_used
        if used_idx == last:
            return []
        if (used_idx - last) & 0xFFFF > self.in_flight:
            raise ProtocolError(
                f"queue {self.index}: the device moved used.idx from {last} to {used_idx},"
                f" past the {self.in_flight} requests in flight"
            )
        out: list[tuple[T, int]] = []
        ids = self._used_id
        lens = self._used_len
        num = self.num
        tokens = self.tokens
        chains = self.chains
        free = self.free
        while last != used_idx:
            slot = last % num
            head = ids[slot]
            chain = chains[head] if head < num else None
            if chain is None:
                raise ProtocolError(f"queue {self.index}: the device completed head {head}, which is not in flight")
            out.append((tokens[head], lens[slot]))
            tokens[head] = None
            free.extend(chain)
            chains[head] = None
            if dma is not None:
                written = self._bufs[head] or ()
                self._bufs[head] = None
                # whole writable buffers: devices do not all report the bytes they wrote
                # (a block server may say 0 and still have written data and status)
                self._to_pull.extend((addr, length) for addr, length, write in written if write)
            last = (last + 1) & 0xFFFF
        self.last_used = last
        self.in_flight -= len(out)
        if dma is not None and self._to_pull:
            dma.pull(self._to_pull)  # what the device wrote, before the driver looks at it
            self._to_pull = []
        if self.event_idx:
            self._used_event[0] = last  # interrupt at the next completion
            if dma is not None:
                dma.push(self._hdr_push)
        return out

    def _new_used(self) -> list[tuple[int, int]]:
        """The used ring's header and the entries that can be new (one per request in flight)."""
        out = [self._wish_pull[0]]
        n = min(self.in_flight, self.num)
        if n:
            first = self.last_used % self.num
            run = min(n, self.num - first)
            out.append((self._used_ring_at + first * self._used_elem, run * self._used_elem))
            if run < n:  # the entries wrap around the end of the ring
                out.append((self._used_ring_at, (n - run) * self._used_elem))
        return out

    def interrupts(self, on: bool) -> None:
        """Ask the device for interrupts (on) or to skip them while we poll (off)."""
        if self.event_idx:
            self._used_event[0] = self.last_used if on else (self.last_used + 0x7FFF) & 0xFFFF
        else:
            self._avail_flags[0] = 0 if on else cat.VRING_AVAIL_F_NO_INTERRUPT
        if self._dma is not None:
            self._dma.push(self._hdr_push)

    def wait(self, timeout: float) -> list[tuple[T, int]]:
        """At least one completion, polling briefly and then sleeping on the IRQ."""
        done = self.reap()
        if done:
            return done
        start = time.perf_counter()
        if self._dma is None:  # polling a shadow is pointless: it changes only when reap() pulls
            used_idx = self._used_idx
            last = self.last_used
            if self.spin.run(lambda: True if used_idx[0] != last else None, start):
                return self.reap()
        done = self._sleep_for_completions(start + timeout, timeout)
        self.spin.observe(time.perf_counter() - start)
        return done

    def _sleep_for_completions(self, deadline: float, timeout: float) -> list[tuple[T, int]]:
        """Completions, sleeping on the IRQ with interrupts on until ``deadline``."""
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
        """Release the ring views (the ring memory can then be unmapped)."""
        self._poller = None
        self.views.release()  # every bound view with them
