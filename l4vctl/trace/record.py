"""Recording a session's transport steps as JSON lines.

A :class:`TraceFile` is one file, opened once per process and path (several
sessions may share it: ``net ping`` drives two devices); each line is one
JSON object written and flushed at once, so a process that dies leaves a
valid prefix.  A :class:`SessionTrace` numbers one session's records.

The wrappers put the recording around what a session already uses, so an
untraced session runs exactly the code it always ran:

* :class:`TraceChannel` wraps the backend's channel: every IPC call and its
  reply, the memory the driver lends, the IRQs attaching brings;
* :class:`TracedPage` wraps the config page: page writes (with the field the
  offset names), cmd words and when the device clears them, status reads
  that show a new status.  It hides the local mapping, so every access
  of the session goes through it;
* :class:`TracedIrq` wraps an IRQ: kicks (trigger) and interrupts (drain);
* :class:`TracedVirtqueue` replaces a virtqueue's class: every request posted
  (its buffers and the bytes the device reads) and completed (used length,
  a hash of what the device wrote, a decoded summary for the device class).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from l4vctl import catalog as cat
from l4vctl.backends.base import Channel, Memory, Response, map_local
from l4vctl.errors import L4vError, UnavailableError
from l4vctl.trace import FORMAT_VERSION
from l4vctl.virtqueue import Virtqueue

if TYPE_CHECKING:
    from l4vctl._session.queues import QueueSetup
    from l4vctl.backends.base import Lent
    from l4vctl.caps import Irq
    from l4vctl.wire import Cap

#: Operation names of the L4-VIRTIO interface (the current era's names; classic opcode 2 kept).
OP_NAMES = {**cat.VIRTIO_OPCODES["classic"], **cat.VIRTIO_OPCODES["current"]}


def op_name(label: int, opcode: int) -> str:
    """What a request is: ``SET_STATUS``, ``ICU BIND``, ``MONITOR STATS`` ..."""
    if label == cat.L4VIRTIO_PROTOCOL:
        return OP_NAMES.get(opcode, f"opcode {opcode}")
    if label == cat.L4_PROTO_IRQ:
        return "ICU " + cat.ICU_OPCODES.get(opcode, str(opcode))
    if label == cat.L4VCTL_PROTO_MONITOR:
        return "MONITOR " + ("STATS" if opcode == cat.MONITOR_OP_STATS else str(opcode))
    return f"label {label} opcode {opcode}"


def cap_json(cap: Any) -> dict[str, Any]:
    """A capability item as a trace shows it (its fd is never recorded: it differs every run)."""
    kind = getattr(cap, "type", 0)
    return {
        "type": cat.CAP_TYPES.get(kind, str(kind)),
        "rights": getattr(cap, "rights", 0),
        "size": getattr(cap, "size", 0),
    }


def status_flags(value: int) -> list[str]:
    """Names of the status bits set in ``value``."""
    names, _unknown = cat.flag_names(value, cat.STATUS_BITS)
    return names


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def default_path() -> str:
    """Where a ``trace+`` URL without ``?trace=FILE`` records: $L4VCTL_TRACE_DIR or the current directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(os.environ.get("L4VCTL_TRACE_DIR") or ".", f"l4vctl-trace-{stamp}-{os.getpid()}.jsonl")


# -- the file ------------------------------------------------------------------------------


class TraceFile:
    """One trace file of this process: a header line, then the records of every session in it."""

    _open: ClassVar[dict[str, TraceFile]] = {}

    def __init__(self, path: str):
        self.path = path
        try:
            # unbuffered: each record is one write(2), in the file even if this process is killed right after
            self.f = open(path, "wb", buffering=0)  # noqa: SIM115 - closed when its sessions end
        except OSError as exc:
            raise UnavailableError(f"cannot write the trace {path}: {exc.strerror or exc}") from None
        self.t0 = time.monotonic()
        self.sessions = 0
        self.users = 0
        from l4vctl import __version__

        self.write({"t": 0.0, "kind": "trace", "format": FORMAT_VERSION, "version": __version__,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()})  # fmt: skip

    @classmethod
    def get(cls, path: str) -> TraceFile:
        """The open trace file at ``path`` (opened, and truncated, by the first session of this process)."""
        key = os.path.abspath(path)
        tf = cls._open.get(key)
        if tf is None or tf.f.closed:
            tf = cls._open[key] = TraceFile(path)
        tf.users += 1
        return tf

    def write(self, record: dict[str, Any]) -> None:
        """One line, in one write."""
        try:
            self.f.write((_dumps(record) + "\n").encode())
        except OSError as exc:
            raise UnavailableError(f"cannot write the trace {self.path}: {exc.strerror or exc}") from None

    def release(self) -> None:
        """One user fewer; the last one closes the file."""
        self.users -= 1
        if self.users <= 0 and not self.f.closed:
            self.f.close()
            TraceFile._open.pop(os.path.abspath(self.path), None)


