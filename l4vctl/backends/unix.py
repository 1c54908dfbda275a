"""``unix:PATH`` — a running emulator, reached over an AF_UNIX SOCK_SEQPACKET socket."""

from __future__ import annotations

import errno
import select
import socket
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.backends import connect_unix
from l4vctl.backends.base import Backend, Channel, Response
from l4vctl.errors import ProtocolError, TimeoutExpired, UnavailableError
from l4vctl.formats.fast import codec
from l4vctl.waiting import Spin, peer_pid

if TYPE_CHECKING:
    from l4vctl.wire import Cap

__all__ = ["OPEN_CHANNELS", "Response", "SocketChannel", "TooManyClients", "UnixBackend", "describe_op"]

ROLE_CODES = {"driver": cat.ROLE_DRIVER, "monitor": cat.ROLE_MONITOR}
#: Longest spin for a reply before sleeping (replies usually take tens of microseconds; see l4vctl.waiting).
REPLY_SPIN = 200e-6
#: poll() events that mean the peer closed its end (POLLIN is left out: a stale reply is not a hang-up).


_OP_NAMES = {**cat.VIRTIO_OPCODES["classic"], **cat.VIRTIO_OPCODES["current"]}


def describe_op(label: int, opcode: int) -> str:
    """What a request is, for error messages ("SET_STATUS", "ICU BIND", ...)."""
    if label == cat.L4VIRTIO_PROTOCOL:
        return _OP_NAMES.get(opcode, f"opcode {opcode}")
    if label == cat.L4_PROTO_IRQ:
        return "ICU " + cat.ICU_OPCODES.get(opcode, str(opcode))
    return f"label {label} opcode {opcode}"


