"""The device side of a split virtqueue, with every bound checked.

L4Re's request processor trusts the driver more than an emulator should:
it does not range-check head indices or the distance avail.idx moves, and
its generic walker has no limit on chain length.  This walker checks all of
it (and logs when it rejects something L4Re would have let through):

* avail.idx may move ahead of the device by at most the queue size;
* a head index must be below the queue size;
* an indirect table must lie in one registered region and hold at least one
  descriptor, may only appear on the head and only if INDIRECT_DESC was
  negotiated, and may not contain further indirect descriptors;
* every ``next`` must be inside its table, and a chain may not be longer
  than its table (a cyclic chain ends there);
* every buffer must lie inside one registered region; buffers the device
  writes must lie in a region registered writable.

A violation raises :class:`BadChain`; the device then enters
DEVICE_NEEDS_RESET with a config interrupt (protocol notes §5.1, §5.5).
"""

from __future__ import annotations

from functools import partial

from l4vctl import catalog as cat
from l4vctl.barrier import full_barrier
from l4vctl.emulator import log
from l4vctl.formats.fast import ring as ring_geometry

_DESC = ring_geometry().desc.struct  # unpacks in Descriptor field order: addr, len, flags, next
DESC_SIZE = _DESC.size
NEXT = cat.VRING_DESC_F_NEXT
WRITE = cat.VRING_DESC_F_WRITE
INDIRECT = cat.VRING_DESC_F_INDIRECT
#: In what :meth:`DeviceRing.walk` says of a buffer (beside its WRITE flag): it lies in memory the device may write.
MAY_WRITE = 0x10000


class BadChain(Exception):
    """A descriptor chain (or the ring itself) that the device must not process."""


