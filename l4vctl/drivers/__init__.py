"""Device-class drivers on top of a Session and its virtqueues.

Each driver derives from :class:`l4vctl.drivers.base.Driver`; this package
module holds only what a Session needs before any driver exists (the class
check and the bits each driver implements), so that it stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from l4vctl import catalog as cat

if TYPE_CHECKING:
    from l4vctl.session import Session

#: What each driver needs, as a noun for messages.
NOUNS = {"blk": "a block device", "net": "a network device", "console": "a console", "rng": "an entropy device"}


def require_class(session: Session, cls: str, what: str | None = None) -> None:
    """Refuse a device that is not of class ``cls`` before any request of that class is sent.

    A device of another class is a missing device (NegotiationError, exit 5);
    a device whose class the backend cannot know (vhost-user without
    ``?type=``) is a usage error (exit 2): the user must say what it is.
    """
    from l4vctl.errors import NegotiationError, UsageError

    noun = NOUNS.get(cls, f"a {cls} device")
    what = what or f"{cls} I/O"
    unknown = getattr(session.backend, "device_unknown", None)
    if unknown:
        url = session.url
        suggestion = url + ("&" if "?" in url else "?") + f"type={cls}"
        raise UsageError(
            f"{url}: device type {unknown}; {what} needs {noun}",
            hint=f"if it is {noun}, say so: {suggestion}",
        )
    device_id = session.get("device")
    if device_id != cat.DEVICE_CLASSES[cls]:
        raise NegotiationError(
            f"{session.url} is not {noun} (it is {cat.device_name(device_id)}, id {device_id}): {what} needs {noun}"
        )


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
    cat.DEVICE_ID_NET: frozenset({cat.NET_F_MTU, cat.NET_F_MAC, cat.NET_F_STATUS}),
    cat.DEVICE_ID_BLK: frozenset(
        {
            cat.BLK_F_SIZE_MAX,
            cat.BLK_F_SEG_MAX,
            cat.BLK_F_GEOMETRY,
            cat.BLK_F_RO,
            cat.BLK_F_BLK_SIZE,
            cat.BLK_F_FLUSH,
            cat.BLK_F_TOPOLOGY,
            cat.BLK_F_DISCARD,
            cat.BLK_F_WRITE_ZEROES,
        }
    ),
    cat.DEVICE_ID_CONSOLE: frozenset({cat.CONSOLE_F_SIZE}),
    cat.DEVICE_ID_RNG: frozenset(),
}


def implemented_features(device_id: int | None) -> frozenset[int]:
    """The device-class bits l4vctl's driver implements (none for classes it has no driver for)."""
    if device_id is None:
        return frozenset()
    return IMPLEMENTED_FEATURES.get(device_id, frozenset())