#: Connections to devices open in this process.  A forked emulator closes its copies,
#: so that a device sees its driver leave when the driver closes, not when the child ends.
OPEN_CHANNELS: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking sends on ``sock`` give up with EAGAIN after ``seconds`` (receives are unaffected)."""
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    timeval = codec("timeval").pack({"tv_sec": whole, "tv_usec": int((seconds - whole) * 1e6)})
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class TooManyClients(UnavailableError):
    """The emulator refused the connection for now (-L4_EAGAIN): worth another try."""


class SocketChannel(Channel):
    """One connection to an emulator: HELLO, then request/reply calls (memory: local mappings)."""

    def __init__(self, sock: socket.socket, name: str, role: str, timeout: float,
                 exit_status: Callable[[], str | None] | None = None, peer: int | None = None):  # fmt: skip
        self.sock: socket.socket | None = sock  # None once closed
        OPEN_CHANNELS.add(sock)
        self.name = name
        self.timeout = timeout
        self.seq = 0
        self._exit_status = exit_status  # callable giving why the peer ended, if known
        #: The device's process (given by whoever started it, else the socket's peer), None if not known.
        self.peer_pid = peer if peer is not None else peer_pid(sock)
        self._reply_spin = Spin(REPLY_SPIN, self.peer_pid)
        self._hello(sock, ROLE_CODES[role])

    def _dead(self, what: str) -> UnavailableError:
        why = self._exit_status() if self._exit_status else None
        return UnavailableError(f"{self.name}: the device closed the connection {what}" + (f" ({why})" if why else ""))

    def _hello(self, sock: socket.socket, role: int) -> None:
        self.seq += 1
        data = wire.encode(cat.KIND_HELLO, self.seq, 0, 0, [cat.WIRE_VERSION, cat.WIRE_VERSION, role, cat.PROFILE_FD])
        try:
            set_send_timeout(sock, self.timeout)  # a peer that stops reading must not hang a send
            wire.send(sock, data)
            frame = wire.recv(sock, self.timeout, any_version=True, spin=self._reply_spin)
        except wire.Closed:
            raise self._dead("during HELLO") from None
        except TimeoutError:
            raise TimeoutExpired(f"{self.name}: no answer to HELLO within {self.timeout:g} s") from None
        except wire.WireError as exc:
            raise ProtocolError(f"{self.name}: not an l4vctl emulator ({exc})") from None
        except OSError as exc:
            raise UnavailableError(f"{self.name}: {exc.strerror or exc}") from None
        frame.close_fds()
        if frame.kind != cat.KIND_WELCOME:
            raise ProtocolError(f"{self.name}: expected WELCOME, got frame kind {frame.kind}")
        if frame.label == -cat.L4_EBUSY:
            raise UnavailableError(f"{self.name}: device busy: another driver is attached")
        if frame.label == -cat.L4_EAGAIN:
            raise TooManyClients(f"{self.name}: the emulator serves as many connections as it allows; try again later")
        version = frame.words[0] if frame.words else 0
        if frame.label == -cat.L4_EBADPROTO or version != cat.WIRE_VERSION:
            raise ProtocolError(
                f"{self.name}: the emulator speaks wire protocol {version}, l4vctl speaks {cat.WIRE_VERSION}"
            )
        if frame.label != 0:
            raise ProtocolError(f"{self.name}: HELLO refused with {cat.l4_error_name(frame.label)}")

    def call(self, label: int, opcode: int, words: Sequence[int] = (), caps: Sequence[Cap] = (),
             fds: Sequence[int] = (), timeout: float | None = None) -> Response:  # fmt: skip
        """One IPC: send the request, wait for its reply (``timeout`` seconds)."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        seq = self.seq
        data = wire.encode(cat.KIND_REQUEST, seq, label, opcode, words, caps)
        timeout = self.timeout if timeout is None else timeout
        sock = self.sock
        assert sock is not None, "a closed channel takes no calls"
        try:
            wire.send(sock, data, fds)
        except (BlockingIOError, TimeoutError):
            raise TimeoutExpired(
                f"{self.name}: the device did not take {describe_op(label, opcode)} within {self.timeout:g} s"
                " (it does not read its socket)"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise self._dead(f"before {describe_op(label, opcode)}") from None
            raise UnavailableError(f"{self.name}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                frame = wire.recv(sock, max(left, 0), spin=self._reply_spin)
            except TimeoutError:
                raise TimeoutExpired(
                    f"{self.name}: no reply to {describe_op(label, opcode)} within {timeout:g} s"
                ) from None
            except wire.Closed:
                raise self._dead(f"while waiting for {describe_op(label, opcode)}") from None
            except wire.WireError as exc:
                raise ProtocolError(f"{self.name}: malformed reply to {describe_op(label, opcode)}: {exc}") from None
            except ConnectionResetError:
                raise self._dead(f"while waiting for {describe_op(label, opcode)}") from None
            if frame.kind == cat.KIND_REPLY and frame.seq == seq:
                return Response(frame.label, frame.words, frame.caps, frame.fds)
            frame.close_fds()
            if frame.kind != cat.KIND_REPLY:
                raise ProtocolError(
                    f"{self.name}: the device sent a {cat.KINDS.get(frame.kind, frame.kind)} frame"
                    f" while l4vctl waited for the reply to {describe_op(label, opcode)}"
                )
            # else a stale reply (an earlier call timed out): skip it

    def fileno(self) -> int:
        """The connection's descriptor: it reports a hang-up (POLLHUP, POLLRDHUP) when the device goes away."""
        return self.sock.fileno() if self.sock is not None else -1

    def hung_up(self) -> bool:
        """True if the device closed the connection (its process may have died)."""
        if self.sock is None:
            return True
        p = select.poll()
        p.register(self.sock, wire.HANGUP)
        return any(ev & wire.HANGUP for _fd, ev in p.poll(0))

    def check(self) -> None:
        """Raise UnavailableError if the device went away (called while waiting for completions)."""
        if self.hung_up():
            why = self._exit_status() if self._exit_status else None
            raise UnavailableError(
                f"{self.name}: the device went away during I/O (" + (why or "it closed the connection") + ")"
            )

    def close(self) -> None:
        """Close the connection (the device sees its driver leave)."""
        if self.sock is not None:
            OPEN_CHANNELS.discard(self.sock)
            self.sock.close()
            self.sock = None


class UnixBackend(Backend):
    """``unix:PATH``: an emulator listening on a SOCK_SEQPACKET socket."""

    scheme = "unix"

    def connect(self, role: str = "driver", timeout: float = 5.0) -> SocketChannel:
        """HELLO in ``role``; a full emulator (-L4_EAGAIN) is asked again until ``timeout``."""
        path = self.target
        if not path:
            raise UnavailableError("unix: needs a socket path (unix:/run/dev.sock)")
        deadline = time.monotonic() + timeout
        pause = 0.002
        while True:
            left = max(deadline - time.monotonic(), 0.001)
            sock = connect_unix(path, socket.SOCK_SEQPACKET, left, "'l4vctl emulate'")
            try:
                return SocketChannel(sock, path, role, timeout)
            except TooManyClients:
                sock.close()
                if time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            except BaseException:
                sock.close()
                raise
