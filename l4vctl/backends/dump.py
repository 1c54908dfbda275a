"""``dump:FILE`` — a saved config page (raw bytes or hex dump), read-only."""

from __future__ import annotations

import sys

from l4vctl.backends import Backend
from l4vctl.errors import FormatError, UnavailableError, UsageError

MAX_INPUT = 1 << 24  # refuse to read more than 16 MiB of input


class DumpBackend(Backend):
    """A page saved to a file (or stdin): decoded offline, never connected."""

    scheme = "dump"
    live = False

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Always available: reading a file needs nothing."""
        return True, ""

    def load(self, fmt: str = "auto") -> tuple[bytes, str, dict]:
        """The page bytes, how they were stored ('raw'/'hex') and hex dump hints."""
        return load_source(self.target, fmt)


def load_source(source: str, fmt: str) -> tuple[bytes, str, dict]:
    """Bytes of an offline page source, how they were stored, and hex dump hints."""
    from l4vctl import hexdump

    path = source[len("dump:") :] if source.startswith("dump:") else source
    if not path:
        raise UsageError("empty source path")
    socket_hint = f"did you mean unix:{path}, or vhost-user:{path} for a vhost-user back-end?"
    if path != "-" and _is_socket(path):
        raise UsageError(f"{path} is a socket, not a saved config page", hint=socket_hint)
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_INPUT + 1)
        else:
            with open(path, "rb") as f:
                raw = f.read(MAX_INPUT + 1)
    except FileNotFoundError:
        raise UnavailableError(f"{path}: no such file", hint=socket_hint if path.endswith(".sock") else None) from None
    except IsADirectoryError:
        raise UnavailableError(f"{path}: is a directory") from None
    except PermissionError:
        raise UnavailableError(f"{path}: permission denied") from None
    except OSError as exc:
        raise UnavailableError(f"{path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_INPUT:
        raise FormatError(f"{path}: larger than {MAX_INPUT >> 20} MiB; not a config page")
    if fmt == "hex" or (fmt == "auto" and hexdump.looks_like_text(raw)):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: not a hex dump (not ASCII text)") from None
        data, hints = hexdump.parse_hexdump(text)
        return data, "hex", hints
    return raw, "raw", {}


def _is_socket(path: str) -> bool:
    import os
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
