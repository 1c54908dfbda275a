"""The link layer of the remote profile: frames on a byte stream that may lose or garble bytes.

A link frame is a 14-byte header and a payload (see docs/wire-protocol.md).
The header carries its own check, so that a receiver trusts ``length`` only
when the header arrived intact, and the payload's CRC-32, so that a damaged
payload is dropped, never delivered.
"""

from __future__ import annotations

from construct import Int8ul, Int16ul, Int32ul, Struct

link_header = Struct(
    "sync" / Int16ul * "0x5AA5: the bytes A5 5A open every frame",
    "type" / Int8ul * "payload type: 1 = one wire frame",
    "version" / Int8ul * "link layer version (1)",
    "length" / Int32ul * "payload bytes that follow the header",
    "payload_crc" / Int32ul * "CRC-32 (zlib) of the payload",
    "header_check" / Int16ul * "low 16 bits of the CRC-32 of the 12 bytes before it",
)