class Segment:
    """One buffer of a chain: its bytes, the descriptor's WRITE flag and whether
    the device may write it (the buffer lies in a writable region)."""

    __slots__ = ("view", "write_flag", "writable")

    def __init__(self, view: memoryview, write_flag: bool, writable: bool):
        self.view = view
        self.write_flag = write_flag
        self.writable = writable

    def __len__(self) -> int:
        return len(self.view)


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: has the index passed ``event`` going from old to new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class DeviceRing:
    """Fetch chains from an enabled queue and publish completions.

    The queue's typed ring views (:class:`~l4vctl.formats.fast.SplitRingViews`)
    are bound here once; every field is read and written through them.
    """

    def __init__(self, device, queue) -> None:
        self.device = device
        self.q = queue
        self.num = queue.num
        self.pending: list[tuple[int, int]] = []  # completions not yet published
        #: used.idx before the first completion published without an interrupt decision (None: none)
        self.unsignalled: int | None = None
        self.published = 0  # used.idx as this device last stored it
        #: completions kept back for ever (stop-completing) and interrupts not sent (drop-irqs)
        self.held: list[tuple[int, int]] = []
        self.dropped = 0
        views = queue.views
        self.desc = views.desc
        self.avail_flags = views.avail_flags
        self.avail_idx = views.avail_idx
        self.avail_ring = views.avail_ring
        self.used_event = views.used_event
        self.used_flags = views.used_flags
        self.used_idx = views.used_idx
        self.used_id = views.used_id
        self.used_len = views.used_len
        self.avail_event = views.avail_event
        # A transport with an interrupt per queue (vhost-user's call eventfds) says how to raise this one's.
        notifier = getattr(device, "queue_notifier", None)
        #: interrupts the driver for this queue; True if there was an IRQ to trigger
        self.interrupt = notifier(queue) if notifier is not None else partial(device.notify, cat.IRQ_STATUS_VRING)

    # -- fetching ---------------------------------------------------------------------

    def available(self) -> int:
        """How many heads the driver has offered that the device has not taken."""
        q = self.q
        ahead = (self.avail_idx[0] - q.next_avail) & 0xFFFF
        if ahead > self.num:
            raise BadChain(
                f"queue {q.index}: avail.idx {self.avail_idx[0]} is {ahead} ahead of the device "
                f"({q.next_avail}), more than the queue size {self.num} (L4Re does not check this)"
            )
        return ahead

    def pop(self) -> int:
        """The next head index (the caller checked :meth:`available`)."""
        q = self.q
        head = self.avail_ring[q.next_avail % self.num]
        q.next_avail = (q.next_avail + 1) & 0xFFFF
        dev = self.device
        if dev.reset_at is not None:  # needs-reset-at: the Nth request puts the device in DEVICE_NEEDS_RESET
            dev.reset_at -= 1
            if dev.reset_at == 0:
                raise BadChain(f"queue {q.index}: request at avail slot {(q.next_avail - 1) & 0xFFFF} (head {head}) "
                               f"refused (injected fault needs-reset-at)")  # fmt: skip
        if head >= self.num:
            raise BadChain(f"queue {q.index}: head index {head} is not below the queue size {self.num} "
                           f"(L4Re does not check this)")  # fmt: skip
        return head

    def chain(self, head: int) -> list[Segment]:
        """The buffers of the chain starting at ``head``, every bound checked."""
        views, kinds = self.walk(head)
        return [Segment(v, bool(k & WRITE), bool(k & MAY_WRITE)) for v, k in zip(views, kinds)]

    def walk(self, head: int) -> tuple[list[memoryview], list[int]]:
        """The chain starting at ``head`` with every bound checked, in the form the data path wants:
        the views of its buffers, and for each buffer its descriptor's WRITE flag ored with
        MAY_WRITE if it lies in a region the device may write."""
        q = self.q
        dev = self.device
        table = self.desc
        size = self.num
        unpack = _DESC.unpack_from
        region = None
        addr, length, flags, nxt = unpack(table, head * DESC_SIZE)
        if flags & INDIRECT:
            if cat.INDIRECT_DESC_BIT not in dev.negotiated:
                raise BadChain(f"queue {q.index}: indirect descriptor at {head} but INDIRECT_DESC was not negotiated")
            if flags & WRITE:
                raise BadChain(f"queue {q.index}: indirect descriptor at {head} has the WRITE flag")
            entries = length // DESC_SIZE
            if entries == 0:
                raise BadChain(f"queue {q.index}: indirect table of {length} bytes holds no descriptor")
            region = dev.region_of(addr, entries * DESC_SIZE)
            if region is None:
                raise BadChain(
                    f"queue {q.index}: indirect table {addr:#x}+{length:#x} is not inside one registered region"
                )
            if length % DESC_SIZE and log.enabled(log.INFO):
                log.info(
                    "queue %d: indirect table length %d is not a multiple of 16 (remainder ignored)", q.index, length
                )
            start = addr - region.base
            table = region.view[start : start + entries * DESC_SIZE]
            size = entries
            addr, length, flags, nxt = unpack(table, 0)
            if flags & INDIRECT:
                raise BadChain(f"queue {q.index}: indirect table contains another indirect descriptor")
        views: list[memoryview] = []
        kinds: list[int] = []
        count = 0
        # the region found last first (the indirect table's, or the last buffer's): the buffers
        # of a request usually share it
        if region is None:
            region = dev.last_region()
        base = end = rw = 0
        if region is not None:
            base = region.base
            end = base + region.size
            rw = MAY_WRITE if region.writable else 0
        while True:
            count += 1
            if count > size:
                raise BadChain(f"queue {q.index}: chain from head {head} is longer than its table ({size}): a loop?")
            if region is None or not (base <= addr and addr + length <= end):
                region = dev.region_of(addr, length)
                if region is None:
                    raise BadChain(
                        f"queue {q.index}: buffer {addr:#x}+{length:#x} of the chain from head {head} "
                        f"is not inside one registered region"
                    )
                base = region.base
                end = base + region.size
                rw = MAY_WRITE if region.writable else 0
            start = addr - base
            views.append(region.view[start : start + length])
            kinds.append((flags & WRITE) | rw)
            if not flags & NEXT:
                return views, kinds
            if nxt >= size:
                raise BadChain(f"queue {q.index}: next index {nxt} is outside its table ({size} descriptors)")
            addr, length, flags, nxt = unpack(table, nxt * DESC_SIZE)
            if flags & INDIRECT:
                raise BadChain(f"queue {q.index}: indirect flag inside a chain (only a head may be indirect)")

    def rewind(self, count: int = 1) -> None:
        """Give heads back (the device could not handle them yet)."""
        self.q.next_avail = (self.q.next_avail - count) & 0xFFFF

    # -- completing ----------------------------------------------------------------------

    def complete(self, head: int, written: int) -> None:
        """Queue the completion of ``head`` with ``written`` bytes; :meth:`publish` makes it visible."""
        self.pending.append((head, written))

    def publish(self, notify: bool = True) -> bool:
        """Write pending used elements, then used.idx once; with ``notify``, interrupt the driver if it wants.

        ``notify=False`` makes completions visible to a driver that polls
        without deciding about an interrupt yet: the next ``publish()`` with
        ``notify`` decides for everything published since the last decision,
        so a batch of requests costs at most one interrupt however often its
        completions were published.  Returns True if the driver was interrupted.
        """
        pending = self.pending
        left = self.device.completions_left
        if pending and left is not None:  # stop-completing: the rest are held, never used
            self._hold(pending, left)
        if pending:
            q = self.q
            ids = self.used_id
            lens = self.used_len
            num = self.num
            old = self.used_idx[0]
            idx = old
            for head, written in pending:
                slot = idx % num
                ids[slot] = head
                lens[slot] = written
                idx = (idx + 1) & 0xFFFF
            q.completed += len(pending)
            if left is not None:
                self.device.completions_left = left - len(pending)
            pending.clear()
            self.used_idx[0] = idx  # one store publishes them
            self.published = idx
            if self.unsignalled is None:
                self.unsignalled = old
        if not notify or self.unsignalled is None:
            return False
        old = self.unsignalled
        self.unsignalled = None
        idx = self.published
        full_barrier()  # the driver's used_event / NO_INTERRUPT is read after used.idx was stored
        if self.device.negotiated_bit(cat.EVENT_IDX_BIT):
            wanted = need_event(self.used_event[0], idx, old)
        else:
            wanted = not self.avail_flags[0] & cat.VRING_AVAIL_F_NO_INTERRUPT
        if wanted:
            dev = self.device
            if dev.irqs_left is not None:  # drop-irqs: the interrupt is never sent
                if dev.irqs_left <= 0:
                    if not self.dropped:
                        log.warning("queue %d: interrupt for used.idx %d not sent (injected fault drop-irqs)",
                                    self.q.index, idx)  # fmt: skip
                    self.dropped += 1
                    return False
                dev.irqs_left -= 1
            if self.interrupt():  # counted only when an IRQ was there to trigger
                self.q.notified += 1
                self.q.signalled = idx
        return wanted

    def _hold(self, pending: list[tuple[int, int]], left: int) -> None:
        """stop-completing: keep all but the first ``left`` completions back for ever."""
        if len(pending) <= left:
            return
        keep = max(0, left)
        if not self.held:
            log.warning("queue %d: completions from used.idx %d on are held back (injected fault stop-completing)",
                        self.q.index, (self.used_idx[0] + keep) & 0xFFFF)  # fmt: skip
        self.held.extend(pending[keep:])
        del pending[keep:]

    # -- kick suppression ------------------------------------------------------------------

    def suppress_kicks(self, on: bool) -> None:
        """While the device polls the ring it needs no kicks (NO_NOTIFY or avail_event)."""
        q = self.q
        if self.device.faults.get("suppress-kicks"):
            on = True  # the device never asks for kicks again
        if self.device.negotiated_bit(cat.EVENT_IDX_BIT):
            # avail_event = next_avail: "kick me when you publish past what I have
            # seen"; half the index space ahead: "do not kick".
            self.avail_event[0] = (q.next_avail + (0x7FFF if on else 0)) & 0xFFFF
        else:
            self.used_flags[0] = cat.VRING_USED_F_NO_NOTIFY if on else 0
