"""Parsers for the values users type: sizes, booleans, numbers, MAC addresses.

Device-model options and command-line options share these; each raises
ValueError with a message that names the accepted forms.  Plain functions,
nothing heavy imported.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^(\d+)\s*([kKmMgGtT]?)(i?[bB])?$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """'64M' -> 67108864 (binary units; K, M, G, T with optional iB/B)."""
    m = _SIZE.match(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a size like 512, 64K, 64M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_bool(text: str | bool) -> bool:
    """on/off, yes/no, true/false, 1/0 (an empty value is on)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "yes", "true", "on", ""):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (on/off, yes/no, 1/0)")


def parse_int(text: str | int) -> int:
    """An integer with Python's prefixes: 42, 0x2a, 0o52, 0b101010."""
    return int(str(text), 0)


def parse_mac(text: str | bytes) -> bytes:
    """'52:54:00:12:34:56' (or with '-') -> 6 bytes; 6 bytes pass through."""
    if isinstance(text, bytes) and len(text) == 6:
        return text
    parts = str(text).replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    try:
        out = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56") from None
    return out


def mac_text(mac: bytes) -> str:
    """6 bytes -> '52:54:00:12:34:56'."""
    return ":".join(f"{b:02x}" for b in mac)
