"""A monitor's read-only access to the driver's registered memory (monitor REGIONS and READ).

The device answers REGIONS with the dataspaces the driver registered (device
addresses) and READ with one new memfd holding the bytes of the ranges asked
for, sealed against writes and size changes (docs/wire-protocol.md, "Monitor").
Backends without that interface answer -L4_ENOSYS (vhost-user) or another
error (a real L4Re device); they have no reachable memory.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from l4vctl import catalog as cat
from l4vctl.errors import FormatError, ProtocolError, UnavailableError, UsageError

if TYPE_CHECKING:
    from l4vctl._session.attachment import Attachment


def regions(link: Attachment) -> list[tuple[int, int, bool]] | None:
    """``(base, size, writable)`` of every registered region; None if the device has no REGIONS."""
    r = link.call(cat.L4VCTL_PROTO_MONITOR, cat.MONITOR_OP_REGIONS)
    r.close()
    if r.result < 0:
        return None
    words = list(r.words)
    if not words or len(words) != 1 + 3 * words[0]:
        raise ProtocolError("monitor REGIONS reply has an unknown layout")
    out = []
    for i in range(words[0]):
        base, size, flags = words[1 + 3 * i : 4 + 3 * i]
        out.append((base, size, bool(flags & cat.MONITOR_REGION_WRITABLE)))
    return out


def check_ranges(ranges: list[tuple[int, int]]) -> int:
    """The total size of READ ranges; UsageError for ranges one READ cannot carry."""
    if not ranges:
        raise UsageError("no memory range to read")
    if len(ranges) > cat.MONITOR_READ_MAX_RANGES:
        raise UsageError(f"{len(ranges)} ranges: one read takes at most {cat.MONITOR_READ_MAX_RANGES}")
    total = 0
    for addr, size in ranges:
        if not 0 <= addr < 1 << 64 or not 0 < size < 1 << 64:
            raise UsageError(f"bad memory range {addr:#x}+{size:#x}")
        total += size
    if total > cat.MONITOR_READ_MAX_BYTES:
        raise UsageError(f"{total} bytes: one read returns at most {cat.MONITOR_READ_MAX_BYTES >> 20} MiB")
    return total


def read(link: Attachment, name: str, ranges: list[tuple[int, int]]) -> memoryview:
    """The bytes of ``ranges`` (device addresses), concatenated, copied out of the device's reply."""
    from l4vctl.caps import SEAL_FUTURE_WRITE, SEAL_WRITE, close_fds, dataspace_problem, seals

    total = check_ranges(ranges)
    words = [w for pair in ranges for w in pair]
    r = link.call(cat.L4VCTL_PROTO_MONITOR, cat.MONITOR_OP_READ, words)
    try:
        if r.result == -cat.L4_ERANGE:
            where = ", ".join(f"{a:#x}+{s:#x}" for a, s in ranges[:4]) + (" ..." if len(ranges) > 4 else "")
            raise FormatError(f"{name}: memory {where} is not inside the driver's registered memory")
        if r.result < 0:
            if r.result in (-cat.L4_ENOSYS, -cat.L4_EBADPROTO, -cat.L4_EPERM):
                raise UnavailableError(f"{name}: the device has no monitor interface to the driver's memory")
            raise ProtocolError(f"{name}: monitor READ failed: {cat.l4_error_name(r.result)}")
        if list(r.words[:1]) != [total]:
            raise ProtocolError(f"{name}: monitor READ answered {list(r.words)} for {total} bytes")
        fd = r.fd(0, cat.CAP_DATASPACE)
    finally:
        r.close()
    try:
        why = dataspace_problem(fd, total)
        if why is None and not (seals(fd) or 0) & (SEAL_WRITE | SEAL_FUTURE_WRITE):
            why = "it is not sealed against writes"
        if why is not None:
            raise ProtocolError(f"{name}: monitor READ copy refused: {why}")
        buf = bytearray(total)
        view = memoryview(buf)
        done = 0
        while done < total:
            n = os.preadv(fd, [view[done:]], done)
            if n <= 0:
                raise ProtocolError(f"{name}: monitor READ copy ends after {done} of {total} bytes")
            done += n
    finally:
        close_fds([fd])
    return view
