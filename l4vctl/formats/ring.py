"""The split virtqueue as L4Re uses it: descriptors, available and used rings.

Ring schemas are parameterised by the queue size ``num``; each is composed
from a fixed-size header and a fixed-size element so that fast codecs can be
derived from the pieces (see :mod:`l4vctl.formats.fast`).
"""

from __future__ import annotations

from functools import lru_cache

from construct import Array, Int16ul, Int32ul, Int64ul, Struct

vring_desc = Struct(
    "addr" / Int64ul * "device address of the buffer",
    "len" / Int32ul * "buffer length in bytes",
    "flags" / Int16ul * "NEXT=1, WRITE=2 (device writes), INDIRECT=4",
    "next" / Int16ul * "index of the next descriptor if NEXT is set",
)

vring_used_elem = Struct(
    "id" / Int32ul * "head index of the completed chain",
    "len" / Int32ul * "bytes the device wrote into the chain",
)

#: The first four bytes of the available ring.
vring_avail_hdr = Struct(
    "flags" / Int16ul * "bit0 NO_INTERRUPT: driver asks the device not to interrupt",
    "idx" / Int16ul * "free-running index of the next free ring slot",
)

#: The first four bytes of the used ring.
vring_used_hdr = Struct(
    "flags" / Int16ul * "bit0 NO_NOTIFY: device asks the driver not to kick",
    "idx" / Int16ul * "free-running index of the next used slot",
)

#: Element type of the available ring (a head index).
vring_avail_elem = Int16ul

#: The trailing event-index word of both rings (EVENT_IDX only).
vring_event_word = Int16ul


@lru_cache(maxsize=64)
def desc_table(num: int) -> Array:
    """A descriptor table (the ring's own table or an indirect table)."""
    return Array(num, vring_desc)


def indirect_table(entries: int) -> Array:
    """An indirect descriptor table of ``entries`` descriptors (``len // 16``)."""
    return desc_table(entries)


@lru_cache(maxsize=64)
def vring_avail(num: int) -> Struct:
    """The available ring of ``num`` entries (header, head indices, ``used_event``)."""
    return Struct(
        *vring_avail_hdr.subcons,
        "ring" / Array(num, vring_avail_elem) * "head indices offered to the device",
        "used_event" / vring_event_word * "EVENT_IDX: interrupt when used.idx passes this",
    )


@lru_cache(maxsize=64)
def vring_used(num: int) -> Struct:
    """The used ring of ``num`` entries (header, elements, ``avail_event``)."""
    return Struct(
        *vring_used_hdr.subcons,
        "ring" / Array(num, vring_used_elem) * "completed chains",
        "avail_event" / vring_event_word * "EVENT_IDX: kick when avail.idx passes this",
    )