class SessionTrace:
    """The records of one session: each gets its time, the session number and its kind first."""

    def __init__(self, tf: TraceFile, url: str, role: str):
        self.file = tf
        tf.sessions += 1
        self.sid = tf.sessions
        #: set while a virtqueue kicks: (queue, avail.idx) for the kick a TracedIrq records
        self.kicking: tuple[int, int] | None = None
        self.page: TracedPage | None = None
        #: the driver's IRQs: an interrupt pending when completions are reaped is recorded before them
        self.driver_irqs: list[TracedIrq] = []
        self.closed = False
        self.emit("session", url=url, role=role)

    def emit(self, kind: str, **fields: Any) -> None:
        """Write one record of this session."""
        if self.closed:
            return
        record = {"t": round(time.monotonic() - self.file.t0, 6), "s": self.sid, "kind": kind}
        record.update(fields)
        self.file.write(record)

    def end(self) -> None:
        """The session's last record."""
        if not self.closed:
            self.emit("end")
            self.closed = True
            self.file.release()


# -- the channel -----------------------------------------------------------------------------


class _Region:
    __slots__ = ("base", "size", "memory", "name")

    def __init__(self, base: int, size: int, memory: Memory, name: str):
        self.base = base
        self.size = size
        self.memory = memory
        self.name = name


