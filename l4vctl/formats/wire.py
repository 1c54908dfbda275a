"""Frames of the l4vctl socket emulation (see docs/wire-protocol.md).

One frame is a 32-byte header, ``nwords`` 64-bit scalar words and ``ncaps``
16-byte capability items.  The same frames serve the fd profile (capabilities
travel as file descriptors next to the frame, a capability's ``handle`` is
its index among them) and a remote profile (a byte stream; ``handle`` is a
numbered handle and ``length`` delimits frames).
"""

from __future__ import annotations

from construct import Bytes, Int8ul, Int16ul, Int32sl, Int32ul, Int64ul, Struct

from l4vctl.catalog import (  # noqa: F401 - the wire constants live in the catalog
    CAP_DATASPACE,
    CAP_IRQ,
    CAP_NONE,
    CAP_TYPES,
    KIND_HELLO,
    KIND_REPLY,
    KIND_REQUEST,
    KIND_WELCOME,
    KINDS,
    L4VCTL_PROTO_MONITOR,
    MAX_CAPS,
    MAX_FRAME,
    MAX_WORDS,
    MONITOR_OP_STATS,
    PROFILE_FD,
    ROLE_DRIVER,
    ROLE_MONITOR,
    ROLES,
    STATS_GLOBAL,
    STATS_QUEUE,
    STATS_VERSION,
    WIRE_MAGIC,
    WIRE_VERSION,
)

frame_header = Struct(
    "magic" / Bytes(4) * "b'L4VW'",
    "version" / Int16ul * "wire protocol version (1)",
    "kind" / Int16ul * "HELLO 1, WELCOME 2, REQUEST 3, REPLY 4",
    "length" / Int32ul * "bytes of the whole frame, header included",
    "seq" / Int32ul * "request number; a reply repeats it",
    "label" / Int32sl * "request: protocol label (0 L4-VIRTIO, -1 ICU); reply: result code",
    "opcode" / Int32sl * "request: opcode; reply: the request's opcode",
    "nwords" / Int16ul * "number of 64-bit scalar words after the header",
    "ncaps" / Int16ul * "number of capability items after the words",
    "flags" / Int32ul * "reserved, 0",
)

cap_item = Struct(
    "type" / Int8ul * "0 none, 1 dataspace, 2 irq",
    "rights" / Int8ul * "object rights: W 0x1, S 0x2, R 0x4 (RW = 0x5)",
    "flags" / Int16ul * "reserved, 0",
    "handle" / Int32ul * "fd profile: index among the passed fds; remote: handle number",
    "size" / Int64ul * "dataspace size in bytes (0 for other types)",
)

#: A scalar word; signed values travel as two's complement.
wire_word = Int64ul
