"""Files l4vctl reads whole (a saved page, a memory archive, a trace): opened without hanging on a FIFO,
read with one-line errors, and their JSON parsed strictly."""

from __future__ import annotations

import json
import math
import os
import select
import stat
from collections.abc import Callable
from typing import Any, BinaryIO

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


def read_input(path: str, read: Callable[[BinaryIO], bytes], hint: str | None = None) -> bytes:
    """``read(file)`` of ``path`` (``-``: standard input); a file that cannot be read is UnavailableError.

    ``hint`` goes with "no such file" for a path that ends in ``.sock``.
    """
    import sys

    from l4vctl.errors import UnavailableError

    try:
        if path == "-":
            return read(sys.stdin.buffer)
        with open_input(path) as f:
            return read(f)
    except FileNotFoundError:
        raise UnavailableError(f"{path}: no such file", hint=hint if path.endswith(".sock") else None) from None
    except IsADirectoryError:
        raise UnavailableError(f"{path}: is a directory") from None
    except PermissionError:
        raise UnavailableError(f"{path}: permission denied") from None
    except OSError as exc:
        raise UnavailableError(f"{path}: {exc.strerror or exc}") from None


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses what is not JSON: NaN, Infinity, and numbers beyond a float (ValueError)."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value
