"""Capabilities of the socket emulation: dataspaces (memfd) and IRQs (eventfd).

Both sides use these thin wrappers around file descriptors.  Every object
owns its descriptor and closes it once; mappings are closed with the object
that made them.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import stat
import threading
import time
from collections.abc import Iterable

from l4vctl import catalog as cat
from l4vctl.errors import FormatError

PAGE = mmap.PAGESIZE

#: Seals every dataspace carries before it is handed to a peer: its size is fixed,
#: so no side can shrink it under the other's mapping (SIGBUS) or grow it.
SEAL_SHRINK = fcntl.F_SEAL_SHRINK
SEAL_GROW = fcntl.F_SEAL_GROW
SEAL_SEAL = fcntl.F_SEAL_SEAL
SEAL_WRITE = fcntl.F_SEAL_WRITE
#: No new writable mapping or write() from anyone; mappings made before stay writable.
SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
SIZE_SEALS = SEAL_SHRINK | SEAL_GROW

# Object rights of a capability item (L4 cap rights): the catalog's, by their short names.
RIGHT_W = cat.CAP_RIGHT_W
RIGHT_S = cat.CAP_RIGHT_S
RIGHT_R = cat.CAP_RIGHT_R
RIGHTS_RO = cat.CAP_RIGHTS_RO
RIGHTS_RW = cat.CAP_RIGHTS_RW


def fd_kind(fd: int) -> str:
    """What an fd is: 'memfd', 'eventfd', 'file', 'socket', 'pipe' or 'other'."""
    try:
        st = os.fstat(fd)
    except OSError:
        return "closed"
    if stat.S_ISREG(st.st_mode):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        return "memfd" if target.startswith("/memfd:") else "file"
    if stat.S_ISSOCK(st.st_mode):
        return "socket"
    if stat.S_ISFIFO(st.st_mode):
        return "pipe"
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "other"
    return "eventfd" if target == "anon_inode:[eventfd]" else "other"


def seals(fd: int) -> int | None:
    """The seals of a memfd (None if the file cannot carry seals)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return None


def dataspace_problem(fd: int, need: int = PAGE) -> str | None:
    """Why ``fd`` is not a dataspace that can be mapped safely, or None.

    A dataspace received from a peer must be a memfd sealed against
    shrinking (else the peer can truncate it under the mapping, and the next
    access ends this process with SIGBUS), backed by ordinary pages (a
    hugetlb memfd faults with SIGBUS when the pool runs dry), and hold at
    least ``need`` bytes.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        return f"cannot fstat it ({exc.strerror})"
    kind = fd_kind(fd)
    if kind != "memfd":
        article = "an" if kind[0] in "aeiou" else "a"
        return f"it is {article} {kind}, not a memfd (only a sealed memfd cannot be truncated by its peer)"
    if st.st_blksize != PAGE:
        return f"its pages are {st.st_blksize} bytes, not {PAGE} (a hugetlb memfd is not accepted)"
    have = seals(fd) or 0
    if not have & SEAL_SHRINK:
        return "it is not sealed against shrinking (F_SEAL_SHRINK)"
    if st.st_size < need:
        return f"it holds {st.st_size} bytes, {need} are needed"
    return None


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd, ignoring ones already closed or invalid."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Dataspace:
    """Shared memory lent between driver and device (a memfd or file)."""

    __slots__ = ("fd", "size", "rights", "name", "_maps")

    def __init__(self, fd: int, size: int, rights: int = RIGHTS_RW, name: str = ""):
        self.fd = fd
        self.size = size
        self.rights = rights
        self.name = name
        self._maps: list[mmap.mmap] = []

    @classmethod
    def create(cls, name: str, size: int, *, final: bool = True) -> Dataspace:
        """A new memfd of ``size`` bytes (rounded up to pages), its size sealed.

        With ``final`` (the default) the seals are sealed too (F_SEAL_SEAL), so
        a peer cannot add a write seal that would lock out the next mapping;
        otherwise the creator adds more seals itself (see :meth:`seal`).
        """
        size = max(PAGE, -(-size // PAGE) * PAGE)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS | (SEAL_SEAL if final else 0))
        except OSError:
            os.close(fd)
            raise
        return cls(fd, size, RIGHTS_RW, name)

    def seal(self, extra: int) -> None:
        """Add seals (e.g. SEAL_FUTURE_WRITE after mapping it writable) and close the set."""
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, extra | SEAL_SEAL)

    @classmethod
    def adopt(cls, fd: int, size: int, rights: int = RIGHTS_RW, name: str = "", need: int = 0,
              what: str = "dataspace") -> Dataspace:  # fmt: skip
        """Wrap a dataspace received from a peer, after checking it is safe to map.

        Takes ownership of ``fd`` (closed on failure).  Raises FormatError
        naming ``what`` and the reason for an fd that is not a size-sealed
        memfd of at least ``need`` bytes.
        """
        why = dataspace_problem(fd, max(need, 1))
        if why is not None:
            close_fds([fd])
            raise FormatError(f"{what} refused: {why}")
        return cls(fd, size, rights, name)

    @property
    def writable(self) -> bool:
        """Whether the rights include writing."""
        return bool(self.rights & RIGHT_W)

    def map(self, offset: int = 0, length: int | None = None, writable: bool = True) -> mmap.mmap:
        """Map ``length`` bytes at ``offset`` (page aligned); closed with the object."""
        length = self.size - offset if length is None else length
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        m = mmap.mmap(self.fd, length, mmap.MAP_SHARED, prot, offset=offset)
        self._maps.append(m)
        return m

    def close(self) -> None:
        """Unmap every mapping made by :meth:`map` and close the fd (idempotent)."""
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # a memoryview still exports it; the mapping ends with it
        self._maps.clear()
        if self.fd >= 0:
            close_fds([self.fd])
            self.fd = -1

    def __repr__(self) -> str:
        return f"<Dataspace {self.name or self.fd} {self.size:#x} rights={self.rights:#x}>"


_ONE = (1).to_bytes(8, "little")
#: Seconds a trigger may stay blocked in eventfd_write before the guard unblocks it.
TRIGGER_GUARD = 0.25


class _TriggerGuard:
    """Unblocks a trigger that a peer made block.

    The file status flags of an eventfd are shared by everyone holding it,
    so a peer can clear O_NONBLOCK and fill the counter between this side's
    poll and its write.  The guard thread (started with the first trigger)
    sees a write that has not returned within TRIGGER_GUARD seconds and
    reads the counter empty, which lets the write finish.  A trigger only
    stores the time it starts writing in its Irq, so the guard costs the
    hot path next to nothing.
    """

    def __init__(self):
        self.irqs: set = set()  # Irqs that were triggered (and are not closed)
        self.thread: threading.Thread | None = None
        self.unblocked = 0

    def after_fork(self) -> None:
        self.irqs = set()
        self.thread = None

    def watch(self, irq) -> None:
        self.irqs.add(irq)
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="l4vctl-irq-guard", daemon=True)
            self.thread.start()

    def _watch(self) -> None:
        while True:
            time.sleep(TRIGGER_GUARD / 2)
            now = time.monotonic()
            for irq in list(self.irqs):
                since, fd = irq._since, irq.fd
                if since and now - since >= TRIGGER_GUARD and fd >= 0 and irq._since == since:
                    self.unblocked += 1
                    _read_nowait(fd)


_GUARD = _TriggerGuard()
os.register_at_fork(after_in_child=_GUARD.after_fork)


def _read_nowait(fd: int) -> int:
    """Read an eventfd's counter without ever blocking (0 if it is empty)."""
    buf = bytearray(8)
    try:
        n = os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: no RWF_NOWAIT here
            return 0
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(0):
            return 0
        try:
            return os.eventfd_read(fd)
        except OSError:
            return 0
    return int.from_bytes(buf, "little") if n == 8 else 0


