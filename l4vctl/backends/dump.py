"""``dump:FILE`` — a saved config page (raw bytes, hex dump or memory archive), read-only.

A memory archive (``dump-config --with-memory``, see :mod:`l4vctl.archive`)
is recognised by its magic: commands that read a page get the archive's
page, and :attr:`DumpBackend.archive` holds the saved memory for those that
inspect rings (queue-show, diagnose, :class:`l4vctl.snapshot.Snapshot`).
"""

from __future__ import annotations

from typing import Any

from l4vctl.backends import Backend
from l4vctl.errors import FormatError, UsageError
from l4vctl.files import read_input

MAX_INPUT = 1 << 24  # refuse to read more than 16 MiB of input


class DumpBackend(Backend):
    """A page saved to a file (or stdin): decoded offline, never connected."""

    scheme = "dump"
    live = False
    #: The memory archive the file holds (set by :meth:`load`), or None for a plain page.
    archive = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Always available: reading a file needs nothing."""
        return True, ""

    def load(self, fmt: str = "auto") -> tuple[bytes, str, dict]:
        """The page bytes, how they were stored ('raw'/'hex'/'archive') and hex dump hints."""
        data, how, hints, archive = load_any(self.target, fmt)
        self.archive = archive
        return data, how, hints


def load_source(source: str, fmt: str) -> tuple[bytes, str, dict]:
    """Bytes of an offline page source, how they were stored, and hex dump hints."""
    data, how, hints, _archive = load_any(source, fmt)
    return data, how, hints


def load_any(source: str, fmt: str) -> tuple[bytes, str, dict, Any]:
    """As :func:`load_source`, and the memory archive (:class:`l4vctl.archive.Archive`) if the file is one."""
    from l4vctl import archive as ar
    from l4vctl import hexdump

    path = source[len("dump:") :] if source.startswith("dump:") else source
    if not path:
        raise UsageError("empty source path")
    socket_hint = f"did you mean unix:{path}, or vhost-user:{path} for a vhost-user back-end?"
    if path != "-" and _is_socket(path):
        raise UsageError(f"{path} is a socket, not a saved config page", hint=socket_hint)
    raw = read_input(path, _read_input, hint=socket_hint)
    if ar.is_archive(raw):
        if len(raw) > ar.MAX_ARCHIVE:
            raise FormatError(f"{path}: larger than {ar.MAX_ARCHIVE >> 20} MiB; not a memory archive l4vctl reads")
        archive = ar.parse(raw, path)
        return bytes(archive.page), "archive", {}, archive
    if len(raw) > MAX_INPUT:
        raise FormatError(f"{path}: larger than {MAX_INPUT >> 20} MiB; not a config page")
    if fmt == "hex" or (fmt == "auto" and hexdump.looks_like_text(raw)):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: not a hex dump (not ASCII text)") from None
        data, hints = hexdump.parse_hexdump(text)
        return data, "hex", hints, None
    return raw, "raw", {}, None


def _read_input(f: Any) -> bytes:
    """The input's bytes: at most MAX_INPUT + 1 for a page, more for a memory archive."""
    from l4vctl import archive as ar

    head = f.read(len(ar.MAGIC))
    limit = ar.MAX_ARCHIVE if ar.is_archive(head) else MAX_INPUT
    return head + f.read(limit + 1 - len(head))


def _is_socket(path: str) -> bool:
    import os
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