class TraceChannel(Channel):
    """A channel that records what goes through it and hands out traced pages, IRQs and queues."""

    def __init__(self, inner: Channel, rec: SessionTrace):
        self.inner = inner
        self.rec = rec
        self.name = inner.name
        self.device_address_base = getattr(inner, "device_address_base", Channel.device_address_base)
        self.peer_pid = getattr(inner, "peer_pid", None)
        self._last: tuple[int, int, list[int]] = (0, -1, [])
        self._lent: list[tuple[Lent, str]] = []  # lent, not yet registered
        self.regions: list[_Region] = []
        self.device_class: str | None = None

    # -- calls

    def call(self, label: int, opcode: int, words: Sequence[int] = (), caps: Sequence[Any] = (),
             fds: Sequence[int] = (), timeout: float | None = None) -> Response:  # fmt: skip
        """The inner channel's call, recorded with its reply or its failure."""
        ev: dict[str, Any] = {"label": label, "opcode": opcode, "op": op_name(label, opcode), "words": list(words),
                              "caps": [cap_json(c) for c in caps]}  # fmt: skip
        lent = None
        if label == cat.L4VIRTIO_PROTOCOL and opcode == cat.OP_REGISTER_DS and caps:
            lent = next((pair for pair in self._lent if pair[0].cap is caps[0]), None)
            if lent is not None:
                ev["lend"] = lent[1]
        self._last = (label, opcode, list(words))
        try:
            r = self.inner.call(label, opcode, words, caps, fds, timeout)
        except L4vError as exc:
            ev["error"] = {"type": exc.type, "message": exc.message}
            self.rec.emit("ipc", **ev)
            raise
        ev.update(result=r.result, result_name=cat.l4_error_name(r.result), reply=list(r.words),
                  reply_caps=[cap_json(c) for c in r.caps])  # fmt: skip
        self.rec.emit("ipc", **ev)
        if lent is not None:
            self._lent.remove(lent)
            if r.result >= 0 and words:
                self.regions.append(_Region(words[0], lent[0].size, lent[0].memory, lent[1]))
        return r

    def fileno(self) -> int:
        """The inner channel's descriptor."""
        return self.inner.fileno()

    def hung_up(self) -> bool:
        """Whether the device went away."""
        return self.inner.hung_up()

    def check(self) -> None:
        """The inner channel's check."""
        self.inner.check()

    # -- what attaching and lending bring

    def config_memory(self, r: Response, index: int, offset: int, writable: bool) -> Memory:
        """The config page, wrapped so that every access of the session is seen."""
        hook = getattr(self.inner, "config_memory", None)
        if hook is not None:
            memory = hook(r, index, offset, writable)
        else:
            memory = map_local(r.fd(index, cat.CAP_DATASPACE), r.caps[index].size, offset, writable)
        page = TracedPage(memory, self.rec, self)
        self.rec.page = page
        return page

    def adopt_irq(self, r: Response, index: int, what: str) -> Irq:
        """The device IRQ, wrapped to record kicks; its notify index is the one GET_DEVICE_IRQ asked for."""
        from l4vctl.caps import Irq

        hook = getattr(self.inner, "adopt_irq", None)
        irq = hook(r, index, what) if hook is not None else Irq.adopt(r.fd(index, cat.CAP_IRQ), what)
        label, opcode, words = self._last
        notify = words[0] if label == cat.L4VIRTIO_PROTOCOL and opcode == cat.OP_GET_DEVICE_IRQ and words else None
        return TracedIrq(irq, self.rec, notify)  # type: ignore[return-value]  # an Irq in all but class

    def new_irq(self) -> tuple[Irq, Cap, list[int]]:
        """The driver IRQ, wrapped to record interrupts (bound at ICU index 0)."""
        irq, cap, fds = self.inner.new_irq()
        traced = TracedIrq(irq, self.rec, 0, driver=True)
        self.rec.driver_irqs.append(traced)
        return traced, cap, fds  # type: ignore[return-value]

    def lend(self, size: int, name: str) -> Lent:
        """Lent memory; its device address is learnt from the REGISTER_DS that follows."""
        lent = self.inner.lend(size, name)
        self._lent.append((lent, name))
        return lent

    def observe_virtqueue(self, vq: Virtqueue, setup: QueueSetup) -> None:
        """Record the requests of a virtqueue the session made (its class becomes the traced one)."""
        vq.__class__ = TracedVirtqueue
        tvq: TracedVirtqueue = vq  # type: ignore[assignment]
        tvq._trace_init(self)
        notify = getattr(vq.kick_irq, "index", None)
        self.rec.emit("queue", queue=vq.index, num=vq.num, desc=setup.desc, avail=setup.avail, used=setup.used,
                      event_idx=vq.event_idx, indirect=vq.indirect, notify_index=notify)  # fmt: skip

    # -- memory the device shares, by device address

    def read_device(self, addr: int, length: int) -> bytes:
        """Bytes of lent memory at a device address (b"" where no lent region holds them)."""
        if length <= 0:
            return b""
        for r in self.regions:
            if r.base <= addr and addr + length <= r.base + r.size:
                view = r.memory.view()
                off = addr - r.base
                if view is not None:
                    return bytes(view[off : off + length])
                return r.memory.read([(off, length)])[0]
        return b""

    def close(self) -> None:
        """End the session's records and the inner connection."""
        self.rec.end()
        self.inner.close()


# -- the config page ---------------------------------------------------------------------------


