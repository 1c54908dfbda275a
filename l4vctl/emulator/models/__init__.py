"""Device models served by the emulator, and their options.

A model gives the device id, its feature bits, the device-specific config,
its queues and (for real I/O) how requests are handled.  Options come from
``l4vctl emulate TYPE --opt VALUE`` or from an ``emu:TYPE?opt=value`` URL.
"""

from __future__ import annotations

import importlib

from l4vctl.errors import UsageError

#: type -> (module, class, one-line description)
MODELS = {
    "blk": ("l4vctl.emulator.models.blk", "BlkModel", "block device (virtio-blk)"),
    "net": ("l4vctl.emulator.models.net", "NetModel", "network device (virtio-net)"),
    "console": ("l4vctl.emulator.models.console", "ConsoleModel", "console (virtio-console)"),
    "rng": ("l4vctl.emulator.models.rng", "RngModel", "entropy source (virtio-rng)"),
}


class Option:
    """A model option: name, parser, default, help."""

    __slots__ = ("name", "parse", "default", "help")

    def __init__(self, name: str, parse, default, help: str):
        self.name = name
        self.parse = parse
        self.default = default
        self.help = help


def model_class(kind: str):
    """The model class of device type ``kind``, imported on first use; UsageError for an unknown type."""
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
