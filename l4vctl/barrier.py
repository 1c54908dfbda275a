"""A full memory barrier from Python.

Both sides of a split ring use the "store, then load the other side's
field" pattern (publish avail.idx, then read the device's NO_NOTIFY flag or
avail_event; re-enable notifications, then look at the ring once more).  On
x86 a store may be reordered after a later load, so both sides could miss
each other and sleep.  An uncontended lock acquire and release executes
locked instructions, which order all earlier memory accesses before all later
ones; that is the cheapest full barrier reachable from Python.
"""

from __future__ import annotations

import _thread

_lock = _thread.allocate_lock()


def full_barrier() -> None:
    """Order every earlier memory access before every later one (see module docs)."""
    _lock.acquire()
    _lock.release()
