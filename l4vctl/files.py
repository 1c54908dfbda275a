"""Opening a file l4vctl reads whole (a saved page, a memory archive, a trace) without hanging on a FIFO."""

from __future__ import annotations

import os
import select
import stat
from typing import BinaryIO

#: Longest wait for the first byte of a FIFO (a named pipe nobody may ever write to).
FIFO_WAIT = 10.0


def open_input(path: str) -> BinaryIO:
    """``open(path, "rb")``, but a FIFO without data for FIFO_WAIT seconds is TimeoutExpired (exit 7).

    OSError as ``open`` raises it.
    """
    from l4vctl.errors import TimeoutExpired

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens at once, writer or not
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IsADirectoryError(21, "Is a directory", path)
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            p = select.poll()
            p.register(fd, select.POLLIN)
            if not p.poll(int(FIFO_WAIT * 1000)):
                raise TimeoutExpired(f"{path}: a FIFO nothing was written to within {FIFO_WAIT:g} s")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
