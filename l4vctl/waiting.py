"""How one side waits for the other: poll briefly, or sleep on a descriptor at once.

Waking a process that sleeps on a descriptor costs tens of microseconds, so
an answer that comes back quickly is caught sooner by polling for it.  That
pays only while the peer runs on another CPU and answers within the spin:

- a :class:`Spin` keeps a running estimate of how long this kind of wait
  takes (an exponential moving average of the waits it saw) and spins for at
  most ``FACTOR`` times that, never longer than its ``cap``, and not at all
  when the waits take longer than the cap anyway (but for one wait in
  ``PROBE``: a wait that ends in sleep is measured with the wake-up in it,
  the very cost a spin saves, so only a spin can tell that answers came
  back quickly);
- between polls it yields the CPU (``sched_yield``), so that a peer that
  shares this CPU can run and answer;
- when this process and its peer can only run on one and the same CPU
  (their CPU affinity, looked at again every ``RECHECK`` seconds), it never
  spins: every microsecond spent polling is one the peer cannot use.

After a spin that caught nothing the caller sleeps on its descriptor and
reports how long the whole wait took with :meth:`Spin.observe`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import TypeVar

#: Spin for at most this many times the estimated wait.
FACTOR = 2.0
#: Weight of one wait in the running estimate.
WEIGHT = 1 / 8
#: Waits count as at most this many caps in the estimate (one long stall must not stop spinning for long).
CLIP = 2.0
#: Seconds between looks at where this process and its peer may run (either can be pinned meanwhile).
RECHECK = 1.0
#: While the waits outlast the cap, one wait in this many still spins (a whole cap) to see if that changed.
PROBE = 16

T = TypeVar("T")

# looked up through the module at every call, so that tests can replace them
_clock = time.perf_counter


def _yield() -> None:
    os.sched_yield()


def cpus(pid: int = 0) -> frozenset[int] | None:
    """The CPUs process ``pid`` (0: this one) may run on; None where that cannot be known."""
    try:
        return frozenset(os.sched_getaffinity(pid))
    except (AttributeError, OSError):  # no such call here, or no such process (any more)
        return None


def one_cpu(peer: int | None = None) -> bool:
    """True if this process and ``peer`` (a pid; None: not known) can only run on one and the same CPU.

    Without a peer (or when its placement cannot be read) the peer is assumed
    to run where this process may run: a process pinned to one CPU has its
    children and usually its partner there too.
    """
    mine = cpus(0)
    if mine is None:
        return (os.cpu_count() or 1) <= 1
    theirs = cpus(peer) if peer else None
    return len(mine if theirs is None else mine | theirs) <= 1


def peer_pid(sock) -> int | None:
    """The process at the other end of a Unix socket (SO_PEERCRED); None if unknown or this process.

    For a socket pair that is the process which made the pair, not
    necessarily the one using the other end: whoever forked the peer knows
    better and should say so.
    """
    import socket
    import struct

    creds = struct.Struct("3i")  # pid, uid, gid
    try:
        pid, _uid, _gid = creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
    except (AttributeError, OSError, ValueError):
        return None
    return pid if pid > 0 and pid != os.getpid() else None


class Spin:
    """One side's policy for one kind of wait: how long to poll before it sleeps.

    ``cap`` is the longest spin in seconds, ``peer`` the pid of the process
    waited for (None: not known).  ``estimate`` is the running estimate of
    how long the waits take; it starts at half the cap (a first spin of a
    whole cap) unless given.
    """

    __slots__ = ("cap", "estimate", "_peer", "_alone", "_checked", "_unspun", "spins", "caught")

    def __init__(self, cap: float, peer: int | None = None, estimate: float | None = None):
        self.cap = cap
        self.estimate = cap / 2 if estimate is None else estimate
        self._peer = peer
        self._alone = False
        self._checked = -math.inf  # when the placement was looked at last
        self._unspun = 0  # waits not spun for since the last probe (the waits outlasting the cap)
        self.spins = 0  # spins begun, and how many of them caught what they waited for
        self.caught = 0

    @property
    def peer(self) -> int | None:
        """The pid of the process waited for (None: not known); setting it looks at the placement again."""
        return self._peer

    @peer.setter
    def peer(self, pid: int | None) -> None:
        if pid != self._peer:
            self._peer = pid
            self._checked = -math.inf

    def alone(self, now: float | None = None) -> bool:
        """True if this process and the peer share one CPU only (looked at every RECHECK seconds)."""
        if now is None:
            now = _clock()
        if now - self._checked >= RECHECK:
            self._checked = now
            self._alone = one_cpu(self._peer)
        return self._alone

    def budget(self, now: float | None = None) -> float:
        """Seconds to spin now: 0 on one CPU or when the waits outlast the cap, else FACTOR x the estimate."""
        if self.estimate > self.cap or self.alone(now):
            return 0.0
        return min(self.cap, FACTOR * self.estimate)

    def observe(self, waited: float) -> None:
        """Count one wait of ``waited`` seconds into the estimate."""
        waited = min(max(waited, 0.0), CLIP * self.cap)
        self.estimate += (waited - self.estimate) * WEIGHT

    def rest(self, seconds: float) -> None:
        """Give the peer time to work where there is no descriptor to sleep on.

        On one CPU the CPU is handed to the peer (``sched_yield``: it runs at
        once, this side again when it is done or its turn is over); elsewhere
        this side sleeps ``seconds``.
        """
        if self.alone():
            _yield()
        else:
            time.sleep(seconds)

    def run(self, poll: Callable[[], T | None], start: float | None = None) -> T | None:
        """Call ``poll`` until it returns something (not None), yielding the CPU between calls.

        ``poll`` is called once in any case, and again until the budget
        (counted from ``start``, default now) runs out; then None is
        returned and the caller sleeps.  While the waits outlast the cap,
        every PROBE-th call spins a whole cap anyway.  A wait that ends
        while spinning is counted into the estimate; one that ends at the
        first call is not (there was nothing to wait for).
        """
        got = poll()
        if got is not None:
            return got
        now = _clock()
        if start is None:
            start = now
        budget = self.budget(now)
        if not budget and self.estimate > self.cap and not self._alone:
            self._unspun += 1
            if self._unspun >= PROBE:  # long waits for a while: are quick answers back?
                self._unspun = 0
                budget = self.cap
        end = start + budget
        if now >= end:
            return None
        self.spins += 1
        while True:
            _yield()
            got = poll()
            now = _clock()
            if got is not None:
                self.caught += 1
                self.observe(now - start)
                return got
            if now >= end:
                return None
