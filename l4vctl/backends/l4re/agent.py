"""The host end of the link to an l4vagent: frames out, replies and IRQ events in.

One thread reads the link: it decodes link frames, hands each reply to the
request waiting for it (by sequence number) and turns EVENT frames into
triggers of local eventfds, so that the session's waits (poll on an IRQ's
descriptor) work as with every other backend.  Requests are sent from the
caller's thread under a lock; each waits for its reply with a timeout that
grows with the bytes it moves (the link is a serial line).  When the link
ends, every waiter is woken with the reason and a pipe whose write end is
closed reports a hang-up to anyone polling :meth:`AgentLink.fileno`.
"""

from __future__ import annotations

import os
import random
import select
import threading
import time
from collections.abc import Sequence

from l4vctl import catalog as cat
from l4vctl.backends.l4re.stream import Stream
from l4vctl.caps import Irq
from l4vctl.errors import ProtocolError, TimeoutExpired, UnavailableError
from l4vctl.link import Decoder, RemoteFrame, decode_frame, encode, encode_frame
from l4vctl.wire import Cap, WireError

#: Bytes per second the reply timeout allows for (a 16550 under QEMU moves ~7-11 KiB/s).
SLOWEST_RATE = 2000
#: Text of the line kept for an error message when no agent answers.
KEEP_TEXT = 400
#: Seconds between HELLOs while no agent answers.
HELLO_EVERY = 1.0


class Welcome:
    """What the agent said in its WELCOME."""

    __slots__ = ("version", "role", "max_payload", "ndevices", "max_handles", "ipc_timeout_ms")

    def __init__(self, words: Sequence[int]):
        w = list(words) + [0] * 6
        self.version, self.role, self.max_payload, self.ndevices, self.max_handles, self.ipc_timeout_ms = w[:6]


