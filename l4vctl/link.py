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
                keep = 1 if end and buf[end - 1] == _SYNC[0] else 0
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
