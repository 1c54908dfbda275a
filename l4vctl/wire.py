"""Encoding, decoding and sending frames of the socket emulation.

Frames are declared in :mod:`l4vctl.formats.wire`; the codecs here are
derived from those schemas.  In the fd profile a frame is one SOCK_SEQPACKET
packet and its capabilities are file descriptors in one SCM_RIGHTS message.
"""

from __future__ import annotations

import array
import math
import select
import socket
import struct
import time
from typing import TYPE_CHECKING

from l4vctl import catalog as cat
from l4vctl.caps import close_fds
from l4vctl.formats.fast import codec, scalar_format

if TYPE_CHECKING:
    from l4vctl.waiting import Spin

_HDR = codec("wire_frame_header")
_CAP = codec("wire_cap_item")
_WORD = struct.Struct("<" + scalar_format("wire_word"))
HEADER_SIZE = _HDR.size
CAP_SIZE = _CAP.size
WORD_SIZE = _WORD.size
MASK64 = (1 << 64) - 1
#: poll() events on a connection that mean the peer went away (closed, reset, or half-closed).
HANGUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
_FD_SPACE = socket.CMSG_SPACE(cat.MAX_CAPS * array.array("i").itemsize)


class WireError(Exception):
    """A frame that cannot be decoded.  ``seq`` is the frame's sequence number
    when its header was readable (so that an error reply can be sent)."""

    seq: int | None = None


class Cap:
    """A capability item: type, rights, handle (fd index or number), size."""

    __slots__ = ("type", "rights", "handle", "size")

    def __init__(self, type: int, rights: int = 0, handle: int = 0, size: int = 0):
        self.type = type
        self.rights = rights
        self.handle = handle
        self.size = size

    def __repr__(self) -> str:
        return f"Cap({cat.CAP_TYPES.get(self.type, self.type)}, rights={self.rights:#x}, handle={self.handle})"


class Frame:
    """A decoded frame; ``fds`` are the descriptors that came with it (fd profile)."""

    __slots__ = ("kind", "seq", "label", "opcode", "words", "caps", "fds", "kept")

    def __init__(self, kind, seq, label, opcode, words=(), caps=(), fds=()):
        self.kind = kind
        self.seq = seq
        self.label = label
        self.opcode = opcode
        self.words = list(words)
        self.caps = list(caps)
        self.fds = list(fds)
        self.kept: list[int] = []

    def fd_of(self, cap: Cap) -> int | None:
        """The descriptor a capability item refers to, if it came with the frame."""
        if 0 <= cap.handle < len(self.fds):
            return self.fds[cap.handle]
        return None

    def keep(self, fd: int) -> None:
        """Take ownership of one of the frame's descriptors (close_fds spares it)."""
        self.kept.append(fd)

    def close_fds(self) -> None:
        """Close every descriptor that came with the frame and was not kept."""
        close_fds(fd for fd in self.fds if fd not in self.kept)
        self.fds = []

    def __repr__(self) -> str:
        return (
            f"Frame({cat.KINDS.get(self.kind, self.kind)}, seq={self.seq}, label={self.label}, "
            f"op={self.opcode}, words={self.words}, caps={self.caps}, fds={self.fds})"
        )


def signed(word: int) -> int:
    """A 64-bit word as a signed value."""
    return word - (1 << 64) if word & (1 << 63) else word


def encode(kind: int, seq: int, label: int, opcode: int, words=(), caps=()) -> bytes:
    """A frame's bytes (words taken modulo 2^64); ValueError if too many words or caps."""
    words = list(words)
    caps = list(caps)
    if len(words) > cat.MAX_WORDS or len(caps) > cat.MAX_CAPS:
        raise ValueError("too many words or capabilities for one frame")
    length = HEADER_SIZE + WORD_SIZE * len(words) + CAP_SIZE * len(caps)
    out = bytearray(length)
    _HDR.struct.pack_into(out, 0, cat.WIRE_MAGIC, cat.WIRE_VERSION, kind, length, seq, label, opcode,
                          len(words), len(caps), 0)  # fmt: skip
    pos = HEADER_SIZE
    for word in words:
        _WORD.pack_into(out, pos, word & MASK64)
        pos += WORD_SIZE
    for cap in caps:
        _CAP.struct.pack_into(out, pos, cap.type, cap.rights, 0, cap.handle, cap.size)
        pos += CAP_SIZE
    return bytes(out)