class AgentLink:
    """A session with the agent over one stream."""

    def __init__(self, stream: Stream, timeout: float):
        self.stream = stream
        self.name = stream.name
        self.timeout = timeout
        self.decoder = Decoder()
        self.welcome: Welcome | None = None
        self.max_payload = 4096  # until the WELCOME says more
        self._seq = random.getrandbits(31) | 1  # another host's late replies never match ours
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, RemoteFrame] = {}
        self._waiting: set[int] = set()
        self.irqs: dict[int, Irq] = {}  # agent IRQ handle -> local eventfd the events trigger
        self.irq_lock = threading.Lock()
        self.events = 0
        self.bad_frames = 0
        self.text = bytearray()  # what arrived that was not a frame (a boot log, say), the first bytes
        self.dead: str | None = None
        self._hup_r, self._hup_w = os.pipe2(os.O_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._pump, name="l4vctl-link", daemon=True)
        self._thread.start()

    # -- the reader ---------------------------------------------------------------------------

    def _pump(self) -> None:
        p = select.poll()
        p.register(self.stream.fd, select.POLLIN)
        p.register(self._stop_r, select.POLLIN)
        reason = None
        try:
            while reason is None:
                ready = p.poll()
                if any(fd == self._stop_r for fd, _ in ready):
                    return
                try:
                    data = self.stream.read()
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    reason = "the link was closed (QEMU or the serial peer went away)"
                    break
                except OSError as exc:
                    reason = f"the link failed ({exc.strerror or exc})"
                    break
                if not data:
                    reason = "the link was closed (QEMU or the serial peer went away)"
                    break
                before = self.decoder.garbage
                frames = self.decoder.feed(data)
                if self.decoder.garbage != before and len(self.text) < KEEP_TEXT:
                    self.text += data[: KEEP_TEXT - len(self.text)]
                for lf in frames:
                    self._deliver(lf.payload)
        except Exception as exc:  # a bug here must not leave waiters hanging
            reason = f"the link reader failed: {exc}"
        self._die(reason or "the link ended")

    def _deliver(self, payload: bytes) -> None:
        try:
            f = decode_frame(payload)
        except WireError:
            self.bad_frames += 1
            return
        if f.kind == cat.KIND_EVENT:
            self.events += 1
            with self.irq_lock:  # an IRQ being closed is not triggered (its fd may be reused)
                irq = self.irqs.get(f.flags)
                if irq is not None and irq.fd >= 0:
                    try:
                        irq.trigger()
                    except (OSError, ValueError):
                        pass
            return
        with self._cond:
            if f.seq in self._waiting:
                self._replies[f.seq] = f
                self._cond.notify_all()

    def _die(self, reason: str) -> None:
        with self._cond:
            if self.dead is None:
                self.dead = reason
            self._cond.notify_all()
        if self._hup_w >= 0:
            os.close(self._hup_w)
            self._hup_w = -1

    # -- requests ------------------------------------------------------------------------------

    def fileno(self) -> int:
        """A descriptor that reports a hang-up when the link ends."""
        return self._hup_r

    def check(self) -> None:
        """Raise UnavailableError if the link ended."""
        if self.dead is not None:
            raise UnavailableError(f"{self.name}: {self.dead}")

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def _send(self, data: bytes, timeout: float) -> None:
        """Write frames; a write that fails or stalls ends the link (a frame may be cut in half)."""
        with self._send_lock:
            try:
                self.stream.send(data, timeout)
            except (TimeoutExpired, UnavailableError) as exc:
                self._die(str(exc).removeprefix(f"{self.name}: "))
                raise

    def _frame(self, kind: int, seq: int, label: int, opcode: int, words, caps, flags: int, data: bytes) -> bytes:
        payload = encode_frame(kind, seq, label, opcode, words, caps, flags, data)
        if len(payload) > self.max_payload:
            raise ProtocolError(f"{self.name}: a frame of {len(payload)} bytes is larger than the agent takes "
                                f"({self.max_payload})")  # fmt: skip
        return encode(payload)

    def post(self, kind: int, label: int = 0, opcode: int = 0, words=(), caps=(), flags: int = 0,
             data: bytes = b"") -> int:  # fmt: skip
        """Send a frame without waiting; returns its sequence number."""
        self.check()
        seq = self._next_seq()
        self._send(self._frame(kind, seq, label, opcode, words, caps, flags, data), self.timeout)
        return seq

    def request(self, kind: int, label: int = 0, opcode: int = 0, words=(), caps=(), flags: int = 0,
                data: bytes = b"", timeout: float | None = None, expect: int = 0) -> RemoteFrame:  # fmt: skip
        """Send a frame and wait for its reply (``expect``: bytes the reply will carry, for the timeout)."""
        self.check()
        seq = self._next_seq()
        frame = self._frame(kind, seq, label, opcode, words, caps, flags, data)
        wait = (self.timeout if timeout is None else timeout) + (len(frame) + expect) / SLOWEST_RATE
        return self._exchange(frame, [seq], wait, kind)[0]

    def pipeline(self, frames: Sequence[tuple[int, int, Sequence[int], bytes, int]], label: int = 0,
                 opcode: int = 0) -> list[RemoteFrame]:  # fmt: skip
        """Several ``(kind, flags, words, data, expect)`` requests sent back to back, their replies in order.

        The agent executes frames in order, so nothing is lost by not waiting
        for each reply before the next request: the line stays busy.
        """
        self.check()
        seqs = [self._next_seq() for _ in frames]
        out = b"".join(self._frame(kind, seq, label, opcode, words, (), flags, data)
                       for seq, (kind, flags, words, data, _e) in zip(seqs, frames, strict=True))  # fmt: skip
        wait = self.timeout + (len(out) + sum(f[4] for f in frames)) / SLOWEST_RATE
        return self._exchange(out, seqs, wait, frames[0][0])

    def _exchange(self, out: bytes, seqs: list[int], wait: float, kind: int) -> list[RemoteFrame]:
        """Send ``out`` (frames numbered ``seqs``) and collect their replies, in order, within ``wait`` s."""
        with self._cond:
            self._waiting.update(seqs)
        try:
            self._send(out, wait)
            deadline = time.monotonic() + wait
            with self._cond:
                while not all(seq in self._replies for seq in seqs):
                    if self.dead is not None:
                        raise UnavailableError(f"{self.name}: {self.dead}")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutExpired(self._silence(kind, wait))
                    self._cond.wait(left)
                return [self._replies.pop(seq) for seq in seqs]
        finally:
            with self._cond:
                for seq in seqs:
                    self._waiting.discard(seq)
                    self._replies.pop(seq, None)

    def _silence(self, kind: int, wait: float) -> str:
        what = cat.KINDS.get(kind) or cat.REMOTE_KINDS.get(kind, str(kind))
        if self.welcome is None:
            seen = bytes(self.text).decode("ascii", "replace").strip()
            seen = " ".join(seen.split())[:120]
            heard = f"; the line carried {self.decoder.garbage} other bytes" if self.decoder.garbage else \
                "; the line was silent"  # fmt: skip
            if seen:
                heard += f" ({seen!r})"
            return f"{self.name}: no l4vagent answered within {wait:.3g} s{heard}"
        return f"{self.name}: the agent did not answer a {what} within {wait:.3g} s (link stalled?)"

    # -- the session -------------------------------------------------------------------------

    def hello(self, role: int, ipc_timeout_ms: int) -> Welcome:
        """Open a session with the agent (releasing whatever a previous host left behind)."""
        words = [cat.WIRE_VERSION, cat.WIRE_VERSION, role, cat.PROFILE_REMOTE, ipc_timeout_ms]
        # said again every HELLO_EVERY seconds: an agent still swallowing the rest of a frame
        # that an earlier host cut short drops it after a pause and answers the next HELLO
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            try:
                r = self.request(cat.KIND_HELLO, 0, 0, words, timeout=max(0.001, min(HELLO_EVERY, left)))
                break
            except TimeoutExpired:
                if deadline - time.monotonic() <= 0:
                    raise TimeoutExpired(self._silence(cat.KIND_HELLO, self.timeout)) from None
        if r.kind != cat.KIND_WELCOME:
            raise ProtocolError(f"{self.name}: the agent answered HELLO with a frame of kind {r.kind}")
        if r.label < 0:
            theirs = r.words[0] if r.words else "?"
            raise ProtocolError(f"{self.name}: the agent refused the session ({cat.l4_error_name(r.label)}; "
                                f"it speaks wire protocol {theirs}, remote profile needed)")  # fmt: skip
        self.welcome = Welcome(r.words)
        self.max_payload = max(256, min(self.welcome.max_payload, cat.LINK_MAX_PAYLOAD))
        return self.welcome

    def agent(self, opcode: int, words=(), data: bytes = b"", expect: int = 0) -> RemoteFrame:
        """A request to the agent itself; raises ProtocolError for an error result."""
        r = self.request(cat.KIND_REQUEST, cat.L4VCTL_PROTO_AGENT, opcode, words, (), 0, data, expect=expect)
        if r.label < 0:
            raise ProtocolError(f"{self.name}: agent request {opcode} failed: {cat.l4_error_name(r.label)}")
        return r

    def devices(self) -> list[tuple[int, str]]:
        """The device capabilities the agent holds: ``(handle, name)``."""
        r = self.agent(cat.AGENT_OP_LIST, expect=512)
        names = r.data.decode("utf-8", "replace").split("\n")
        return [(h, names[i] if i < len(names) else f"#{h}") for i, h in enumerate(r.words)]

    def call(self, target: int, label: int, opcode: int, words: Sequence[int], caps: Sequence[Cap],
             receive: int, timeout: float | None = None) -> RemoteFrame:  # fmt: skip
        """An IPC on a device the agent holds (``words`` are message registers)."""
        return self.request(cat.KIND_REQUEST, label, opcode, words, caps, (target & 0xFFFF) | receive,
                            timeout=timeout)  # fmt: skip

    def trigger(self, handle: int) -> None:
        """Trigger an IRQ the agent holds (no reply; ordered after every earlier frame)."""
        self.post(cat.KIND_TRIGGER, flags=handle)

    def release(self, handles: Sequence[int]) -> None:
        """Release objects the agent holds for us."""
        if handles and self.dead is None:
            self.agent(cat.AGENT_OP_RELEASE, list(handles))

    def bye(self) -> None:
        """Tell the agent the host leaves (it releases everything and resets the devices used)."""
        if self.dead is None and self.welcome is not None:
            try:
                self.request(cat.KIND_BYE, timeout=min(self.timeout, 2.0))
            except (TimeoutExpired, UnavailableError):
                pass

    def close(self) -> None:
        """Stop the reader and close the stream and pipes (idempotent)."""
        if self._stop_w >= 0:
            try:
                os.write(self._stop_w, b"x")
            except OSError:
                pass
            self._thread.join(2.0)
        for attr in ("_stop_w", "_stop_r", "_hup_w", "_hup_r"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        self.stream.close()
        with self._cond:
            if self.dead is None:
                self.dead = "the link was closed"
            self._cond.notify_all()
