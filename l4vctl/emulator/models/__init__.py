"""Device models served by the emulator, and their options.

A model gives the device id, its feature bits, the device-specific config,
its queues and (for real I/O) how requests are handled.  Options come from
``l4vctl emulate TYPE --opt VALUE`` or from an ``emu:TYPE?opt=value`` URL.
"""

from __future__ import annotations

import importlib
import re

from l4vctl.errors import UsageError

#: type -> (module, class, one-line description)
MODELS = {
    "blk": ("l4vctl.emulator.models.blk", "BlkModel", "block device (virtio-blk)"),
    "net": ("l4vctl.emulator.models.net", "NetModel", "network device (virtio-net)"),
    "console": ("l4vctl.emulator.models.console", "ConsoleModel", "console (virtio-console)"),
    "rng": ("l4vctl.emulator.models.rng", "RngModel", "entropy source (virtio-rng)"),
}

_SIZE = re.compile(r"^(\d+)\s*([kKmMgGtT]?)(i?[bB])?$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'64M' -> 67108864 (binary units; K, M, G, T with optional iB/B)."""
    m = _SIZE.match(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a size like 512, 64K, 64M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "yes", "true", "on", ""):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (on/off, yes/no, 1/0)")


def parse_int(text) -> int:
    return int(str(text), 0)


class Option:
    """A model option: name, parser, default, help."""

    __slots__ = ("name", "parse", "default", "help")

    def __init__(self, name: str, parse, default, help: str):
        self.name = name
        self.parse = parse
        self.default = default
        self.help = help


def model_class(kind: str):
    entry = MODELS.get(kind)
    if entry is None:
        raise UsageError(f"unknown device type {kind!r}", hint="types: " + ", ".join(MODELS))
    module, cls, _desc = entry
    return getattr(importlib.import_module(module), cls)


def parse_options(kind: str, raw: dict[str, str]) -> dict:
    """Typed options of a model (device options plus the common ones)."""
    from l4vctl.emulator.models.base import COMMON_OPTIONS

    cls = model_class(kind)
    known = {o.name: o for o in (*COMMON_OPTIONS, *cls.OPTIONS)}
    out = {name: o.default for name, o in known.items()}
    for key, value in raw.items():
        opt = known.get(key.replace("-", "_"))
        if opt is None:
            raise UsageError(f"{kind}: unknown option {key!r}", hint="options: " + ", ".join(sorted(known)))
        try:
            out[opt.name] = opt.parse(value)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{kind}: option {key}: {exc}") from None
    return out
