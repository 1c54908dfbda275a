"""The devices one ``l4vctl emulate`` process serves: ``--device`` specs and TOML files.

A spec is ``TYPE[,KEY=VALUE...]``, as QEMU's ``-device`` (a comma inside a
value is written twice).  KEY is ``socket`` (the path to listen on),
``name`` (the socket ``DIR/NAME.sock`` under ``--socket-dir``, and the
device's name in log lines and ``--json``) or an option of TYPE: the name
of its ``emulate`` flag without the dashes, or of its ``emu:`` URL option
(``size=64M``, ``cmd-mode=on``, ``feature=flush``).  A key without a value
is an empty value, which a flag takes as on (``ro``, ``pty``).

A TOML file holds ``[[device]]`` tables with the same keys and ``type``;
its top level may set ``socket-dir``, ``max-clients``, ``client-timeout``
and ``idle-timeout``.  Relative paths are taken from the current
directory, as on the command line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from l4vctl.errors import UsageError

#: Keys of a spec that are not device options.
OWN_KEYS = ("socket", "name", "vhost_user")
#: Options that a key given twice adds to (comma-separated lists).
LIST_OPTIONS = ("features", "inject")
#: Flag names that differ from their option's name.
ALIASES = {"feature": "features"}
#: Top-level keys of a TOML file, and how each is checked.
SETTINGS = ("socket-dir", "max-clients", "client-timeout", "idle-timeout")
#: sizeof(sun_path), with its terminating NUL.
SUN_PATH = 108

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
SPEC_EXAMPLE = "blk,size=64M,socket=/tmp/blk.sock"


@dataclass
class DeviceSpec:
    """One device to serve: its type, its options (as text), where it listens, what it is called."""

    kind: str
    options: dict[str, str]
    socket: str | None = None
    name: str | None = None
    #: where the spec came from, for error messages: "--device blk,..." or "FILE: device 2"
    origin: str = ""
    #: the vhost-user socket to serve the device on (instead of an L4-VIRTIO socket)
    vhost_user: str | None = None


def split_items(text: str) -> list[str]:
    """``'blk,size=1,features=a,,b'`` -> ``['blk', 'size=1', 'features=a,b']`` (``,,`` is a comma)."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return items


def _types() -> str:
    from l4vctl.emulator.models import MODELS

    return ", ".join(MODELS)


def _check_kind(kind: str, origin: str) -> None:
    from l4vctl.emulator.models import MODELS

    if not kind:
        raise UsageError(f"{origin}: the device type comes first", hint=f"e.g. {SPEC_EXAMPLE}; types: {_types()}")
    if kind not in MODELS:
        raise UsageError(f"{origin}: unknown device type {kind!r}", hint=f"types: {_types()}")


def _option_names(kind: str) -> dict[str, str]:
    """Every key a spec of ``kind`` may use -> the option it sets."""
    from l4vctl.emulator.models import model_class
    from l4vctl.emulator.models.base import COMMON_OPTIONS

    names = {o.name: o.name for o in (*COMMON_OPTIONS, *model_class(kind).OPTIONS)}
    names.update((alias, target) for alias, target in ALIASES.items() if target in names)
    return names


def build_spec(kind: str, pairs: list[tuple[str, str]], origin: str) -> DeviceSpec:
    """A spec from a type and ``(key, value)`` pairs in the order given; usage errors name ``origin``."""
    _check_kind(kind, origin)
    known = _option_names(kind)
    spec = DeviceSpec(kind, {}, origin=origin)
    for key, value in pairs:
        k = key.strip().replace("-", "_")
        if k in OWN_KEYS:
            if getattr(spec, k) is not None:
                raise UsageError(f"{origin}: {k} given twice")
            if not value:
                raise UsageError(f"{origin}: {k}= needs a value", hint=f"e.g. {SPEC_EXAMPLE}")
            if k == "name" and not _NAME.match(value):
                raise UsageError(f"{origin}: name {value!r} is not 1-64 letters, digits, '.', '_' or '-'")
            setattr(spec, k, value)
            if spec.socket is not None and spec.vhost_user is not None:
                raise UsageError(f"{origin}: give socket=PATH (L4-VIRTIO) or vhost-user=PATH, not both")
            continue
        option = known.get(k)
        if option is None:
            if k == "type":
                raise UsageError(f"{origin}: the type comes first, without 'type='", hint=f"e.g. {SPEC_EXAMPLE}")
            keys = sorted({*(k.replace("_", "-") for k in OWN_KEYS), *(n.replace("_", "-") for n in known)})
            hint = "keys: " + ", ".join(keys)
            raise UsageError(f"{origin}: {kind} devices have no option {key.strip()!r}", hint=hint)
        if option in spec.options:
            if option not in LIST_OPTIONS:
                raise UsageError(f"{origin}: {key.strip()} given twice")
            spec.options[option] += "," + value
        else:
            spec.options[option] = value
    return spec