class TracedPage(Memory):
    """The config page seen through ranges only: writes and telling reads are recorded."""

    def __init__(self, inner: Memory, rec: SessionTrace, channel: TraceChannel):
        self.inner = inner
        self.size = inner.size
        self.rec = rec
        self.channel = channel
        self.fields: list[tuple[int, int, str]] = []  # (offset, size, name), once the layout is known
        self.status_at: tuple[int, int] | None = None
        self.cmd_at: tuple[int, int] | None = None
        self.last_status: int | None = None
        self.cmd_pending: tuple[int, float] | None = None  # (word, when written)
        self.abi: str | None = None
        self.device_id: int | None = None

    def describe_layout(self, abi: str, stride: int) -> None:
        """The session read the page in ``abi`` with queue entries ``stride`` bytes long: name what it writes."""
        from l4vctl import page as pg

        self.abi = abi
        hc = pg.header_codec(abi)
        data = self.read([(0, self.size)])[0]
        hdr = hc.unpack(data)
        fields: list[tuple[int, int, str]] = []
        for name, (off, size, _fmt, count) in hc.fields.items():
            if count and size == 4 * count:  # a word array: name each word
                fields += [(off + 4 * i, 4, f"{name}[{i}]") for i in range(count)]
            else:
                fields.append((off, size, name))
        qoff, nq = hdr["queues_offset"], hdr["num_queues"]
        if qoff >= cat.HEADER_SIZE and qoff + nq * stride <= len(data):
            qc = pg.queue_codec(stride)
            for i in range(nq):
                fields += [(qoff + i * stride + off, size, f"queue[{i}].{name}")
                           for name, (off, size, _f, _c) in qc.fields.items()]  # fmt: skip
        self.fields = sorted(fields)
        self.status_at = hc.fields["status"][:2]
        self.cmd_at = hc.fields["cmd"][:2] if "cmd" in hc.fields else None
        self.device_id = hdr["device"]
        self.channel.device_class = cat.device_class(self.device_id)
        self.last_status = hdr["status"]
        self.rec.emit("page", op="map", abi=abi, stride=stride, identity=page_identity(data, abi),
                      status=hdr["status"], flags=status_flags(hdr["status"]))  # fmt: skip

    def field(self, offset: int, size: int) -> str | None:
        """The header field (or queue entry field) at ``offset``."""
        for off, fsize, name in self.fields:
            if off == offset and fsize == size:
                return name
            if off <= offset < off + fsize:
                return f"{name}+{offset - off}" if offset != off else name
        return None

    def read(self, ranges: Iterable[tuple[int, int]]) -> list[bytes]:
        """The inner memory's bytes; a read of the status that shows a new value, or of a cleared cmd, is recorded."""
        ranges = list(ranges)
        out = self.inner.read(ranges)
        st, cmd = self.status_at, self.cmd_at
        if st is None:
            return out
        for (off, length), data in zip(ranges, out, strict=True):
            if off <= st[0] and st[0] + st[1] <= off + length:
                value = int.from_bytes(data[st[0] - off : st[0] - off + st[1]], "little")
                if value != self.last_status:
                    self.last_status = value
                    self.rec.emit("status", status=value, flags=status_flags(value))
            pending = self.cmd_pending
            if pending is not None and cmd is not None and off <= cmd[0] and cmd[0] + cmd[1] <= off + length:
                cleared = not int.from_bytes(data[cmd[0] - off : cmd[0] - off + cmd[1]], "little")
                if cleared:
                    self.cmd_pending = None
                    self.rec.emit("cmd", op="cleared", word=pending[0], after=round(time.monotonic() - pending[1], 6))
        return out

    def write(self, items: Iterable[tuple[int, bytes]]) -> None:
        """Each write recorded (offset, field, old and new value), then made, in order."""
        for off, data in items:
            data = bytes(data)
            old = self.inner.read([(off, len(data))])[0]
            name = self.field(off, len(data))
            new = int.from_bytes(data, "little")
            if name == "cmd":
                cmd_byte = new >> 24
                self.rec.emit("cmd", op="write", word=new, cmd=cat.CMD_WORDS.get(cmd_byte, (f"{cmd_byte:#x}",))[0],
                              arg=new & cat.CMD_ARG_MASK)  # fmt: skip
                self.cmd_pending = (new, time.monotonic()) if new else None
            else:
                self.rec.emit("page", op="write", offset=off, size=len(data), field=name,
                              old=int.from_bytes(old, "little"), new=new)  # fmt: skip
            self.inner.write([(off, data)])

    def view(self) -> memoryview | None:
        """None: the session must go through :meth:`read` and :meth:`write`."""
        return None

    def close(self) -> None:
        """Close the inner memory."""
        self.inner.close()


def page_identity(data: bytes, abi: str) -> dict[str, Any]:
    """What a replay compares of a config page: device, vendor, queues, offered features, device config.

    Left out: the generation counter, the status (compared step by step) and
    a net device's MAC address (random on many devices).
    """
    from l4vctl import page as pg

    hdr = pg.header_codec(abi).unpack(data)
    nq, qoff = hdr["num_queues"], hdr["queues_offset"]
    limit = qoff if nq and cat.HEADER_SIZE <= qoff <= len(data) else len(data)
    try:
        config = pg.device_config_fields(data, hdr["device"], abi, limit)[0]
    except Exception:
        config = {}
    config = {k: _jsonable(v) for k, v in config.items() if k != "mac"}
    return {"device": hdr["device"], "vendor": hdr["vendor"], "num_queues": nq, "queues_offset": qoff,
            "dev_features_map": list(hdr["dev_features_map"]), "config": config}  # fmt: skip


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# -- IRQs --------------------------------------------------------------------------------------


