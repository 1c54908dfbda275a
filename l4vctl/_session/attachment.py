"""A session's attachment to a live device: the channel, the config page, IRQs and lent memory.

It attaches by what the device answers (DEVICE_CONFIG + GET_DEVICE_IRQ + ICU
bind; REGISTER_IFACE when DEVICE_CONFIG answers -L4_ENOSYS, as the oldest
classic-era devices do), and keeps what the attachment brought: the page's
memory, the device IRQ (kicks), the driver IRQ (interrupts), per-queue kick
IRQs and every dataspace lent with REGISTER_DS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat
from l4vctl.backends.base import Channel, Lent, Memory, Response, lend_local, map_local
from l4vctl.caps import RIGHT_W, Irq
from l4vctl.errors import ProtocolError, TimeoutExpired, UnavailableError

if TYPE_CHECKING:
    from l4vctl.caps import Dataspace
    from l4vctl.wire import Cap

#: First device address the session hands out (L4Re drivers start at the superpage size).
DEVICE_ADDRESS_BASE = 0x200000


class Attachment:
    """The live side of a session: calls on the channel and what attaching obtained."""

    def __init__(self, channel: Channel, url: str, role: str, attach_request: str):
        self.channel: Channel | None = channel
        self.url = url
        self.role = role
        self.attach_request = attach_request
        self.attached_via: str | None = None  # "config" (DEVICE_CONFIG) or "iface" (REGISTER_IFACE)
        self.broken = False  # the channel failed: no more calls on it
        self.driver_irq: Irq | None = None
        self.device_irq: Irq | None = None
        self.queue_irqs: dict[int, Irq] = {}  # per-queue kick IRQs by notify index
        self.lent: list[Lent] = []
        self.next_address = getattr(channel, "device_address_base", DEVICE_ADDRESS_BASE)

    # -- calls ------------------------------------------------------------------------------

    def call(self, label: int, opcode: int, words: Sequence[int] = (), caps: Sequence[Cap] = (),
             fds: Sequence[int] = ()) -> Response:  # fmt: skip
        """One IPC; a channel that failed (timeout, peer gone) is not used again."""
        if self.broken:
            raise UnavailableError(f"{self.url}: the connection to the device failed earlier")
        assert self.channel is not None
        try:
            return self.channel.call(label, opcode, words, caps, fds)
        except (TimeoutExpired, UnavailableError, ProtocolError):
            self.broken = True
            raise

    def check(self) -> None:
        """Raise UnavailableError if the device went away (the channel is then broken)."""
        check = getattr(self.channel, "check", None)
        if check is not None:
            try:
                check()
            except UnavailableError:
                self.broken = True
                raise

    def peer_pid(self) -> int | None:
        """The device's process, where the channel knows it (a local emulator): waits spin by where it runs."""
        pid = getattr(self.channel, "peer_pid", None)
        return pid if isinstance(pid, int) else None

    def watch_fd(self) -> int | None:
        """The descriptor of the device connection, watched for a hang-up (None: nothing to watch)."""
        fileno = getattr(self.channel, "fileno", None)
        fd = fileno() if fileno is not None else -1
        return fd if fd >= 0 else None

    # -- attaching --------------------------------------------------------------------------

    def attach(self, on_page: Callable[[Memory], Any], notify_index: Callable[[], int]) -> None:
        """Attach as the role asks; ``on_page`` takes the mapped config page, ``notify_index``
        reads its cfg_device_notify_index."""
        if self.role != "driver":  # monitors only look at the page
            self._attach_device_config(on_page, fallback=False)
        elif self.attach_request == "iface":
            self._attach_register_iface(on_page)
        elif self._attach_device_config(on_page, fallback=self.attach_request == "auto"):
            self._attach_irqs(notify_index())
        else:  # -L4_ENOSYS: a device from before DEVICE_CONFIG, which knows only REGISTER_IFACE
            self._attach_register_iface(on_page)

    def _config_memory(self, r: Response, index: int, offset: int, writable: bool) -> Memory:
        hook = getattr(self.channel, "config_memory", None)
        if hook is None:  # a channel that does not derive from the contract: memory is local
            return map_local(r.fd(index, cat.CAP_DATASPACE), r.caps[index].size, offset, writable)
        return hook(r, index, offset, writable)

    def _adopt_irq(self, r: Response, index: int, what: str) -> Irq:
        hook = getattr(self.channel, "adopt_irq", None)
        if hook is None:
            return Irq.adopt(r.fd(index, cat.CAP_IRQ), what)
        return hook(r, index, what)

    def _new_irq(self) -> tuple[Irq, Cap, list[int]]:
        hook = getattr(self.channel, "new_irq", None)
        if hook is None:
            from l4vctl.wire import Cap

            irq = Irq.create()
            return irq, Cap(cat.CAP_IRQ, RIGHT_W, 0), [irq.fd]
        return hook()

    def _attach_device_config(self, on_page: Callable[[Memory], Any], fallback: bool) -> bool:
        """Map the page DEVICE_CONFIG hands out; False if it answered -L4_ENOSYS and ``fallback``."""
        r = self.call(cat.L4VIRTIO_PROTOCOL, cat.OP_DEVICE_CONFIG)
        try:
            if r.result == -cat.L4_ENOSYS and fallback:
                return False
            if r.result == -cat.L4_ENOSYS and self.role == "driver":
                raise ProtocolError("DEVICE_CONFIG is not implemented: a device that knows only REGISTER_IFACE "
                                    "(try --attach iface or auto)")  # fmt: skip
            if r.result < 0:
                raise ProtocolError(f"DEVICE_CONFIG failed: {cat.l4_error_name(r.result)}")
            if not r.words:
                raise ProtocolError("DEVICE_CONFIG reply carries no page offset")
            on_page(self._config_memory(r, 0, r.words[0], writable=self.role == "driver"))
        finally:
            r.close()
        self.attached_via = "config"
        return True

    def _attach_irqs(self, index: int) -> None:
        r = self.call(cat.L4VIRTIO_PROTOCOL, cat.OP_GET_DEVICE_IRQ, [index])
        try:
            if r.result < 0:
                raise ProtocolError(f"GET_DEVICE_IRQ({index}) failed: {cat.l4_error_name(r.result)}")
            self.device_irq = self._adopt_irq(r, 0, "device IRQ")
        finally:
            r.close()
        self.driver_irq, cap, fds = self._new_irq()
        r = self.call(cat.L4_PROTO_IRQ, cat.ICU_OP_BIND, [0], [cap], fds)
        r.close()
        if r.result < 0:
            raise ProtocolError(f"ICU bind failed: {cat.l4_error_name(r.result)}")

    def _attach_register_iface(self, on_page: Callable[[Memory], Any]) -> None:
        self.driver_irq, cap, fds = self._new_irq()
        r = self.call(cat.L4VIRTIO_PROTOCOL, cat.OP_REGISTER_IFACE, [], [cap], fds)
        try:
            if r.result == -cat.L4_ENOSYS:
                if self.attach_request == "auto":
                    raise ProtocolError("cannot attach: the device answers neither DEVICE_CONFIG nor REGISTER_IFACE "
                                        "(-L4_ENOSYS)")  # fmt: skip
                raise ProtocolError("REGISTER_IFACE is not implemented: a device from after 2022-09 "
                                    "(try --attach config or auto)")  # fmt: skip
            if r.result < 0:
                raise ProtocolError(f"REGISTER_IFACE failed: {cat.l4_error_name(r.result)}")
            self.device_irq = self._adopt_irq(r, 0, "device IRQ")
            on_page(self._config_memory(r, 1, 0, writable=True))
        finally:
            r.close()
        self.attached_via = "iface"

    # -- IRQs and memory -------------------------------------------------------------------------

    def queue_irq(self, index: int, queue: int) -> Irq:
        """The device IRQ behind notify ``index`` (fetched once with GET_DEVICE_IRQ)."""
        irq = self.queue_irqs.get(index)
        if irq is None:
            r = self.call(cat.L4VIRTIO_PROTOCOL, cat.OP_GET_DEVICE_IRQ, [index])
            try:
                if r.result < 0:
                    raise ProtocolError(
                        f"GET_DEVICE_IRQ({index}) for queue {queue} failed: {cat.l4_error_name(r.result)}"
                    )
                irq = self.queue_irqs[index] = self._adopt_irq(r, 0, f"IRQ of queue {queue}")
            finally:
                r.close()
        return irq

    def lend(self, size: int, name: str) -> tuple[Memory, int]:
        """New memory registered with the device (REGISTER_DS): the memory and its device address."""
        lend = getattr(self.channel, "lend", None)
        lent = lend(size, name) if lend is not None else lend_local(size, name)
        self.lent.append(lent)
        addr = self.next_address
        r = self.call(cat.L4VIRTIO_PROTOCOL, cat.OP_REGISTER_DS, [addr, 0, lent.size], [lent.cap], lent.fds)
        r.close()
        if r.result < 0:
            raise ProtocolError(f"REGISTER_DS of {lent.size} bytes failed: {cat.l4_error_name(r.result)}")
        self.next_address = addr + lent.size
        return lent.memory, addr

    @property
    def dataspaces(self) -> list[Dataspace]:
        """The local dataspaces behind the lent memory."""
        return [lent.dataspace for lent in self.lent if lent.dataspace is not None]

    # -- teardown -----------------------------------------------------------------------------------

    def release(self) -> None:
        """Close lent memory and IRQs (the channel stays open)."""
        for lent in self.lent:
            lent.close()
        self.lent.clear()
        for irq in self.queue_irqs.values():
            irq.close()
        self.queue_irqs.clear()
        for obj in (self.driver_irq, self.device_irq):
            if obj is not None:
                obj.close()
        self.driver_irq = self.device_irq = None

    def close(self) -> None:
        """Release everything and close the channel."""
        self.release()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
