"""``l4re:`` — a real L4-VIRTIO device inside a running L4Re system, reached through l4vagent.

``l4re:LINK[?dev=NAME&baud=N&ipc-timeout=MS]`` where LINK is ``unix:PATH``,
``tcp:HOST:PORT`` (QEMU's ``-serial`` chardevs) or ``serial:DEVICE`` (a UART
on hardware).  The agent (``l4re/agent``, started by ned with the device
capabilities) executes the L4 operations; the session, the virtqueues and
the drivers run here unchanged on the backend contract: the config page and
lent dataspaces are :class:`RemoteMemory` (ranges read and written in
batched frames), the device's IRQs are triggered with TRIGGER frames and the
driver's IRQ is a local eventfd that the agent's EVENT frames trigger.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from l4vctl import catalog as cat
from l4vctl import l4msg
from l4vctl.backends.base import Backend, Channel, Lent, Memory, Range, Response, parse_query
from l4vctl.caps import RIGHT_W, RIGHTS_RW, Irq
from l4vctl.errors import ProtocolError, TimeoutExpired, UnavailableError, UsageError
from l4vctl.wire import Cap

#: Bytes moved per READ or WRITE frame.
CHUNK = 4096
#: Ranges per READ or WRITE frame.
MAX_RANGES = 96
#: READ or WRITE frames sent before the first reply is awaited (the agent holds four replies).
WINDOW = 3
#: First device address of a device the host never lent memory to.
DEVICE_ADDRESS_BASE = 0x200000
#: IPC errors (l4_ipc_error) the agent reports in a REPLY's flags, without the phase bit
#: (bit 0: 0 in the send phase, 1 in the receive phase).
IPC_ERRORS = {
    0x02: "timeout",
    0x04: "the partner does not exist",
    0x06: "canceled",
    0x0A: "page-fault timeout",
    0x0C: "page-fault timeout",
    0x0E: "aborted",
    0x10: "mapping failed",
}


def ipc_error(code: int) -> str:
    """What an IPC error code means, with its phase."""
    what = IPC_ERRORS.get(code & 0x1E, f"IPC error {code:#x}")
    return f"{what} in the {'receive' if code & 1 else 'send'} phase"


EXAMPLE = "l4re:unix:/tmp/com2.sock?dev=con0"
#: Seconds between liveness pings of the device server while a driver waits.
PING_INTERVAL = 0.5


def _pieces(ranges: Iterable[Range], size: int) -> list[Range]:
    out: list[Range] = []
    for off, length in ranges:
        if off < 0 or length < 0 or off + length > size:
            raise ValueError(f"range {off:#x}+{length:#x} is outside the {size:#x}-byte memory")
        while length > CHUNK:
            out.append((off, CHUNK))
            off += CHUNK
            length -= CHUNK
        if length:
            out.append((off, length))
    return out


def _batches(pieces: list[Range]) -> list[list[Range]]:
    batches: list[list[Range]] = []
    cur: list[Range] = []
    total = 0
    for piece in pieces:
        if cur and (total + piece[1] > CHUNK or len(cur) >= MAX_RANGES):
            batches.append(cur)
            cur, total = [], 0
        cur.append(piece)
        total += piece[1]
    if cur:
        batches.append(cur)
    return batches


class RemoteMemory(Memory):
    """A dataspace inside L4Re (``size`` bytes from ``base`` in it), moved in READ and WRITE frames."""

    def __init__(self, link, handle: int, base: int, size: int):
        self.link = link
        self.handle = handle
        self.base = base
        self.size = size
        self.reads = 0  # frames, for statistics
        self.writes = 0

    def read(self, ranges: Iterable[Range]) -> list[bytes]:
        """The bytes of every ``(offset, length)`` range (READ frames of 4 KiB, sent back to back)."""
        from l4vctl.link import zero_runs_decode

        wanted = list(ranges)
        batches = _batches(_pieces(wanted, self.size))
        frames = []
        for batch in batches:
            words = [3]  # raw or zero runs, as the agent finds shorter
            for off, length in batch:
                words += [self.base + off, length]
            frames.append((cat.KIND_READ, self.handle, words, b"", sum(n for _, n in batch)))
        got: list[bytes] = []
        for batch, frame, r in zip(batches, frames, self._send(frames), strict=True):
            total = frame[4]
            self._check(r, "reading")
            try:
                data = zero_runs_decode(r.data, total) if r.words and r.words[0] == cat.ENC_ZERO_RUNS else r.data
            except ValueError as exc:
                raise ProtocolError(f"{self.link.name}: the agent's memory bytes do not decode: {exc}") from None
            if len(data) != total:
                raise ProtocolError(f"{self.link.name}: the agent sent {len(data)} bytes for {total}")
            pos = 0
            for _, n in batch:
                got.append(data[pos : pos + n])
                pos += n
        # join the pieces of ranges that were split
        out: list[bytes] = []
        it = iter(got)
        for _off, length in wanted:
            parts = []
            left = length
            while left > 0:
                p = next(it)
                parts.append(p)
                left -= len(p)
            out.append(b"".join(parts))
        return out

    def _send(self, frames: list) -> list:
        """Send ``frames`` WINDOW at a time, back to back; the replies in order."""
        replies = []
        for i in range(0, len(frames), WINDOW):
            part = frames[i : i + WINDOW]
            if len(part) == 1:
                kind, flags, words, data, expect = part[0]
                replies.append(self.link.request(kind, flags=flags, words=words, data=data, expect=expect))
            else:
                replies.extend(self.link.pipeline(part))
        if frames and frames[0][0] == cat.KIND_READ:
            self.reads += len(frames)
        else:
            self.writes += len(frames)
        return replies

    def _check(self, r, what: str) -> None:
        if r.label == -cat.L4_ENXIO:
            raise UnavailableError(f"{self.link.name}: the device's memory is gone (its server died)")
        if r.label < 0:
            raise ProtocolError(f"{self.link.name}: {what} memory failed: {cat.l4_error_name(r.label)}")

    def write(self, items: Iterable[tuple[int, bytes]]) -> None:
        """Store every ``(offset, data)`` item, in order (WRITE frames of 4 KiB, sent back to back)."""
        from l4vctl.link import zero_runs_encode

        items = [(off, bytes(data)) for off, data in items]
        pieces = _pieces([(off, len(data)) for off, data in items], self.size)
        flat = b"".join(data for _, data in items)
        pos = 0
        frames = []
        for batch in _batches(pieces):
            total = sum(n for _, n in batch)
            raw = flat[pos : pos + total]
            pos += total
            packed = zero_runs_encode(raw)
            enc, data = (cat.ENC_ZERO_RUNS, packed) if len(packed) < len(raw) else (cat.ENC_RAW, raw)
            words = [enc]
            for off, length in batch:
                words += [self.base + off, length]
            frames.append((cat.KIND_WRITE, self.handle, words, data, 0))
        for r in self._send(frames):
            self._check(r, "writing")


class RemoteKick(Irq):
    """A device IRQ held by the agent: triggering it is a TRIGGER frame."""

    __slots__ = ("link", "handle")

    def __init__(self, link, handle: int):
        super().__init__(-1)
        self.link = link
        self.handle = handle

    def trigger(self) -> bool:
        """Ask the agent to trigger the IRQ (ordered after every memory write sent before)."""
        self.link.trigger(self.handle)
        return True

    def drain(self) -> int:
        """Nothing arrives on a device IRQ."""
        return 0

    def wait(self, timeout: float | None) -> bool:
        """Nothing arrives on a device IRQ."""
        return False

    def close(self) -> None:
        """The agent releases it when the session ends."""


#: Links open in this process, by link spec: [link, channels using it].  Two devices of one
#: agent (``net ping`` between two switch ports) share the link: a serial line has one host.
_LINKS: dict[str, list] = {}


class RemoteIrq(Irq):
    """A driver IRQ: a local eventfd that the agent's EVENT frames for ``handle`` trigger."""

    __slots__ = ("link", "handle")

    def __init__(self, link, handle: int):
        import os

        super().__init__(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self.link = link
        self.handle = handle
        with link.irq_lock:
            link.irqs[handle] = self

    def close(self) -> None:
        """Stop the events first (under the reader's lock), then close the eventfd."""
        with self.link.irq_lock:
            if self.link.irqs.get(self.handle) is self:
                del self.link.irqs[self.handle]
            super().close()


class L4reChannel(Channel):
    """A device the agent holds, as a channel of the backend contract."""

    def __init__(self, link, handle: int, device: str, role: str, spec: str = ""):
        self.link = link
        self.handle = handle
        self.device = device
        self.role = role
        self.spec = spec
        self.name = f"{link.name} {device}"
        self.handles: list[int] = []  # objects the agent holds for this channel
        self._pinged = time.monotonic()
        note = link.agent(cat.AGENT_OP_NOTE, [handle]).words
        self.device_address_base = max(DEVICE_ADDRESS_BASE, note[0] if note else 0)

    def call(self, label: int, opcode: int, words: Sequence[int] = (), caps: Sequence[Any] = (),
             fds: Sequence[int] = (), timeout: float | None = None) -> Response:  # fmt: skip
        """One IPC on the device, marshalled into message registers here and executed by the agent."""
        if fds:
            raise UsageError(f"{self.name}: descriptors cannot cross the link; lend memory through the channel")
        if label == cat.L4VIRTIO_PROTOCOL and opcode == cat.OP_REGISTER_DS and len(words) >= 3:
            # remember where this device's addresses end: the device keeps its regions across
            # sessions, and an address registered twice would resolve to the first region
            end = (words[0] + words[2] + 0xFFF) & ~0xFFF
            if end < 1 << 64:  # a range past 2^64 cannot be registered; noted, it would wrap to a low address
                self.link.agent(cat.AGENT_OP_NOTE, [self.handle, max(end, self.device_address_base)])
        kinds = l4msg.receive_kinds(label, opcode)
        r = self.link.call(self.handle, label, opcode, l4msg.pack(label, opcode, words), list(caps),
                           l4msg.receive_flags(kinds), timeout)  # fmt: skip
        if r.flags:
            why = ipc_error(r.flags)
            if r.flags & 0x1E == 0x02:
                raise TimeoutExpired(f"{self.name}: the device server did not answer ({why})")
            if r.flags & 0x1E == 0x04:
                raise UnavailableError(f"{self.name}: the device server is gone ({why})")
            raise UnavailableError(f"{self.name}: the call to the device server failed ({why})")
        self.handles.extend(cap.handle for cap in r.caps if cap.handle)
        return Response(r.label, r.words, r.caps, [])

    def _cap(self, r: Response, index: int, kind: int) -> Cap:
        cap = r.caps[index] if index < len(r.caps) else None
        if cap is None or cap.type != kind or cap.handle == 0:
            raise ProtocolError(f"reply lacks the expected {cat.CAP_TYPES.get(kind, 'capability')} item")
        return cap

    def config_memory(self, r: Response, index: int, offset: int, writable: bool) -> Memory:
        """The config page inside the dataspace the agent received."""
        cap = self._cap(r, index, cat.CAP_DATASPACE)
        if offset % cat.PAGE_SIZE:
            raise ProtocolError(f"config page offset {offset:#x} is not page aligned")
        if cap.size < offset + cat.PAGE_SIZE:
            raise ProtocolError(f"config dataspace of {cap.size} bytes is too small for a page at {offset:#x}")
        return RemoteMemory(self.link, cap.handle, offset, cat.PAGE_SIZE)

    def adopt_irq(self, r: Response, index: int, what: str) -> Irq:
        """A device IRQ the agent received: triggered by frames."""
        return RemoteKick(self.link, self._cap(r, index, cat.CAP_IRQ).handle)

    def new_irq(self) -> tuple[Irq, Cap, list[int]]:
        """A driver IRQ: created by the agent, its events trigger a local eventfd."""
        r = self.link.agent(cat.AGENT_OP_IRQ_CREATE)
        handle = r.caps[0].handle if r.caps else 0
        if not handle:
            raise ProtocolError(f"{self.link.name}: the agent created no IRQ")
        self.handles.append(handle)
        irq = RemoteIrq(self.link, handle)
        return irq, Cap(cat.CAP_IRQ, RIGHT_W, handle), []

    def lend(self, size: int, name: str) -> Lent:
        """A new dataspace inside L4Re (physically contiguous: block servers DMA into it)."""
        r = self.link.agent(cat.AGENT_OP_ALLOC_DS, [size, cat.AGENT_ALLOC_CONTIGUOUS])
        cap = r.caps[0] if r.caps else None
        if cap is None or cap.type != cat.CAP_DATASPACE or not cap.handle:
            raise ProtocolError(f"{self.link.name}: the agent allocated no dataspace")
        self.handles.append(cap.handle)
        memory = RemoteMemory(self.link, cap.handle, 0, cap.size)
        return Lent(memory, cap.size, Cap(cat.CAP_DATASPACE, RIGHTS_RW, cap.handle, cap.size), [])

    def fileno(self) -> int:
        """Reports a hang-up when the link ends."""
        return self.link.fileno()

    def hung_up(self) -> bool:
        """True once the link ended."""
        return self.link.dead is not None

    def check(self) -> None:
        """Raise UnavailableError if the link ended or the device server died.

        Waits call this often; at most every PING_INTERVAL seconds it asks the
        device for its ICU info (harmless on every L4Re device): a server that
        died answers with an IPC error, which nothing else would show while
        the driver only waits for completions.
        """
        self.link.check()
        now = time.monotonic()
        if now - self._pinged < PING_INTERVAL:
            return
        self._pinged = now
        r = self.link.call(self.handle, cat.L4_PROTO_IRQ, cat.ICU_OP_INFO, [cat.ICU_OP_INFO], [], 0)
        if r.flags & 0x1E == 0x04:
            raise UnavailableError(f"{self.name}: the device server is gone ({ipc_error(r.flags)})")
        if r.flags:
            raise TimeoutExpired(f"{self.name}: the device server does not answer ({ipc_error(r.flags)})")

    def close(self) -> None:
        """Release this channel's objects; the last channel on the link says goodbye (the agent
        then releases everything and resets the devices used) and closes the link."""
        entry = _LINKS.get(self.spec)
        with self.link.irq_lock:
            for handle in self.handles:
                self.link.irqs.pop(handle, None)
        if entry is not None and entry[0] is self.link and entry[1] > 1:
            entry[1] -= 1
            try:
                self.link.release(self.handles)
            except (TimeoutExpired, UnavailableError, ProtocolError):
                pass
            self.handles = []
            return
        if entry is not None and entry[0] is self.link:
            del _LINKS[self.spec]
        self.handles = []
        self.link.bye()
        self.link.close()


class L4reBackend(Backend):
    """A device of an l4vagent over a link."""

    scheme = "l4re"

    def __init__(self, url: str, target: str):
        super().__init__(url, target)
        head, opts = parse_query(target, "l4re", EXAMPLE)
        unknown = set(opts) - {"dev", "baud", "ipc-timeout"}
        if unknown:
            raise UsageError(f"{url}: unknown option {sorted(unknown)[0]!r} (options: dev, baud, ipc-timeout)")
        if not head:
            raise UsageError(f"{url}: name the link, e.g. {EXAMPLE}")
        self.link_spec = head
        self.dev = opts.get("dev")
        try:
            self.baud = int(opts.get("baud", "115200"))
            self.ipc_timeout_ms = int(opts.get("ipc-timeout", "0"))
        except ValueError:
            raise UsageError(f"{url}: baud and ipc-timeout take whole numbers") from None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Needs only the standard library (and eventfds for the driver IRQ)."""
        import os

        return (True, "") if hasattr(os, "eventfd") else (False, "needs Linux eventfd")

    def open_link(self, timeout: float, role: str = "driver"):
        """A link with a session open on it (HELLO answered)."""
        from l4vctl.backends.l4re.agent import AgentLink
        from l4vctl.backends.l4re.stream import open_stream

        # both phases of an IPC are bounded by it: twice it stays below the host's timeout,
        # so a device server that hangs is reported as such, not as a silent agent
        ipc_ms = self.ipc_timeout_ms or max(10, int(timeout * 1000 * 0.4))
        if 2 * ipc_ms >= timeout * 1000:
            raise UsageError(f"{self.url}: ipc-timeout={ipc_ms} ms must stay below half of --timeout ({timeout:g} s)")
        stream = open_stream(self.link_spec, timeout, self.baud)
        link = AgentLink(stream, timeout)
        try:
            role_code = cat.ROLE_MONITOR if role == "monitor" else cat.ROLE_DRIVER
            link.hello(role_code, ipc_ms)
        except TimeoutExpired as exc:  # nobody speaks the protocol on this line: not a slow device
            link.close()
            raise UnavailableError(str(exc)) from None
        except BaseException:
            link.close()
            raise
        return link

    def pick(self, devices: list[tuple[int, str]]) -> tuple[int, str]:
        """The device ``dev=`` names (a name, or ``#N`` for the N-th), or the only one."""
        names = ", ".join(name for _, name in devices) or "none"
        if self.dev is None:
            if len(devices) == 1:
                return devices[0]
            raise UsageError(f"{self.url}: the agent holds {len(devices)} devices ({names}); choose one with ?dev=NAME")
        for handle, name in devices:
            if name == self.dev:
                return handle, name
        if self.dev.startswith("#") and self.dev[1:].isdigit() and 0 < int(self.dev[1:]) <= len(devices):
            return devices[int(self.dev[1:]) - 1]
        raise UnavailableError(f"{self.url}: the agent holds no device {self.dev!r} (it holds: {names})")

    def inventory(self, timeout: float) -> list[dict[str, Any]]:
        """Every device of the agent with what its config page says (read as a monitor)."""
        link = self.open_link(timeout, "monitor")
        rows: list[dict[str, Any]] = []
        try:
            for handle, name in link.devices():
                row: dict[str, Any] = {"name": name, "handle": handle}
                rows.append(row)
                channel = L4reChannel(link, handle, name, "monitor", "")
                try:
                    r = channel.call(cat.L4VIRTIO_PROTOCOL, cat.OP_DEVICE_CONFIG)
                    if r.result < 0:
                        row["error"] = f"DEVICE_CONFIG: {cat.l4_error_name(r.result)}"
                        continue
                    mem = channel.config_memory(r, 0, r.words[0] if r.words else 0, False)
                    head, status, gen = mem.read([(0, 16), (0x70, 4), (0xFC, 4)])
                    magic = head[:4]
                    if magic != b"virt":
                        row["error"] = f"no L4-VIRTIO page (magic {magic!r})"
                        continue
                    dev = int.from_bytes(head[8:12], "little")
                    row.update(device_id=dev, device_class=cat.device_class(dev) or cat.device_name(dev).lower(),
                               vendor=int.from_bytes(head[12:16], "little"),
                               status=int.from_bytes(status, "little") & 0xFF,
                               generation=int.from_bytes(gen, "little"))  # fmt: skip
                except (ProtocolError, UnavailableError) as exc:
                    row["error"] = str(exc)
                finally:
                    link.release(channel.handles)
        finally:
            link.bye()
            link.close()
        return rows

    def connect(self, role: str = "driver", timeout: float = 5.0) -> Channel:
        """A channel to the chosen device (on the link this process has open to the agent, if any)."""
        entry = _LINKS.get(self.link_spec)
        if entry is not None and entry[0].dead is None:
            link = entry[0]
            handle, name = self.pick(link.devices())
            entry[1] += 1
            try:
                return L4reChannel(link, handle, name, role, self.link_spec)
            except BaseException:
                entry[1] -= 1
                raise
        link = self.open_link(timeout, role)
        try:
            handle, name = self.pick(link.devices())
            channel = L4reChannel(link, handle, name, role, self.link_spec)
        except BaseException:
            link.bye()
            link.close()
            raise
        _LINKS[self.link_spec] = [link, 1]
        return channel
