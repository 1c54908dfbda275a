"""Device models served by the emulator, and their options.

A model gives the device id, its feature bits, the device-specific config,
its queues and (for real I/O) how requests are handled.  Options come from
``l4vctl emulate TYPE --opt VALUE`` or from an ``emu:TYPE?opt=value`` URL.
A profile (``profile=NAME``) makes a model reproduce a real device server:
it brings option defaults of its own and what no option can say.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from l4vctl.errors import UsageError

D = TypeVar("D")

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


class Profile:
    """A real device server whose config page a model reproduces (``profile=NAME``).

    ``options`` are option values as a URL gives them; they replace the
    options' defaults, and options the user gives still win.  ``features``
    are the device-class bits the server offers besides those its options
    imply (they replace the model's ``FEATURES``); ``config`` holds device
    config values of the server that no option sets.  ``config_size`` is how
    many bytes of device config the server publishes: the queue array
    follows at the next 16-byte boundary.  With ``late_features`` the page
    shows only VERSION_1 in dev_features_map until the first reset publishes
    the rest; with ``keep_queue_entries`` a reset leaves the queue-config
    entries as the driver wrote them (num and ready included).
    """

    __slots__ = ("name", "options", "features", "config", "config_size", "late_features", "keep_queue_entries")

    def __init__(self, name: str, *, options: dict[str, str] | None = None,
                 features: frozenset[int] = frozenset(), config: dict | None = None,
                 config_size: int | None = None, late_features: bool = False,
                 keep_queue_entries: bool = False):  # fmt: skip
        self.name = name
        self.options = dict(options or {})
        self.features = frozenset(features)
        self.config = dict(config or {})
        self.config_size = config_size
        self.late_features = late_features
        self.keep_queue_entries = keep_queue_entries


def model_class(kind: str):
    """The model class of device type ``kind``, imported on first use; UsageError for an unknown type."""
    entry = MODELS.get(kind)
    if entry is None:
        raise UsageError(f"unknown device type {kind!r}", hint="types: " + ", ".join(MODELS))
    module, cls, _desc = entry
    return getattr(importlib.import_module(module), cls)


def profiles() -> dict[str, list[Profile]]:
    """The profiles of every device type that has any."""
    out = {}
    for kind in MODELS:
        found = list(model_class(kind).PROFILES.values())
        if found:
            out[kind] = found
    return out


def profile_list() -> str:
    """Every profile with its device type: 'blk: l4re-ahci, l4re-nvme; net: ...'."""
    return "; ".join(f"{kind}: {', '.join(p.name for p in found)}" for kind, found in profiles().items())


def find_profile(kind: str, name: str) -> Profile:
    """Profile ``name`` of device type ``kind``; UsageError (listing the profiles) for another name."""
    profile = model_class(kind).PROFILES.get(name)
    if profile is None:
        raise UsageError(f"{kind}: unknown profile {name!r}", hint="profiles: " + profile_list())
    return profile


def parse_options(kind: str, raw: dict[str, str]) -> dict:
    """Typed options of a model (device options plus the common ones).

    A ``profile`` option is looked up first; its option values are parsed
    before the ones in ``raw``, which win.
    """
    from l4vctl.emulator.models.base import COMMON_OPTIONS

    cls = model_class(kind)
    known = {o.name: o for o in (*COMMON_OPTIONS, *cls.OPTIONS)}
    out = {name: o.default for name, o in known.items()}
    raw = dict(raw)
    profile = None
    if raw.get("profile") is not None:
        profile = find_profile(kind, str(raw.pop("profile")))
        out["profile"] = profile
    for key, value in [*(profile.options.items() if profile else ()), *raw.items()]:
        opt = known.get(key.replace("-", "_"))
        if opt is None:
            raise UsageError(f"{kind}: unknown option {key!r}", hint="options: " + ", ".join(sorted(known)))
        try:
            out[opt.name] = opt.parse(value)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{kind}: option {key}: {exc}") from None
    return out


def build_device(kind: str, raw: dict[str, Any], make: Callable[[Any], D]) -> D:
    """``make(model)`` for a model of ``kind`` built from raw options; usage errors for bad ones.

    Option values are strings (from a device URL) or values the option
    parsers take as they are (ints and bools from the command line).
    ``make`` wraps the model in a transport's device (L4-VIRTIO or
    vhost-user); a ValueError from either is a usage error, and the model
    is closed.
    """
    options = parse_options(kind, raw)
    try:
        model = model_class(kind)(options)
    except ValueError as exc:
        raise UsageError(f"{kind}: {exc}") from None
    if model.num_queues() < model.MIN_QUEUES:
        model.close()
        raise UsageError(f"{kind}: needs at least {model.MIN_QUEUES} queues")
    try:
        return make(model)
    except ValueError as exc:
        model.close()
        raise UsageError(f"{kind}: {exc}") from None