class TracedIrq:
    """An IRQ whose triggers (kicks) and drains (interrupts) are recorded; everything else is the inner IRQ's."""

    __slots__ = ("inner", "rec", "index", "driver")

    def __init__(self, inner: Irq, rec: SessionTrace, index: int | None, driver: bool = False):
        self.inner = inner
        self.rec = rec
        self.index = index  # the notify index (None: the device IRQ REGISTER_IFACE handed out)
        self.driver = driver

    @property
    def fd(self) -> int:
        """The inner IRQ's descriptor (waits poll it)."""
        return self.inner.fd

    def trigger(self) -> bool:
        """Trigger, recorded as a kick (of the queue kicking, or of a pending cmd word)."""
        ok = self.inner.trigger()
        rec = self.rec
        ev: dict[str, Any] = {"index": self.index, "delivered": ok}
        if rec.kicking is not None:
            ev["queue"], ev["avail_idx"] = rec.kicking
            ev["notified"] = True
        elif rec.page is not None and rec.page.cmd_pending is not None:
            ev["cause"] = "cmd"
        rec.emit("kick", **ev)
        return ok

    def drain(self) -> int:
        """Consume pending triggers; an interrupt is recorded with how many there were."""
        n = self.inner.drain()
        if n:
            self.rec.emit("irq", index=self.index, count=n)
        return n

    def wait(self, timeout: float | None) -> bool:
        """The inner wait; an interrupt it consumed is recorded."""
        got = self.inner.wait(timeout)
        if got:
            self.rec.emit("irq", index=self.index, count=1)
        return got

    def close(self) -> None:
        """Close the inner IRQ; interrupts the driver left pending are recorded first."""
        if self.driver and getattr(self.inner, "fd", -1) >= 0:
            self.drain()
        self.inner.close()

    def __repr__(self) -> str:
        return f"<TracedIrq {self.inner!r} index={self.index}>"


# -- virtqueues --------------------------------------------------------------------------------------


