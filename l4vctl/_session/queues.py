"""The queues of a driver session: layout in one lent dataspace, configuration, virtqueues."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl.caps import PAGE
from l4vctl.errors import NegotiationError, ProtocolError, UsageError
from l4vctl.formats.fast import ring as ring_geometry

if TYPE_CHECKING:
    from l4vctl._session.attachment import Attachment
    from l4vctl._session.negotiation import Negotiation
    from l4vctl._session.pageview import PageView
    from l4vctl._session.shadow import ShadowSpace
    from l4vctl.backends.base import Memory
    from l4vctl.caps import Irq
    from l4vctl.virtqueue import Virtqueue


class QueueSetup:
    """A queue the session configured: size, device addresses, offsets in its memory."""

    __slots__ = ("index", "num", "desc", "avail", "used", "offset", "accepted", "result")

    def __init__(self, index: int, num: int, desc: int, avail: int, used: int, offset: int):
        self.index = index
        self.num = num
        self.desc = desc
        self.avail = avail
        self.used = used
        self.offset = offset
        self.accepted: bool | None = None
        self.result: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The queue as JSON output shows it."""
        return {
            "index": self.index, "num": self.num, "desc_addr": self.desc, "avail_addr": self.avail,
            "used_addr": self.used, "accepted": self.accepted, "result": self.result,
        }  # fmt: skip


