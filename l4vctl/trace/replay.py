"""Re-driving a device with the driver steps of a trace, and finding where it answers differently.

The replay is a driver of its own, made of the steps the trace recorded, in
their order, for every session of the trace: IPC calls (with new memory and
IRQs where the original passed capabilities), page writes, cmd words, kicks
and requests (the same buffers at the same device addresses, with the bytes
the original driver gave the device).  At each step where the device
answered, the answer is compared with the recorded one:

* an IPC call: its result, its reply words (not for the emulator's monitor
  calls, whose counters change) and the kinds of capabilities in the reply;
* the config page when it is mapped: device id, vendor, queue count and
  offset, offered features and the device config (not a net MAC address);
* a status read that showed a new status: the status byte;
* a cmd word the device cleared: that it is cleared within the timeout;
* a completed request: that it completes, its used length, the SHA-256 of
  the bytes the device wrote (up to the used length) and the last byte it
  wrote (a blk status byte); for an rng device, whose bytes are random,
  the used length only.

Never compared: times, interrupts (when they come depends on timing),
whether a kick was suppressed, fds, the generation counter, addresses of
memory outside the trace's control.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat
from l4vctl.errors import FormatError, L4vError, UnavailableError, UsageError

if TYPE_CHECKING:
    from l4vctl.backends.base import Backend, Channel, Lent, Memory
    from l4vctl.trace.read import Trace
    from l4vctl.virtqueue import Virtqueue


#: What a record with the right keys but values no driver could have made raises in a step.
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError, struct.error)
#: Most sessions a replay keeps open at once (each may start an emulator).
MAX_SESSIONS = 16
#: Most memory one lent dataspace of a replay may take.
MAX_LEND = 1 << 30
#: Device classes whose data differs every run (entropy): their requests are compared by length only.
RANDOM_DATA = frozenset({"rng"})


class Divergence(Exception):
    """The device answered a step differently from the recording."""

    def __init__(self, ev: dict[str, Any], what: str, expected: Any, got: Any):
        super().__init__(what)
        self.event = ev
        self.what = what
        self.expected = expected
        self.got = got

    def to_json(self) -> dict[str, Any]:
        """The divergence as ``trace replay --json`` reports it."""
        ev = {k: v for k, v in self.event.items() if k not in ("out_b64", "line")}
        return {"line": self.event.get("line"), "session": self.event.get("s"), "kind": self.event.get("kind"),
                "what": self.what, "expected": self.expected, "got": self.got, "step": ev}  # fmt: skip


class _Session:
    """What one replayed session holds."""

    def __init__(self, backend: Backend, channel: Channel, url: str, role: str):
        self.role = role
        self.backend = backend
        self.channel: Channel | None = channel
        self.url = url
        self.page: Memory | None = None
        self.abi = cat.DEFAULT_ABI
        self.irqs: dict[int | None, Any] = {}
        self.driver_irq: Any = None
        self.lent: list[tuple[int, Lent]] = []  # (device address, lent memory)
        self.vqs: dict[int, Virtqueue] = {}
        self.views: list[memoryview] = []
        self.chains: dict[tuple[int, int], list[tuple[int, int, bool]]] = {}
        self.done: dict[int, dict[int, int]] = {}
        self.broken = False

    def view_at(self, addr: int, length: int) -> memoryview:
        for base, lent in self.lent:
            if base <= addr and addr + length <= base + lent.size:
                view = lent.memory.view()
                if view is None:
                    raise UnavailableError(f"{self.url}: replaying requests needs memory mapped here")
                part = view[addr - base : addr - base + length]
                self.views.append(part)
                return part
        raise FormatError(f"device address {addr:#x}+{length:#x} is in no memory the trace lent")

    def close(self) -> None:
        for vq in self.vqs.values():
            vq.close()
        self.vqs.clear()
        for view in self.views:
            view.release()
        self.views.clear()
        for irq in {id(i): i for i in [*self.irqs.values(), self.driver_irq] if i is not None}.values():
            irq.close()
        self.irqs.clear()
        self.driver_irq = None
        if self.page is not None:
            self.page.close()
            self.page = None
        for _base, lent in self.lent:
            lent.close()
        self.lent.clear()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.backend.close()


class Replay:
    """Replay a loaded trace; :meth:`run` returns how many steps were replayed or raises Divergence."""

    def __init__(self, trace: Trace, devices: dict[int, str], timeout: float):
        self.trace = trace
        self.devices = devices
        self.timeout = timeout
        self.sessions: dict[int, _Session] = {}
        self.steps = 0

    def run(self) -> int:
        """Replay every step; the number of steps (Divergence at the first that differs)."""
        try:
            for ev in self.trace.events:
                try:
                    self.step(ev)
                except FormatError as exc:
                    where = f"{self.trace.path}:{ev.get('line')}: "
                    if exc.message.startswith(self.trace.path + ":"):
                        raise
                    raise FormatError(where + exc.message) from None
                except _MALFORMED as exc:
                    # a record that has the right keys but values no driver could have made
                    raise FormatError(f"{self.trace.path}:{ev.get('line')}: malformed {ev.get('kind')} record "
                                      f"({type(exc).__name__}: {exc})") from None  # fmt: skip
                self.steps += 1
        finally:
            self.close()
        return self.steps

    def close(self) -> None:
        """Close every session still open (its memory, IRQs, connection and backend)."""
        for s in self.sessions.values():
            try:
                s.close()
            except Exception:
                pass
        self.sessions.clear()

    def urls(self) -> dict[int, str]:
        """The device each session of the trace is replayed on."""
        return {sid: self.devices.get(sid, ev["url"]) for sid, ev in self.trace.sessions().items()}

    # -- steps

    def step(self, ev: dict[str, Any]) -> None:
        """Replay one step (and compare what the device answered)."""
        kind = ev["kind"]
        if kind == "session":
            self._open(ev)
            return
        s = self.sessions.get(ev["s"])
        if s is None:
            raise FormatError(f"{self.trace.path}:{ev['line']}: a step of session {ev['s']} before its start")
        if kind == "end":
            s.close()
            del self.sessions[ev["s"]]
        elif kind == "ipc":
            self._ipc(s, ev)
        elif kind == "page":
            self._page(s, ev)
        elif kind == "cmd":
            self._cmd(s, ev)
        elif kind == "status":
            got = self._read(s, "status")
            if got != ev["status"]:
                from l4vctl.trace.read import status_text

                what = "the device refused FEATURES_OK" if (
                    ev["status"] & cat.STATUS_FEATURES_OK and not got & cat.STATUS_FEATURES_OK
                ) else "the status read back differs"  # fmt: skip
                raise Divergence(ev, what, status_text(ev["status"]), status_text(got))
        elif kind == "kick":
            self._kick(s, ev)
        elif kind == "queue":
            self._queue(s, ev)
        elif kind == "request":
            if ev["phase"] == "posted":
                self._post(s, ev)
            else:
                self._complete(s, ev)
        # interrupts are not replayed: when they come depends on timing

    def _open(self, ev: dict[str, Any]) -> None:
        from l4vctl.backends import open_backend

        if ev["s"] in self.sessions:
            raise FormatError(f"session {ev['s']} starts twice")
        if len(self.sessions) >= MAX_SESSIONS:
            raise FormatError(f"more than {MAX_SESSIONS} sessions open at once")
        url = self.devices.get(ev["s"], ev["url"])
        backend = open_backend(url, traced=False)
        try:
            if not backend.live:
                raise UsageError(f"{url}: a saved page cannot be driven")
            channel = backend.connect(ev.get("role", "driver"), self.timeout)
        except BaseException:
            backend.close()
            raise
        self.sessions[ev["s"]] = _Session(backend, channel, url, ev.get("role", "driver"))

    def _ipc(self, s: _Session, ev: dict[str, Any]) -> None:
        label, opcode, words = ev["label"], ev["opcode"], [int(w) for w in ev["words"]]
        if s.broken or s.channel is None:
            return  # the original went on without a connection too; its steps have nothing to compare
        ch = s.channel
        caps: list[Any] = []
        fds: list[int] = []
        new_lent = None
        for c in ev.get("caps", []):
            if c.get("type") == "dataspace":
                size = c.get("size") or (words[2] if len(words) > 2 else 4096)
                if not isinstance(size, int) or not 0 < size <= MAX_LEND:
                    raise FormatError(f"{self.trace.path}:{ev['line']}: lends {size!r} bytes (at most {MAX_LEND})")
                new_lent = ch.lend(size, ev.get("lend") or "l4vctl-replay")
                caps.append(new_lent.cap)
                fds += new_lent.fds
            elif c.get("type") == "irq":
                irq, cap, irq_fds = ch.new_irq()
                s.driver_irq = irq
                caps.append(cap)
                fds += irq_fds
        if new_lent is not None:
            s.lent.append((words[0] if words else 0, new_lent))
        try:
            r = ch.call(label, opcode, words, caps, fds, self.timeout)
        except L4vError as exc:
            s.broken = True
            expected = ev.get("error", {}).get("type") if isinstance(ev.get("error"), dict) else None
            if expected == exc.type:
                return
            raise Divergence(ev, f"{ev.get('op')} failed", _ipc_expected(ev), {"error": exc.type,
                             "message": exc.message}) from None  # fmt: skip
        try:
            if "error" in ev:
                raise Divergence(ev, f"{ev.get('op')} was answered", _ipc_expected(ev),
                                 {"result": r.result, "result_name": cat.l4_error_name(r.result)})  # fmt: skip
            got = {"result": r.result, "result_name": cat.l4_error_name(r.result)}
            if r.result != ev.get("result"):
                raise Divergence(ev, f"{ev.get('op')} answered another result", _ipc_expected(ev), got)
            if label != cat.L4VCTL_PROTO_MONITOR:
                if list(r.words) != list(ev.get("reply", [])):
                    raise Divergence(ev, f"{ev.get('op')} replied other words", ev.get("reply"), list(r.words))
                kinds = [cat.CAP_TYPES.get(c.type, str(c.type)) for c in r.caps]
                if kinds != [c.get("type") for c in ev.get("reply_caps", [])]:
                    raise Divergence(ev, f"{ev.get('op')} replied other capabilities",
                                     [c.get("type") for c in ev.get("reply_caps", [])], kinds)  # fmt: skip
            if r.result >= 0:
                self._take_reply(s, ev, r, words)
        finally:
            r.close()

    def _take_reply(self, s: _Session, ev: dict[str, Any], r: Any, words: list[int]) -> None:
        ch = s.channel
        assert ch is not None
        label, opcode = ev["label"], ev["opcode"]
        if label != cat.L4VIRTIO_PROTOCOL:
            return
        if opcode == cat.OP_DEVICE_CONFIG and r.words:
            s.page = ch.config_memory(r, 0, r.words[0], writable=s.role != "monitor")
        elif opcode == cat.OP_GET_DEVICE_IRQ and words:
            old = s.irqs.pop(words[0], None)
            if old is not None:
                old.close()
            s.irqs[words[0]] = ch.adopt_irq(r, 0, "device IRQ")
        elif opcode == cat.OP_REGISTER_IFACE:
            s.irqs[None] = ch.adopt_irq(r, 0, "device IRQ")
            s.page = ch.config_memory(r, 1, 0, writable=True)

    def _read(self, s: _Session, name: str) -> int:
        from l4vctl import page as pg

        if s.page is None:
            raise FormatError(f"{self.trace.path}: a page access before the page was mapped")
        off, size, _fmt, _count = pg.header_codec(s.abi).fields[name]
        return int.from_bytes(s.page.read([(off, size)])[0], "little")

    def _page(self, s: _Session, ev: dict[str, Any]) -> None:
        from l4vctl.trace.record import page_identity

        if s.page is None:
            raise FormatError(f"{self.trace.path}:{ev['line']}: a page step before the page was mapped")
        if ev["op"] == "map":
            abi = ev.get("abi")
            s.abi = abi if isinstance(abi, str) and abi in cat.ABIS else cat.DEFAULT_ABI
            data = s.page.read([(0, s.page.size)])[0]
            got = page_identity(data, s.abi)
            expected = ev.get("identity")
            if got != expected:
                want, have = _differences(expected if isinstance(expected, dict) else {}, got)
                raise Divergence(ev, "the config page describes another device: " + ", ".join(have), want, have)
        elif ev["op"] == "write":
            size, new = ev["size"], ev["new"]
            s.page.write([(ev["offset"], (new & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))])

    def _cmd(self, s: _Session, ev: dict[str, Any]) -> None:
        from l4vctl import page as pg

        if s.page is None:
            raise FormatError(f"{self.trace.path}:{ev['line']}: a cmd step before the page was mapped")
        off, size, _f, _c = pg.header_codec(s.abi).fields["cmd"]
        if ev["op"] == "write":
            s.page.write([(off, (ev["word"] & 0xFFFFFFFF).to_bytes(size, "little"))])
            return
        deadline = time.monotonic() + self.timeout
        delay = 20e-6
        while self._read(s, "cmd"):
            if time.monotonic() > deadline:
                raise Divergence(ev, f"the device did not clear cmd {ev['word']:#010x}", "cleared",
                                 f"still set after {self.timeout:g} s")  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, 0.002)

    def _kick(self, s: _Session, ev: dict[str, Any]) -> None:
        queue = ev.get("queue")
        if queue is not None and queue in s.vqs:
            s.vqs[queue].kick()
            return
        irq = s.irqs.get(ev.get("index"))
        if irq is None:
            irq = s.irqs.get(None) or next(iter(s.irqs.values()), None)
        if irq is not None:
            irq.trigger()

    def _queue(self, s: _Session, ev: dict[str, Any]) -> None:
        from l4vctl.formats.fast import ring as ring_geometry
        from l4vctl.virtqueue import Virtqueue

        num = ev["num"]
        if num <= 0 or num & (num - 1) or num > cat.MAX_QUEUE_SIZE:
            raise FormatError(f"{self.trace.path}:{ev['line']}: queue size {num} is not a power of two")
        lay = ring_geometry().simple_layout(num)
        if (
            ev["avail"] - ev["desc"] != lay["avail"] - lay["desc"]
            or ev["used"] - ev["desc"] != lay["used"] - lay["desc"]
        ):
            raise FormatError(f"{self.trace.path}:{ev['line']}: queue {ev['queue']} is not in the simple ring layout")
        memory = s.view_at(ev["desc"], lay["total"])
        kick = s.irqs.get(ev.get("notify_index"))
        if kick is None:
            kick = s.irqs.get(None) or next(iter(s.irqs.values()), None)
        if kick is None or s.driver_irq is None:
            raise FormatError(f"{self.trace.path}:{ev['line']}: a queue before the IRQs were set up")
        ch = s.channel
        watch = ch.fileno() if ch is not None else -1
        old = s.vqs.pop(ev["queue"], None)
        if old is not None:
            old.close()
        s.vqs[ev["queue"]] = Virtqueue(
            memory, num, kick_irq=kick, irq=s.driver_irq, event_idx=bool(ev.get("event_idx")),
            indirect=bool(ev.get("indirect")), index=ev["queue"], check=ch.check if ch is not None else None,
            watch=watch if watch >= 0 else None,
        )  # fmt: skip
        s.done[ev["queue"]] = {}

    def _post(self, s: _Session, ev: dict[str, Any]) -> None:
        vq = s.vqs.get(ev["queue"])
        if vq is None:
            raise FormatError(f"{self.trace.path}:{ev['line']}: a request on queue {ev['queue']}, which is not set up")
        try:
            chain = [(int(a), int(n), bool(w)) for a, n, w in ev.get("bufs", [])]
            out = base64.b64decode(ev.get("out_b64", ""), validate=True)
        except (ValueError, TypeError):
            raise FormatError(f"{self.trace.path}:{ev['line']}: a request with malformed buffers or data") from None
        if not chain or len(out) != sum(n for _a, n, w in chain if not w):
            raise FormatError(f"{self.trace.path}:{ev['line']}: the request's data does not fill its buffers")
        pos = 0
        for addr, n, write in chain:
            if not write:
                s.view_at(addr, n)[:] = out[pos : pos + n]
                pos += n
        table = ev.get("table")
        if table is not None:
            head = vq.add_indirect(s.view_at(int(table), 16 * len(chain)), int(table), chain, ev["head"])
        else:
            head = vq.add(chain, ev["head"])
        del head  # the replay's head may differ; completions are matched by the recorded one
        s.chains[(ev["queue"], ev["head"])] = chain

    def _complete(self, s: _Session, ev: dict[str, Any]) -> None:
        q, head = ev["queue"], ev["head"]
        vq = s.vqs.get(q)
        chain = s.chains.pop((q, head), None)
        if vq is None or chain is None:
            raise FormatError(f"{self.trace.path}:{ev['line']}: a completion of a request that was not posted")
        done = s.done[q]
        deadline = time.monotonic() + self.timeout
        while head not in done:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                for token, used in vq.wait(left):
                    done[token] = used
            except (TimeoutError, L4vError) as exc:
                why = exc.message if isinstance(exc, L4vError) else f"no completion within {self.timeout:g} s"
                raise Divergence(ev, f"queue {q}: the request did not complete", {"used": ev.get("used")},
                                 {"error": why}) from None  # fmt: skip
        used = done.pop(head)
        inbytes = b"".join(bytes(s.view_at(a, n)) for a, n, w in chain if w)
        written = inbytes[:used] if used <= len(inbytes) else inbytes
        got = {"used": used, "last_byte": inbytes[-1] if inbytes else None,
               "in_sha256": hashlib.sha256(written).hexdigest()}  # fmt: skip
        expected = {k: ev.get(k) for k in got}
        summary = ev.get("summary") or {}
        if summary.get("class") in RANDOM_DATA:
            got["in_sha256"] = expected["in_sha256"]  # random bytes: only how many
            got["last_byte"] = expected["last_byte"]
        if got != expected:
            what = f"queue {q}: the request completed differently"
            if summary.get("class") == "blk" and got["last_byte"] != expected["last_byte"]:
                what = (f"queue {q}: blk {summary.get('type_name')} at sector {summary.get('sector')} answered "
                        f"{_blk_status(got['last_byte'])} instead of {_blk_status(expected['last_byte'])}")  # fmt: skip
            elif got["used"] != expected["used"]:
                what = f"queue {q}: the request completed with another length"
            elif got["in_sha256"] != expected["in_sha256"]:
                what = f"queue {q}: the device wrote other data"
            raise Divergence(ev, what, expected, got)


def _ipc_expected(ev: dict[str, Any]) -> dict[str, Any]:
    if "error" in ev:
        return {"error": ev["error"].get("type") if isinstance(ev["error"], dict) else ev["error"]}
    return {"result": ev.get("result"), "result_name": ev.get("result_name")}


def _differences(expected: dict[str, Any], got: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keys (and, one level down, the sub-keys) whose values differ: (expected, got)."""
    want: dict[str, Any] = {}
    have: dict[str, Any] = {}
    for key in dict.fromkeys([*expected, *got]):
        a, b = expected.get(key), got.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub_a, sub_b = _differences(a, b)
            want[key], have[key] = sub_a, sub_b
        else:
            want[key], have[key] = a, b
    return want, have


def _blk_status(value: Any) -> str:
    if not isinstance(value, int):
        return "nothing"
    return cat.BLK_STATUS.get(value, f"{value:#x}")
