"""The front-end side of one vhost-user connection: messages in and out.

Frames follow the schemas of :mod:`l4vctl.formats.vhost_user` through their
derived codecs (no Construct here); message types and flags come from the
catalog.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Sequence

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.backends import connect_unix
from l4vctl.backends.unix import OPEN_CHANNELS
from l4vctl.errors import ProtocolError, TimeoutExpired, UnavailableError
from l4vctl.formats.fast import codec

_HEADER = codec("vhost_user_header").struct
U64 = codec("vhost_user_u64").struct
_STATE = codec("vhost_vring_state")
_ADDR = codec("vhost_vring_addr")
_MEM_HDR = codec("vhost_user_memory_hdr")
_REGION = codec("vhost_user_memory_region")
CONFIG_HDR = codec("vhost_user_config_hdr")


def request_name(request: int) -> str:
    """The name of a message type (its number if l4vctl does not send it)."""
    return cat.VHOST_USER_REQUESTS.get(request, str(request))


def u64(value: int) -> bytes:
    """A 64-bit payload."""
    return U64.pack(value)


def vring_state(index: int, num: int) -> bytes:
    """A vring state payload (SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ENABLE, GET_VRING_BASE)."""
    return _STATE.pack({"index": index, "num": num})


def vring_addr(index: int, desc: int, used: int, avail: int) -> bytes:
    """A SET_VRING_ADDR payload (no logging)."""
    return _ADDR.pack({"index": index, "flags": 0, "desc_user_addr": desc, "used_user_addr": used,
                       "avail_user_addr": avail, "log_guest_addr": 0})  # fmt: skip


def vring_fd(index: int, with_fd: bool) -> bytes:
    """A SET_VRING_KICK/CALL payload: the queue index, NOFD when no fd travels with it."""
    return u64((index & cat.VHOST_USER_VRING_IDX_MASK) | (0 if with_fd else cat.VHOST_USER_VRING_NOFD))


def memory_table(regions: Sequence[tuple[int, int, int]]) -> bytes:
    """A SET_MEM_TABLE payload: ``(device address, size, mmap offset)`` per region.

    The front-end address of each region is its device address: the back-end
    uses it only to translate ring addresses, which are device addresses too.
    """
    out = [_MEM_HDR.pack({"nregions": len(regions), "padding": 0})]
    for base, size, offset in regions:
        out.append(_REGION.pack({"guest_phys_addr": base, "memory_size": size, "userspace_addr": base,
                                 "mmap_offset": offset}))  # fmt: skip
    return b"".join(out)


def config_request(size: int) -> bytes:
    """A GET_CONFIG payload asking for ``size`` bytes from offset 0."""
    return CONFIG_HDR.pack({"offset": 0, "size": size, "flags": 0}) + bytes(size)


def vring_state_num(body: bytes) -> int:
    """The ``num`` of a vring state reply (GET_VRING_BASE)."""
    return _STATE.unpack(body.ljust(_STATE.size, b"\0"))["num"]


class VhostUserClient:
    """The front-end side of one vhost-user connection (a SOCK_STREAM socket)."""

    def __init__(self, path: str, timeout: float):
        self.path = path
        self.timeout = timeout
        self.protocol = 0  # protocol features agreed on
        self.sock: socket.socket | None = connect_unix(path, socket.SOCK_STREAM, timeout, "the vhost-user back-end")
        OPEN_CHANNELS.add(self.sock)  # a forked emulator must not keep the back-end's connection alive

    def close(self) -> None:
        """Close the connection."""
        if self.sock is not None:
            OPEN_CHANNELS.discard(self.sock)
            self.sock.close()
            self.sock = None

    def has_protocol(self, bit: int) -> bool:
        """True if protocol feature ``bit`` was agreed on."""
        return bool(self.protocol >> bit & 1)

    def fileno(self) -> int:
        """The connection's descriptor (-1 once closed)."""
        return self.sock.fileno() if self.sock is not None else -1

    def hung_up(self) -> bool:
        """True if the back-end closed the connection."""
        if self.sock is None:
            return True
        p = select.poll()
        p.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        for _fd, ev in p.poll(0):
            if ev & (select.POLLHUP | select.POLLERR):
                return True
            if ev & select.POLLIN:
                try:
                    return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    return False
        return False

    def _dead(self, what: str) -> UnavailableError:
        return UnavailableError(f"{self.path}: the vhost-user back-end hung up {what}")

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), reply: bool = False) -> bytes | None:
        """Send a message; return the reply payload (messages with a reply), None otherwise.

        With REPLY_ACK agreed on, a message without a reply of its own asks
        for an ack, and a non-zero ack is an error.
        """
        ack = not reply and self.has_protocol(cat.VHOST_USER_PROTOCOL_F_REPLY_ACK)
        flags = cat.VHOST_USER_VERSION | (cat.VHOST_USER_FLAG_NEED_REPLY if ack else 0)
        data = _HEADER.pack(request, flags, len(payload)) + payload
        name = request_name(request)
        sock = self.sock
        assert sock is not None, "a closed connection sends nothing"
        try:
            if fds:
                wire.send(sock, data, fds)
            else:
                sock.sendall(data)
        except OSError:
            raise self._dead(f"before {name}") from None
        if not (reply or ack):
            return None
        body = self._recv(request, name)
        if ack:
            (code,) = U64.unpack_from(body.ljust(U64.size, b"\0"))
            if code:
                raise ProtocolError(f"{self.path}: the vhost-user back-end refused {name} ({code})")
            return None
        return body

    def call(self, request: int, payload: bytes = b"") -> bytes:
        """Send a message that has a reply and return the reply's payload."""
        body = self.send(request, payload, reply=True)
        assert body is not None
        return body

    def get_u64(self, request: int) -> int:
        """The 64-bit answer to ``request`` (GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM)."""
        return U64.unpack_from(self.call(request).ljust(U64.size, b"\0"))[0]

    def _recv_exact(self, n: int, name: str, deadline: float) -> bytes:
        sock = self.sock
        assert sock is not None, "a closed connection receives nothing"
        out = bytearray()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                raise TimeoutExpired(
                    f"{self.path}: no answer to {name} within {self.timeout:g} s "
                    "(back-ends such as qemu-storage-daemon serve one front-end at a time: is another one "
                    "connected? A slow one may need a longer --timeout)"
                )
            try:
                chunk = sock.recv(n - len(out))
            except OSError:
                chunk = b""
            if not chunk:
                raise self._dead(f"while answering {name}")
            out += chunk
        return bytes(out)

    def _recv(self, request: int, name: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        req, flags, size = _HEADER.unpack(self._recv_exact(_HEADER.size, name, deadline))
        if req != request or not flags & cat.VHOST_USER_FLAG_REPLY:
            raise ProtocolError(f"{self.path}: expected the reply to {name}, got message {req} flags {flags:#x}")
        if size > cat.VHOST_USER_MAX_PAYLOAD:
            raise ProtocolError(f"{self.path}: a {size}-byte reply to {name} is too long")
        return self._recv_exact(size, name, deadline)
