"""Capabilities of the socket emulation: dataspaces (memfd) and IRQs (eventfd).

Both sides use these thin wrappers around file descriptors.  Every object
owns its descriptor and closes it once; mappings are closed with the object
that made them.
"""

from __future__ import annotations

import mmap
import os
import select
import stat

PAGE = mmap.PAGESIZE

# object rights of a capability item (L4 cap rights)
RIGHT_W = 0x1
RIGHT_S = 0x2
RIGHT_R = 0x4
RIGHTS_RO = RIGHT_R
RIGHTS_RW = RIGHT_R | RIGHT_W


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


def close_fds(fds) -> None:
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
    def create(cls, name: str, size: int) -> "Dataspace":
        size = max(PAGE, -(-size // PAGE) * PAGE)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        return cls(fd, size, RIGHTS_RW, name)

    @property
    def writable(self) -> bool:
        return bool(self.rights & RIGHT_W)

    def map(self, offset: int = 0, length: int | None = None, writable: bool = True) -> mmap.mmap:
        """Map ``length`` bytes at ``offset`` (page aligned); closed with the object."""
        length = self.size - offset if length is None else length
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        m = mmap.mmap(self.fd, length, mmap.MAP_SHARED, prot, offset=offset)
        self._maps.append(m)
        return m

    def close(self) -> None:
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


class Irq:
    """A notification object: an eventfd that one side triggers and the other waits on."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def create(cls) -> "Irq":
        return cls(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def trigger(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # the counter is saturated: the peer has a wake-up pending anyway

    def drain(self) -> int:
        """Consume pending triggers; return how many there were."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

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
        if self.fd >= 0:
            close_fds([self.fd])
            self.fd = -1

    def __repr__(self) -> str:
        return f"<Irq fd={self.fd}>"