class TracedVirtqueue(Virtqueue):
    """A virtqueue whose requests are recorded when posted and when completed."""

    _tc: TraceChannel
    _posted: dict[int, tuple[list[tuple[int, int, bool]], bytes]]

    def _trace_init(self, channel: TraceChannel) -> None:
        self._tc = channel
        self._posted = {}

    def add(self, bufs: Sequence[tuple[int, int, bool]], token: Any) -> int:
        """Post a chain; recorded with the bytes the device will read."""
        head = super().add(bufs, token)
        self._trace_posted(head, bufs, None)
        return head

    def add_indirect(self, table_view: memoryview, table_addr: int, bufs: Sequence[tuple[int, int, bool]],
                     token: Any) -> int:  # fmt: skip
        """Post an indirect chain; recorded like a direct one, with the table's device address."""
        head = super().add_indirect(table_view, table_addr, bufs, token)
        self._trace_posted(head, bufs, table_addr)
        return head

    def _trace_bytes(self, chain: list[tuple[int, int, bool]], written: bool) -> bytes:
        """The bytes of the chain's device-readable (or, ``written``, device-written) buffers, as the driver sees them.

        Memory that is not mapped here is read from its local shadow: it is
        what the driver wrote (pushed at the next kick) or what the last reap
        pulled, without a round trip of its own.
        """
        dma = self._dma
        if dma is None:
            read = self._tc.read_device
            return b"".join(read(a, n) for a, n, w in chain if w == written)
        out = []
        for a, n, w in chain:
            if w != written:
                continue
            region = next((r for r in dma.regions if r.base <= a and a + n <= r.end), None)
            out.append(bytes(region.shadow[a - region.base : a - region.base + n]) if region is not None else b"")
        return b"".join(out)

    def _trace_posted(self, head: int, bufs: Sequence[tuple[int, int, bool]], table: int | None) -> None:
        chain = [(a, n, bool(w)) for a, n, w in bufs]
        out = self._trace_bytes(chain, False)
        self._posted[head] = (chain, out)
        self._tc.rec.emit("request", phase="posted", queue=self.index, head=head, avail_idx=self.avail_idx,
                          bufs=[list(b) for b in chain], table=table, out_len=sum(n for _a, n, w in chain if not w),
                          in_len=sum(n for _a, n, w in chain if w), out_b64=base64.b64encode(out).decode())  # fmt: skip

    def kick(self) -> bool:
        """Publish and notify; a kick the device asked to skip is recorded as such."""
        rec = self._tc.rec
        before = self.kicked_idx
        rec.kicking = (self.index, self.avail_idx)
        try:
            wanted = super().kick()
        finally:
            rec.kicking = None
        if not wanted and self.kicked_idx != before:
            rec.emit("kick", index=getattr(self.kick_irq, "index", None), queue=self.index,
                     avail_idx=self.avail_idx, notified=False)  # fmt: skip
        return wanted

    def reap(self) -> list[tuple[Any, int]]:
        """Completions; each recorded with its head, used length and what the device wrote."""
        first = self.last_used
        # A driver that finds completions without sleeping (it polled, or looked again after a timeout)
        # leaves the interrupt that signalled them pending: consume and record it before they are taken,
        # so that the trace shows every interrupt the device sent.  Consuming before looking loses no
        # wake-up: one sent after this look stays pending for the driver's next wait.
        for irq in self._tc.rec.driver_irqs:
            if getattr(irq.inner, "fd", -1) >= 0:
                irq.drain()
        done = super().reap()
        if done:
            for k, (_token, used) in enumerate(done):
                slot = (first + k) % self.num
                head = self._used_id[slot]
                chain, out = self._posted.pop(head, ([], b""))
                inbytes = self._trace_bytes(chain, True)
                written = inbytes[:used] if used <= len(inbytes) else inbytes
                last = inbytes[-1] if inbytes else None
                self._tc.rec.emit("request", phase="completed", queue=self.index, head=head, used=used,
                                  used_idx=(first + k + 1) & 0xFFFF, out_len=len(out), in_len=len(inbytes),
                                  last_byte=last,
                                  in_sha256=hashlib.sha256(written).hexdigest(),
                                  summary=summarize(self._tc.device_class, self.index, out, inbytes, used))  # fmt: skip
        return done


# -- summaries -------------------------------------------------------------------------------------


def summarize(cls: str | None, queue: int, out: bytes, inbytes: bytes | None, used: int) -> dict[str, Any]:
    """What a request is, for the device class: blk type/sector/length/status, net frame, console text, rng length."""
    from l4vctl.formats.fast import codec

    if cls == "blk":
        hdr = codec("l4virtio_block_header_t")
        if len(out) < hdr.size:
            return {"class": "blk", "malformed": True}
        rtype, _ioprio, sector = hdr.values(out)
        s: dict[str, Any] = {"class": "blk", "type": rtype, "type_name": cat.BLK_REQUEST_TYPES.get(rtype),
                             "sector": sector, "out_data": len(out) - hdr.size}  # fmt: skip
        if inbytes is not None:
            s["in_data"] = max(0, len(inbytes) - 1)
            if inbytes:
                s["status"] = inbytes[-1]
                s["status_name"] = cat.BLK_STATUS.get(inbytes[-1], f"{inbytes[-1]:#x}")
        return s
    if cls == "net":
        nh = codec("l4virtio_net_header_t").size
        data = out[nh:] if queue == cat.NET_TX_QUEUE else (inbytes[nh:used] if inbytes else b"")
        s = {"class": "net", "direction": "tx" if queue == cat.NET_TX_QUEUE else "rx"}
        if queue != cat.NET_TX_QUEUE and inbytes is None:
            return s  # an empty receive buffer
        s["frame_len"] = len(data)
        if len(data) >= 14:
            s.update(dst=data[0:6].hex(":"), src=data[6:12].hex(":"), ethertype=int.from_bytes(data[12:14], "big"))
        return s
    if cls == "console":
        data = out if inbytes is None or not used else inbytes[:used]
        return {"class": "console", "bytes": len(data), "text": data[:64].decode("ascii", "backslashreplace")}
    if cls == "rng":
        return {"class": "rng", "length": used}
    return {}
