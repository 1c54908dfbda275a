"""The L4-VIRTIO and ICU operations of a device: arguments in, a reply out.

One place decides what every request means and what it answers (protocol
notes §3), whoever carries the requests: the emulator's socket server, an
adapter that presents another kind of device (vhost-user) as an L4-VIRTIO one,
or a monitor of an ``emu:`` device in the same process.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from l4vctl import catalog as cat
from l4vctl.caps import RIGHT_W, RIGHTS_RO, RIGHTS_RW, SEAL_WRITE, Dataspace, Irq, fd_kind
from l4vctl.emulator import log
from l4vctl.emulator.device import EINVAL, EMSGTOOSHORT, ENOSYS, ERANGE

EPERM = -cat.L4_EPERM
ENOMEM = -cat.L4_ENOMEM
EBADPROTO = -cat.L4_EBADPROTO
NO_REPLY = object()


def _attach(dev) -> str:
    """How drivers attach to ``dev``: "iface", "config" or "both" (see ``l4vctl emulate --attach``)."""
    return getattr(dev, "attach", None) or ("both" if dev.abi == "classic" else "config")


class Request(Protocol):
    """What the dispatcher reads of a request: :class:`l4vctl.wire.Frame` has it, and so may others."""

    label: int
    opcode: int
    words: list[int]
    caps: list[Any]

    def fd_of(self, cap: Any) -> int | None:
        """The descriptor a capability item refers to, if one came with the request."""

    def keep(self, fd: int) -> None:
        """Take ownership of one of the request's descriptors."""


class Reply:
    """The answer to one request: result code, words, capability items and the descriptors they carry."""

    __slots__ = ("result", "words", "caps", "fds")

    def __init__(self, result: int = 0, words=(), caps=(), fds=()):
        self.result = result
        self.words = list(words)
        self.caps = list(caps)
        self.fds = list(fds)