def parse_device(text: str) -> DeviceSpec:
    """The spec of ``--device TEXT``."""
    origin = f"--device {text}"
    kind, *items = split_items(text)
    pairs = []
    for item in items:
        key, _eq, value = item.partition("=")
        if not key.strip():
            what = "an empty item" if not item else f"{item!r} has no key"
            raise UsageError(f"{origin}: {what}", hint=f"TYPE[,KEY=VALUE...] such as {SPEC_EXAMPLE}; a comma "
                                                       "inside a value is written ',,'")  # fmt: skip
        pairs.append((key, value))
    return build_spec(kind.strip(), pairs, origin)


def _text(value: Any, where: str) -> str:
    """A TOML value as the text a spec would give: lists of options become comma-separated."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, list):
        return ",".join(_text(v, where) for v in value)
    raise UsageError(f"{where}: a {type(value).__name__} is not a value here", hint="strings, numbers, booleans, lists")


def _setting(key: str, value: Any, where: str) -> str | int | float:
    if key == "socket-dir":
        if not isinstance(value, str) or not value:
            raise UsageError(f"{where}: socket-dir must be a directory name")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where}: {key} must be a number")
    if key == "max-clients":
        if not isinstance(value, int) or not 1 <= value <= 4096:
            raise UsageError(f"{where}: max-clients must be a whole number from 1 to 4096")
        return value
    low = 0.05 if key == "client-timeout" else 0.0
    if not value >= low:
        raise UsageError(f"{where}: {key} must be at least {low:g} seconds")
    return float(value)


def load_file(path: str) -> tuple[dict[str, Any], list[DeviceSpec]]:
    """Server settings and device specs of a TOML file; a usage error names what is wrong."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    tables = None
    for key, value in data.items():
        k = key.replace("_", "-")
        if k == "device":
            tables = value
        elif k in SETTINGS:
            settings[k] = _setting(k, value, f"{path}: {key}")
        else:
            hint = f"top-level keys: {', '.join(SETTINGS)}; devices go in [[device]] tables"
            raise UsageError(f"{path}: unknown key {key!r}", hint=hint)
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UsageError(f"{path}: no devices", hint='add [[device]] tables such as: type = "blk", socket = "PATH"')
    specs = []
    for i, table in enumerate(tables, 1):
        origin = f"{path}: device {i}"
        kind = table.get("type")
        if not isinstance(kind, str):
            raise UsageError(f"{origin}: needs a type", hint=f'type = "blk" (types: {_types()})')
        pairs = [(key, _text(value, f"{origin}: {key}")) for key, value in table.items() if key != "type"]
        specs.append(build_spec(kind, pairs, origin))
    return settings, specs


def place_sockets(specs: list[DeviceSpec], socket_dir: str | None) -> None:
    """Give every spec its socket path and name; usage errors for a missing, long or shared socket.

    A spec without ``socket`` listens on ``DIR/NAME.sock``; its name
    defaults to its type and how many of that type came before it (blk0,
    blk1, net0).  A spec with a socket but no name is named after the file.
    """
    if socket_dir is not None and not os.path.isdir(socket_dir):
        raise UsageError(f"--socket-dir {socket_dir}: no such directory")
    counts: dict[str, int] = {}
    seen: dict[str, DeviceSpec] = {}
    for spec in specs:
        n = counts.get(spec.kind, 0)
        counts[spec.kind] = n + 1
        if spec.vhost_user is not None:
            spec.socket = spec.vhost_user
        if spec.socket is None:
            if socket_dir is None:
                raise UsageError(f"{spec.origin}: no socket",
                                 hint="give socket=PATH, or --socket-dir DIR for DIR/NAME.sock")  # fmt: skip
            spec.socket = os.path.join(socket_dir, f"{spec.name or spec.kind + str(n)}.sock")
        if spec.name is None:
            base = os.path.basename(spec.socket)
            spec.name = base[: -len(".sock")] if base.endswith(".sock") and len(base) > 5 else base
        size = len(os.fsencode(spec.socket))
        if size >= SUN_PATH:
            raise UsageError(f"{spec.origin}: cannot listen on {spec.socket}: a socket path has at most "
                             f"{SUN_PATH - 1} bytes, this one {size}")  # fmt: skip
        where = os.path.abspath(spec.socket)
        where = os.path.join(os.path.realpath(os.path.dirname(where)), os.path.basename(where))
        other = seen.get(where)
        if other is not None:
            raise UsageError(f"{other.origin} and {spec.origin} both listen on {spec.socket}")
        seen[where] = spec