class Irq:
    """A notification object: an eventfd that one side triggers and the other waits on.

    The eventfd may be shared with a peer that does not play by the rules
    (clears O_NONBLOCK, fills the counter to 2^64-2): reads never block
    (RWF_NOWAIT), writes are only made when poll says they fit, and a full
    counter counts as a wake-up the peer has pending anyway.
    """

    __slots__ = ("fd", "_poll", "_since")

    def __init__(self, fd: int):
        self.fd = fd
        self._poll: select.poll | None = None
        self._since = 0.0  # when a write started that has not returned yet

    @classmethod
    def create(cls) -> Irq:
        """A new non-blocking eventfd of our own."""
        return cls(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    @classmethod
    def adopt(cls, fd: int, what: str = "IRQ") -> Irq:
        """Wrap an IRQ received from a peer: it must be an eventfd.

        Takes ownership of ``fd`` (closed on failure); raises FormatError
        for a pipe, file, directory, socket or anything else.
        """
        kind = fd_kind(fd)
        if kind != "eventfd":
            close_fds([fd])
            article = "an" if kind[0] in "aeiou" else "a"
            raise FormatError(f"{what} refused: it is {article} {kind}, not an eventfd")
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        except OSError:
            pass
        return cls(fd)

    def trigger(self) -> bool:
        """Add one wake-up; False if the counter is full (a wake-up is pending anyway)."""
        p = self._poll
        if p is None:
            p = self._poll = select.poll()
            p.register(self.fd, select.POLLOUT)
            _GUARD.watch(self)
        try:
            if not p.poll(0):
                return False  # the counter cannot take one more: the peer has a wake-up pending
            self._since = time.monotonic()
            try:
                os.eventfd_write(self.fd, 1)
            finally:
                self._since = 0.0
        except OSError:  # EAGAIN on a full counter, or the peer broke the fd
            return False
        return True

    def drain(self) -> int:
        """Consume pending triggers; return how many there were (never blocks)."""
        return _read_nowait(self.fd)

    def wait(self, timeout: float | None) -> bool:
        """Wait until triggered (consuming the triggers); False on timeout."""
        if self.drain():
            return True
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not p.poll(ms):
            return False
        self.drain()
        return True

    def close(self) -> None:
        """Stop guarding it and close the fd (idempotent)."""
        if self.fd >= 0:
            self._poll = None
            _GUARD.irqs.discard(self)
            close_fds([self.fd])
            self.fd = -1

    def __repr__(self) -> str:
        return f"<Irq fd={self.fd}>"