def _page_stores(view: PageView) -> Callable[[int, int, int], None]:
    """A function storing a 16- or 64-bit field of the page with one store (or one write where it is not mapped)."""
    if view.page is None:
        memory = view.memory

        def write(offset: int, size: int, value: int) -> None:
            memory.write([(offset, value.to_bytes(size, "little"))])

        return write
    typed = {2: view.cast("H"), 8: view.cast("Q")}

    def store(offset: int, size: int, value: int) -> None:
        typed[size][offset // size] = value

    return store


class QueueSet:
    """Every queue of one handshake, the ring memory they share and their virtqueues."""

    def __init__(self, stride: int):
        self.stride = stride
        self.queues: list[QueueSetup] = []
        self.ring_memory: memoryview | None = None
        self._rings: tuple[Memory, int, int] | None = None  # (memory, device address, size) of the rings
        self._vqs: dict[int, Virtqueue] = {}
        #: where memory that is not mapped here is shadowed (set by the session when it needs one)
        self.shadow: ShadowSpace | None = None
        self._shadowed = False  # the rings live in ``shadow``

    def setup(self, view: PageView, link: Attachment, neg: Negotiation, queue_size: int | None,
              lend: Callable[[int, str], tuple[Memory, int]]) -> list[QueueSetup]:  # fmt: skip
        """Lay out every queue in one dataspace registered with ``lend`` and enable it."""
        n = view.get("num_queues")
        qoff = view.get("queues_offset")
        if n and (qoff < cat.HEADER_SIZE or qoff + n * self.stride > cat.PAGE_SIZE):
            raise ProtocolError(f"queue array at {qoff:#x} with {n} entries does not fit the page")
        geometry = ring_geometry()
        qc = pg.queue_codec(self.stride)
        plan = []
        total = 0
        page = view.page if view.page is not None else view.snapshot()
        for i in range(n):
            entry = qc.unpack(page, qoff + i * self.stride)
            num_max = entry["num_max"]
            if num_max == 0:
                raise ProtocolError(f"queue {i}: num_max is 0")
            num = min(queue_size or num_max, num_max)
            num = 1 << (num.bit_length() - 1)  # the largest power of two not above it
            layout = geometry.simple_layout(num)
            plan.append((i, num, total, layout))
            total += -(-layout["total"] // PAGE) * PAGE
        if not plan:
            return []
        self.close_virtqueues()  # rings of an earlier handshake are gone
        if self._rings is not None and self._rings[2] >= total:
            # a new handshake on the same session reuses its registered ring memory
            memory, ring_base, _size = self._rings
            memory.write([(0, bytes(total))])
            if self._shadowed:
                assert self.ring_memory is not None and self.shadow is not None
                self.ring_memory[:total] = bytes(total)
                self.shadow.known(ring_base, bytes(total))  # what the memory now holds
        else:
            memory, ring_base = lend(total, "l4vctl-rings")
            self._rings = (memory, ring_base, total)
            local = memory.view()
            self._shadowed = local is None
            if local is None:
                if self.shadow is None:
                    from l4vctl._session.shadow import ShadowSpace

                    self.shadow = ShadowSpace()
                local = self.shadow.add(ring_base, memory)
            self.ring_memory = local
        store = _page_stores(view)
        self.queues = []
        for i, num, offset, layout in plan:
            base = ring_base + offset
            q = QueueSetup(i, num, base + layout["desc"], base + layout["avail"], base + layout["used"], offset)
            entry = qoff + i * self.stride
            f = qc.fields
            for name, value in (("num", num), ("driver_notify_index", 0), ("desc_addr", q.desc),
                                ("avail_addr", q.avail), ("used_addr", q.used), ("ready", 1)):  # fmt: skip
                off, size = f[name][0], f[name][1]
                store(entry + off, size, value)
            if neg.mode == "cmd":
                neg.send_cmd(view, link, cat.cmd_word(cat.CMD_CFG_QUEUE, i))
                q.accepted = None  # cmd mode reports nothing
            else:
                r = link.call(cat.L4VIRTIO_PROTOCOL, cat.OP_CONFIG_QUEUE, [i])
                r.close()
                q.result = r.result
                q.accepted = r.result >= 0
                if r.result < 0:
                    raise NegotiationError(
                        f"queue {i} was rejected: CONFIG_QUEUE answered {cat.l4_error_name(r.result)}"
                    )
            self.queues.append(q)
        return self.queues

    def virtqueue(self, index: int, view: PageView, link: Attachment, negotiated: set[int],
                  check: Callable[[], None]) -> Virtqueue:  # fmt: skip
        """The driver-side virtqueue of a configured queue (made once)."""
        from l4vctl.virtqueue import Virtqueue

        vq = self._vqs.get(index)
        if vq is not None:
            return vq
        setup = next((q for q in self.queues if q.index == index), None)
        if setup is None:
            raise UsageError(f"queue {index} is not configured")
        assert self.ring_memory is not None
        total = ring_geometry().simple_layout(setup.num)["total"]
        vq = Virtqueue(
            self.ring_memory[setup.offset : setup.offset + total],
            setup.num,
            kick_irq=self.kick_irq(index, view, link),
            irq=link.driver_irq,
            event_idx=cat.EVENT_IDX_BIT in negotiated,
            indirect=cat.INDIRECT_DESC_BIT in negotiated,
            index=index,
            check=check,
            watch=link.watch_fd(),
            peer=link.peer_pid(),
            dma=self.shadow if self._shadowed else None,
            ring_addrs=(setup.desc, setup.avail, setup.used),
        )
        observe = getattr(link.channel, "observe_virtqueue", None)  # a traced session records its requests
        if observe is not None:
            observe(vq, setup)
        self._vqs[index] = vq
        return vq

    def kick_irq(self, queue: int, view: PageView, link: Attachment) -> Irq:
        """The device IRQ that kicks ``queue``: its device_notify_index names it.

        L4Re devices use index 0 for everything (the IRQ fetched at attach);
        a device may give each queue an IRQ of its own.
        """
        page = view.page if view.page is not None else view.snapshot()
        entry = pg.queue_codec(self.stride).unpack(page, view.get("queues_offset") + queue * self.stride)
        index = entry["device_notify_index"]
        if index == view.get("cfg_device_notify_index"):
            assert link.device_irq is not None
            return link.device_irq
        return link.queue_irq(index, queue)

    def close_virtqueues(self) -> None:
        """Close the virtqueues (their ring memory stays registered)."""
        for vq in self._vqs.values():
            vq.close()
        self._vqs.clear()

    def close(self) -> None:
        """Close the virtqueues and forget the ring memory (the attachment releases it)."""
        self.close_virtqueues()
        self.ring_memory = None
        self._rings = None
