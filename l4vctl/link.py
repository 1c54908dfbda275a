"""Framing for the remote profile: whole frames out of a byte stream that may be noisy.

A serial line (or any stream) can deliver boot-log text before the peer
speaks, drop or garble bytes, or stall mid-frame.  :func:`encode` wraps a
payload in a link frame (:mod:`l4vctl.formats.link`); a :class:`Decoder` is
fed whatever bytes arrive, in any chunking, and returns the frames that
arrived intact, in order.  It resynchronises after garbage by searching for
the next sync marker, trusts a header's ``length`` only when the header's own
check matches, drops a frame whose payload CRC fails, and never holds more
than one maximal frame: a flood of garbage costs time linear in its size and
no memory beyond that.
"""

from __future__ import annotations

import zlib

from l4vctl import catalog as cat
from l4vctl.errors import UsageError
from l4vctl.formats.fast import codec

_HDR = codec("link_header")
HEADER_SIZE = _HDR.size
_SYNC = cat.LINK_SYNC.to_bytes(2, "little")


def _header_check(head: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(head) & 0xFFFF


def encode(payload: bytes, ptype: int = cat.LINK_T_WIRE) -> bytes:
    """One link frame carrying ``payload``."""
    if len(payload) > cat.LINK_MAX_PAYLOAD:
        raise UsageError(f"a link frame carries at most {cat.LINK_MAX_PAYLOAD} bytes, not {len(payload)}")
    head = bytearray(
        _HDR.pack(
            {
                "sync": cat.LINK_SYNC,
                "type": ptype,
                "version": cat.LINK_VERSION,
                "length": len(payload),
                "payload_crc": zlib.crc32(payload),
                "header_check": 0,
            }
        )
    )
    check = _header_check(head[: HEADER_SIZE - 2])
    head[HEADER_SIZE - 2 :] = check.to_bytes(2, "little")
    return bytes(head) + payload


class LinkFrame:
    """A frame that arrived intact: its payload type and payload."""

    __slots__ = ("type", "payload")

    def __init__(self, ptype: int, payload: bytes):
        self.type = ptype
        self.payload = payload

    def __repr__(self) -> str:
        return f"LinkFrame({cat.LINK_TYPES.get(self.type, self.type)}, {len(self.payload)} bytes)"


class Decoder:
    """Frames from a byte stream fed in pieces; counts what it had to throw away."""

    def __init__(self, max_payload: int = cat.LINK_MAX_PAYLOAD):
        if not 0 <= max_payload <= cat.LINK_MAX_PAYLOAD:
            raise UsageError(f"max_payload must be within 0..{cat.LINK_MAX_PAYLOAD}")
        self.max_payload = max_payload
        self.buf = bytearray()
        self.garbage = 0  # bytes skipped while looking for a frame
        self.bad_headers = 0  # sync markers whose header check failed (or whose length was too large)
        self.bad_payloads = 0  # frames whose payload CRC failed
        self.frames = 0  # frames delivered
        self.unknown_version = 0  # intact frames of another link version (skipped)

    @property
    def pending(self) -> int:
        """Bytes held while a frame is incomplete."""
        return len(self.buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[LinkFrame]:
        """The frames completed by ``data`` (possibly none), in order."""
        buf = self.buf
        buf += data
        out: list[LinkFrame] = []
        pos = 0
        end = len(buf)
        while True:
            start = buf.find(_SYNC, pos)
            if start < 0:
                # keep a trailing A5: it may be the first half of the next marker
                keep = 1 if end > pos and buf[end - 1] == _SYNC[0] else 0
                self.garbage += end - keep - pos
                pos = end - keep
                break
            self.garbage += start - pos
            pos = start
            if end - pos < HEADER_SIZE:
                break  # wait for the rest of the header
            head = memoryview(buf)[pos : pos + HEADER_SIZE]
            fields = _HDR.unpack(head)
            length = fields["length"]
            if fields["header_check"] != _header_check(head[: HEADER_SIZE - 2]) or length > self.max_payload:
                head.release()
                self.bad_headers += 1
                self.garbage += 1
                pos += 1  # not a frame start after all: search on from the next byte
                continue
            head.release()
            if end - pos < HEADER_SIZE + length:
                break  # wait for the payload
            payload = bytes(buf[pos + HEADER_SIZE : pos + HEADER_SIZE + length])
            if zlib.crc32(payload) != fields["payload_crc"]:
                self.bad_payloads += 1
                self.garbage += 1
                pos += 1  # the header was intact but the payload not: resynchronise inside it
                continue
            pos += HEADER_SIZE + length
            if fields["version"] != cat.LINK_VERSION:
                self.unknown_version += 1
                continue
            self.frames += 1
            out.append(LinkFrame(fields["type"], payload))
        del buf[:pos]
        return out


# -- wire frames of the remote profile ---------------------------------------------------------


class RemoteFrame:
    """A wire frame of the remote profile: the fd profile's fields plus ``flags`` and a data section.

    In the remote profile ``flags`` names the object a frame is about (the
    target device of a REQUEST, the dataspace of a READ or WRITE, the IRQ of
    a TRIGGER or EVENT; an IPC error code in a REPLY), and frames that carry
    bytes (READ replies, WRITE, ECHO) put them after the capability items.
    """

    __slots__ = ("kind", "seq", "label", "opcode", "words", "caps", "flags", "data")

    def __init__(self, kind: int, seq: int, label: int, opcode: int, words: list[int], caps: list,
                 flags: int = 0, data: bytes = b""):  # fmt: skip
        self.kind = kind
        self.seq = seq
        self.label = label
        self.opcode = opcode
        self.words = words
        self.caps = caps
        self.flags = flags
        self.data = data

    def __repr__(self) -> str:
        name = cat.KINDS.get(self.kind) or cat.REMOTE_KINDS.get(self.kind, str(self.kind))
        counts = f"{len(self.words)} words, {len(self.caps)} caps, {len(self.data)} data bytes"
        head = f"seq={self.seq}, label={self.label}, opcode={self.opcode}, flags={self.flags:#x}"
        return f"RemoteFrame({name}, {head}, {counts})"


def encode_frame(kind: int, seq: int, label: int, opcode: int, words=(), caps=(), flags: int = 0,
                 data: bytes = b"") -> bytes:  # fmt: skip
    """The bytes of a remote-profile wire frame (to be wrapped by :func:`encode`)."""
    from l4vctl import wire

    head = wire.encode(kind, seq, label, opcode, words, caps)
    length = len(head) + len(data)
    if length > cat.MAX_FRAME:
        raise UsageError(f"a frame holds at most {cat.MAX_FRAME} bytes, not {length}")
    out = bytearray(head)
    out[8:12] = length.to_bytes(4, "little")
    out[28:32] = (flags & 0xFFFFFFFF).to_bytes(4, "little")
    out += data
    return bytes(out)


def decode_frame(payload: bytes) -> RemoteFrame:
    """A remote-profile wire frame from a link frame's payload (``wire.WireError`` if malformed)."""
    from l4vctl import wire

    n = len(payload)
    if n < wire.HEADER_SIZE:
        raise wire.WireError(f"frame of {n} bytes is shorter than the {wire.HEADER_SIZE}-byte header")
    if payload[:4] != cat.WIRE_MAGIC:
        raise wire.WireError(f"bad frame magic {bytes(payload[:4])!r}")
    length = int.from_bytes(payload[8:12], "little")
    nwords = int.from_bytes(payload[24:26], "little")
    ncaps = int.from_bytes(payload[26:28], "little")
    need = wire.HEADER_SIZE + wire.WORD_SIZE * nwords + wire.CAP_SIZE * ncaps
    if length != n or need > n or nwords > cat.MAX_WORDS or ncaps > cat.MAX_CAPS:
        raise wire.WireError(f"frame of {n} bytes says length {length}, {nwords} words, {ncaps} capabilities")
    head = bytes(payload[:8]) + need.to_bytes(4, "little") + bytes(payload[12:need])
    f = wire.decode(head, any_version=True)
    flags = int.from_bytes(payload[28:32], "little")
    return RemoteFrame(f.kind, f.seq, f.label, f.opcode, list(f.words), list(f.caps), flags, bytes(payload[need:]))


# -- zero-run encoding of memory bytes (READ replies, WRITE) -----------------------------------


def zero_runs_encode(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as records ``u16 zeros, u16 literal count, literal bytes``.

    A literal run ends where at least 8 zero bytes start (or at 65535 bytes);
    mostly-zero memory such as a fresh config page or ring shrinks to a
    fraction of its size, other bytes grow by 4 per 65535.
    """
    src = bytes(data)
    n = len(src)
    out = bytearray()
    i = 0
    find = src.find
    while i < n:
        j = i
        while j < n and src[j] == 0 and j - i < 0xFFFF:
            j += 1
        zeros = j - i
        end = find(b"\0" * 8, j)
        if end < 0:
            end = n
        if end - j > 0xFFFF:
            end = j + 0xFFFF
        # trailing zeros shorter than 8 at the very end belong to the next record's zero run
        if end == n:
            stripped = len(src[j:n]) - len(src[j:n].rstrip(b"\0"))
            if stripped and j < n - stripped:
                end = n - stripped
        out += zeros.to_bytes(2, "little") + (end - j).to_bytes(2, "little") + src[j:end]
        i = end
    return bytes(out)


def zero_runs_decode(data: bytes | bytearray | memoryview, size: int) -> bytes:
    """The ``size`` bytes that :func:`zero_runs_encode` produced ``data`` from (ValueError if they do not add up)."""
    src = bytes(data)
    out = bytearray()
    i = 0
    n = len(src)
    while i < n:
        if n - i < 4:
            raise ValueError("zero-run record cut short")
        zeros = int.from_bytes(src[i : i + 2], "little")
        lit = int.from_bytes(src[i + 2 : i + 4], "little")
        i += 4
        if lit > n - i or len(out) + zeros + lit > size:
            raise ValueError("zero-run records overrun the expected size")
        out += bytes(zeros)
        out += src[i : i + lit]
        i += lit
    if len(out) != size:
        raise ValueError(f"zero-run records give {len(out)} bytes, expected {size}")
    return bytes(out)