class Dispatcher:
    """Answers the requests of every client of one device (the role decides what a client may do).

    Requests are frames (:class:`l4vctl.wire.Frame`, or any other :class:`Request`).
    Capability items in replies are made by ``cap_item``: :class:`l4vctl.wire.Cap`
    unless the caller brings a class with the same fields (a reply that
    never crosses a socket need not load the socket machinery).
    """

    def __init__(self, device, cap_item: Any = None):
        self.device = device
        if cap_item is None:
            from l4vctl.wire import Cap as cap_item
        self.cap_item = cap_item

    def handle(self, f: Request, role: int, driver_attached: bool):
        """The reply to one request (or NO_REPLY) from a client in ``role``."""
        try:
            return self._handle(f, role, driver_attached)
        finally:
            self.device.page_changed()  # monitors see what the request changed

    def _handle(self, f: Request, role: int, driver_attached: bool):
        if f.label == cat.L4VIRTIO_PROTOCOL:
            if role != cat.ROLE_DRIVER and f.opcode != cat.OP_DEVICE_CONFIG:
                return Reply(EPERM)
            return self._virtio(f, read_only=role != cat.ROLE_DRIVER)
        if f.label == cat.L4_PROTO_IRQ:
            if role != cat.ROLE_DRIVER and f.opcode != cat.ICU_OP_INFO:
                return Reply(EPERM)
            return self._icu(f)
        if f.label == cat.L4VCTL_PROTO_MONITOR:
            return self._monitor(f, driver_attached)
        log.warning("request with unknown protocol label %d: -L4_EBADPROTO", f.label)
        return Reply(EBADPROTO)

    # -- monitor (an l4vctl extension; any role may call it) -----------------------------

    def _monitor(self, f: Request, driver_attached: bool):
        if f.opcode == cat.MONITOR_OP_STATS:
            words = self.device.stats()
            words[1] = int(driver_attached)
            return Reply(0, words)
        if f.opcode == cat.MONITOR_OP_REGIONS:
            regions = self.device.regions[: cat.MONITOR_MAX_REGIONS]
            words = [len(regions)]
            for r in regions:
                words += [r.base, r.size, cat.MONITOR_REGION_WRITABLE if r.writable else 0]
            return Reply(0, words)
        if f.opcode == cat.MONITOR_OP_READ:
            return self._monitor_read(f.words)
        return Reply(ENOSYS)

    def _monitor_read(self, words: list[int]):
        """READ: the bytes of ranges of the driver's registered memory, in one new sealed memfd.

        The memfd is the monitor's own copy (never a descriptor of the driver's
        memory, which the monitor could reopen read-write): its size is sealed
        and so are writes, so it is read-only for everyone.
        """
        if not words or len(words) % 2 or len(words) // 2 > cat.MONITOR_READ_MAX_RANGES:
            log.warning("monitor READ with %d words (1..%d ranges of two): -L4_EINVAL",
                        len(words), cat.MONITOR_READ_MAX_RANGES)  # fmt: skip
            return Reply(EINVAL)
        views = []
        total = 0
        for i in range(0, len(words), 2):
            addr, size = words[i] & 0xFFFFFFFFFFFFFFFF, words[i + 1] & 0xFFFFFFFFFFFFFFFF
            if size == 0:
                log.warning("monitor READ of an empty range at %#x: -L4_EINVAL", addr)
                return Reply(EINVAL)
            total += size
            if total > cat.MONITOR_READ_MAX_BYTES:
                log.warning("monitor READ of more than %d bytes: -L4_EINVAL", cat.MONITOR_READ_MAX_BYTES)
                return Reply(EINVAL)
            region = self.device.region_of(addr, size)
            if region is None:
                log.warning("monitor READ %#x+%#x outside the registered memory: -L4_ERANGE", addr, size)
                return Reply(ERANGE)
            start = addr - region.base
            views.append(region.view[start : start + size])
        try:
            fd = _sealed_copy(views, total)
        except OSError as exc:
            log.warning("monitor READ: cannot make the copy: %s: -L4_ENOMEM", exc.strerror or exc)
            return Reply(ENOMEM)
        size = os.fstat(fd).st_size
        return Reply(0, [total], [self.cap_item(cat.CAP_DATASPACE, RIGHTS_RO, 0, size)], [fd])

    def _virtio(self, f: Request, read_only: bool):
        dev = self.device
        op = f.opcode
        faults = dev.faults
        if "no-reply" in faults and faults["no-reply"] is not True and op == faults["no-reply"]:
            log.warning("opcode %d left without a reply (injected fault)", op)
            return NO_REPLY
        if op == cat.OP_SET_STATUS:
            if not f.words:
                return Reply(EMSGTOOSHORT)
            value = f.words[0] & 0xFFFFFFFF
            self._maybe_die(value)
            dev.set_status(value)
            return Reply(0)
        if op == cat.OP_CONFIG_QUEUE:
            if not f.words:
                return Reply(EMSGTOOSHORT)
            return Reply(dev.config_queue(f.words[0] & 0xFFFFFFFF))
        if op == cat.OP_REGISTER_IFACE:
            if _attach(dev) == "config":
                return Reply(ENOSYS)
            if not f.caps:
                return Reply(EMSGTOOSHORT)
            if dev.ds_offset:
                return Reply(ENOSYS)
            irq = self._irq_arg(f, f.caps[0])
            if irq is None:
                return Reply(EINVAL)
            dev.bind(irq)
            return Reply(0, [], *self._caps_of(dev.kick_irq.fd, dev.config_ds, RIGHTS_RW))
        if op == cat.OP_REGISTER_DS:
            if len(f.words) < 3 or not f.caps:
                return Reply(EMSGTOOSHORT)
            cap = f.caps[0]
            fd = f.fd_of(cap) if cap.type == cat.CAP_DATASPACE else None
            base, offset, size = f.words[:3]
            return Reply(dev.register_ds(fd, cap.rights, base, offset, size))
        if op == cat.OP_DEVICE_CONFIG:
            if _attach(dev) == "iface" and not read_only:  # monitors (an l4vctl extension) may still look
                return Reply(ENOSYS)
            if read_only:  # a copy sealed against writes (see Device.monitor_ds)
                return Reply(0, [dev.ds_offset], *self._ds_cap(dev.monitor_ds(), RIGHTS_RO))
            return Reply(0, [dev.ds_offset], *self._ds_cap(dev.config_ds, RIGHTS_RW))
        if op == cat.OP_GET_DEVICE_IRQ:
            if _attach(dev) == "iface":
                return Reply(ENOSYS)
            if not f.words:
                return Reply(EMSGTOOSHORT)
            irq = dev.irq_for_index(f.words[0] & 0xFFFFFFFF)
            if irq is None:
                return Reply(ENOSYS)
            return Reply(0, [], [self.cap_item(cat.CAP_IRQ, RIGHT_W, 0, 0)], [os.dup(irq.fd)])
        return Reply(ENOSYS)

    def _maybe_die(self, value: int) -> None:
        target = self.device.faults.get("die-on-status")
        if target is not None and target is not True and value == target:
            log.warning("status %#x written: the emulator dies now (injected fault)", value)
            os._exit(70)

    def _icu(self, f: Request):
        op = f.opcode
        if op == cat.ICU_OP_BIND:
            if _attach(self.device) == "iface":
                return Reply(ENOSYS)
            if not f.caps or not f.words:
                return Reply(EMSGTOOSHORT)
            if f.words[0] != 0:
                return Reply(ERANGE)
            irq = self._irq_arg(f, f.caps[0])
            if irq is None:
                return Reply(EINVAL)
            self.device.bind(irq)
            log.info("driver IRQ bound")
            return Reply(0)
        if op == cat.ICU_OP_INFO:
            return Reply(0, [0, 1, 0])
        if op == cat.ICU_OP_UNMASK:
            return NO_REPLY  # L4Re devices never answer unmask
        return Reply(ENOSYS)

    def _irq_arg(self, f: Request, cap: Any) -> Irq | None:
        """The driver's IRQ from a capability item, kept open; None if it is not one."""
        fd = f.fd_of(cap) if cap.type == cat.CAP_IRQ else None
        if fd is None:
            return None
        kind = fd_kind(fd)
        if kind != "eventfd":
            log.warning("expected an IRQ (eventfd), got a %s: -L4_EINVAL", kind)
            return None
        f.keep(fd)
        return Irq.adopt(fd)  # made non-blocking; triggers never block on it anyway

    def _ds_cap(self, ds, rights: int):
        """Capability items and descriptors for sending a dataspace."""
        return [self.cap_item(cat.CAP_DATASPACE, rights, 0, ds.size)], [os.dup(ds.fd)]

    def _caps_of(self, irq_fd: int, ds, rights: int):
        dfd = os.dup(ds.fd)
        ifd = os.dup(irq_fd)
        caps = [self.cap_item(cat.CAP_IRQ, RIGHT_W, 0, 0), self.cap_item(cat.CAP_DATASPACE, rights, 1, ds.size)]
        return caps, [ifd, dfd]


def _sealed_copy(views: list[memoryview], total: int) -> int:
    """A new memfd holding ``views`` one after the other, sealed against size changes and writes."""
    ds = Dataspace.create("l4vctl-monitor-read", total, final=False)
    try:
        pos = 0
        for view in views:
            done = 0
            while done < len(view):
                done += os.pwrite(ds.fd, view[done:], pos + done)
            pos += len(view)
        ds.seal(SEAL_WRITE)  # no writable mapping exists: nobody can change the bytes now
    except BaseException:
        ds.close()
        raise
    finally:
        for view in views:
            view.release()
    return ds.fd
