"""Device-class drivers on top of a Session and its virtqueues."""

from __future__ import annotations

#: Device-class feature bits l4vctl's driver for each class implements, by device id.
#: A session accepts these (and the transport bits it implements) by default; any
#: other bit is accepted only when asked for explicitly, and is then "forced".
#:
#: * net (1): MTU 3 (frames above it are refused), MAC 5 (the source address),
#:   STATUS 16 (link state, read only).  Not CSUM/GSO/TSO/UFO, not MRG_RXBUF (the
#:   driver takes one buffer per frame and ignores num_buffers), no control queue.
#: * blk (2): SIZE_MAX 1 and SEG_MAX 2 (request limits), GEOMETRY 4, BLK_SIZE 6 and
#:   TOPOLOGY 10 (advice only: requests stay in 512-byte sectors), RO 5, FLUSH 9,
#:   DISCARD 13, WRITE_ZEROES 14.  Not CONFIG_WCE, MQ (queue 0 only), LIFETIME,
#:   SECURE_ERASE, ZONED or the legacy BARRIER/SCSI.
#: * console (3): SIZE 0 (cols/rows, read only).  Not MULTIPORT (no control queues),
#:   not EMERG_WRITE.
#: * rng (4): none (the class defines none).
IMPLEMENTED_FEATURES: dict[int, frozenset[int]] = {
    1: frozenset({3, 5, 16}),
    2: frozenset({1, 2, 4, 5, 6, 9, 10, 13, 14}),
    3: frozenset({0}),
    4: frozenset(),
}


def implemented_features(device_id: int | None) -> frozenset[int]:
    """The device-class bits l4vctl's driver implements (none for classes it has no driver for)."""
    return IMPLEMENTED_FEATURES.get(device_id, frozenset())