def decode(data: bytes, fds=(), any_version: bool = False) -> Frame:
    """A frame from its bytes; raises :class:`WireError` with the reason.

    ``any_version`` accepts frames of other protocol versions (for HELLO and
    WELCOME, so that a version mismatch can be reported, not just detected).
    """
    if len(data) < HEADER_SIZE:
        raise WireError(f"frame of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, kind, length, seq, label, opcode, nwords, ncaps, _flags = _HDR.struct.unpack_from(data)
    if magic != cat.WIRE_MAGIC:
        raise WireError(f"bad frame magic {magic!r}")
    if version != cat.WIRE_VERSION and not any_version:
        raise WireError(f"wire protocol version {version}, expected {cat.WIRE_VERSION}")
    if length != len(data):
        raise WireError(f"frame says {length} bytes but {len(data)} arrived")
    if nwords > cat.MAX_WORDS or ncaps > cat.MAX_CAPS:
        raise WireError(f"frame has {nwords} words and {ncaps} capabilities (at most {cat.MAX_WORDS}/{cat.MAX_CAPS})")
    need = HEADER_SIZE + WORD_SIZE * nwords + CAP_SIZE * ncaps
    if need != length:
        raise WireError(f"{nwords} words and {ncaps} capabilities need {need} bytes, frame has {length}")
    words = [v for (v,) in _WORD.iter_unpack(data[HEADER_SIZE : HEADER_SIZE + WORD_SIZE * nwords])]
    caps = []
    pos = HEADER_SIZE + WORD_SIZE * nwords
    for _ in range(ncaps):
        ctype, rights, _cflags, handle, size = _CAP.struct.unpack_from(data, pos)
        caps.append(Cap(ctype, rights, handle, size))
        pos += CAP_SIZE
    return Frame(kind, seq, label, opcode, words, caps, fds)


def send(sock: socket.socket, data: bytes, fds=()) -> None:
    """Send one frame with its descriptors (the caller keeps its own copies)."""
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sock.sendmsg([data], anc)
    else:
        sock.send(data)


class Closed(Exception):
    """The peer closed the connection."""


def recv(sock: socket.socket, timeout: float | None = None, any_version: bool = False,
         spin: Spin | None = None) -> Frame:  # fmt: skip
    """Receive one frame and its descriptors.

    ``spin`` (a :class:`l4vctl.waiting.Spin`) polls for the frame a while
    before sleeping, as long as that pays, and learns how long the frame
    took: waking a sleeping process costs tens of microseconds, a reply that
    comes back quickly is caught sooner by polling.  A ``timeout`` of 0 means
    "only what is already there".

    Raises :class:`Closed` at end of stream, ``TimeoutError`` when nothing
    arrives in time and :class:`WireError` for a malformed frame (its
    descriptors are closed).
    """
    if spin is None:
        if timeout != 0:
            return _recv_waiting(sock, timeout, any_version)
        try:
            return _recv_now(sock, any_version, socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise TimeoutError("no frame is waiting") from None

    def waiting() -> Frame | None:
        try:
            return _recv_now(sock, any_version, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    start = time.perf_counter()
    frame = spin.run(waiting, start)
    if frame is not None:
        return frame
    if timeout == 0:
        raise TimeoutError("no frame is waiting")
    frame = _recv_waiting(sock, timeout, any_version)
    spin.observe(time.perf_counter() - start)
    return frame


def _recv_waiting(sock: socket.socket, timeout: float | None, any_version: bool) -> Frame:
    """Sleep until a frame arrives (``timeout`` seconds at most; None: no limit)."""
    if timeout is not None:
        deadline = time.monotonic() + timeout
        p = select.poll()  # not select(): descriptors past 1023 are fine
        p.register(sock, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if p.poll(max(0, math.ceil(left * 1000))):
                try:
                    return _recv_now(sock, any_version, socket.MSG_DONTWAIT)
                except BlockingIOError:  # readable, then not (another reader took it): wait on
                    pass
            if left <= 0:
                raise TimeoutError("no frame arrived in time")
    return _recv_now(sock, any_version, 0)


def _recv_now(sock: socket.socket, any_version: bool, msg_flags: int) -> Frame:
    data, anc, flags, _addr = sock.recvmsg(cat.MAX_FRAME, _FD_SPACE, msg_flags)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if not data and not fds:
        raise Closed()
    try:
        if flags & socket.MSG_TRUNC:
            raise WireError(f"frame longer than {cat.MAX_FRAME} bytes")
        if flags & socket.MSG_CTRUNC:
            raise WireError(f"more than {cat.MAX_CAPS} descriptors with one frame")
        return decode(data, fds, any_version)
    except WireError as exc:
        close_fds(fds)
        exc.seq = peek_seq(data)
        raise


def peek_seq(data: bytes) -> int | None:
    """The sequence number of a frame whose header is readable, else None."""
    if len(data) >= HEADER_SIZE and data[:4] == cat.WIRE_MAGIC:
        return _HDR.unpack(data)["seq"]
    return None
