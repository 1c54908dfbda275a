"""How a session reaches a device: backends chosen by a device URL.

A URL is ``SCHEME:REST``.  Built-in schemes are listed in :data:`SCHEMES`;
other packages may add schemes through the ``l4vctl.backends`` entry-point
group (``name = "package.module:Class"``, a subclass of :class:`Backend`;
the contract is in :mod:`l4vctl.backends.base`).  Entry points are read once
per process; listing the schemes imports none of their modules.  An unknown
scheme is a usage error; a known scheme that cannot work on this machine is
"unavailable".
"""

from __future__ import annotations

import importlib
import os
import re
from typing import TYPE_CHECKING

from l4vctl.backends.base import Backend, Channel, Memory, Response, parse_query  # noqa: F401 - the contract
from l4vctl.errors import UnavailableError, UsageError

if TYPE_CHECKING:
    import socket

ENTRY_POINT_GROUP = "l4vctl.backends"
DEFAULT_DEVICE = "emu:blk"

#: scheme -> (module, class, usage, description)
SCHEMES: dict[str, tuple[str, str, str, str]] = {
    "emu": (
        "l4vctl.backends.emu",
        "EmuBackend",
        "emu:TYPE[?OPT=VALUE&...]",
        "an emulator started for this command alone (types: blk, net, console, rng)",
    ),
    "unix": (
        "l4vctl.backends.unix",
        "UnixBackend",
        "unix:PATH",
        "a running emulator ('l4vctl emulate TYPE --socket PATH')",
    ),
    "vhost-user": (
        "l4vctl.backends.vhost_user",
        "VhostUserBackend",
        "vhost-user:PATH[?type=blk|net|rng|console]",
        "a vhost-user back-end, e.g. qemu-storage-daemon's vhost-user-blk export or DPDK testpmd's net_vhost",
    ),
    "l4re": (
        "l4vctl.backends.l4re",
        "L4reBackend",
        "l4re:LINK?dev=NAME",
        "a real L4-VIRTIO device in L4Re through l4vagent (LINK: unix:PATH, tcp:HOST:PORT, serial:DEV)",
    ),
    "trace": (
        "l4vctl.backends.trace",
        "TraceBackend",
        "trace+URL[?trace=FILE]",
        "any live device URL with every transport step recorded as JSON lines (l4vctl trace show/replay)",
    ),
    "dump": (
        "l4vctl.backends.dump",
        "DumpBackend",
        "dump:FILE",
        "a saved config page, raw or hex dump (read-only: no handshake)",
    ),
}

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):(.*)$", re.S)


_plugin_cache: dict[str, str] | None = None


def _plugins() -> dict[str, str]:
    """Schemes added by other packages: name -> "module:attr" (nothing imported; read once)."""
    global _plugin_cache
    if _plugin_cache is None:
        _plugin_cache = _scan_plugins()
    return _plugin_cache


def _scan_plugins() -> dict[str, str]:
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:
        return {}
    return {ep.name: ep.value for ep in eps if ep.name not in SCHEMES}


def split_url(url: str) -> tuple[str, str]:
    """``(scheme, rest)`` of a device URL; a plain path means ``dump:``."""
    if not url:
        raise UsageError("empty device URL")
    m = _SCHEME.match(url)
    if m:
        scheme, rest = m.group(1), m.group(2)
        if scheme.startswith("trace+") and len(scheme) > len("trace+"):
            return "trace", url[len("trace+") :]
        if scheme in SCHEMES or scheme in _plugins():
            return scheme, rest
        if os.path.exists(url):
            return "dump", url
        known = ", ".join(sorted({*SCHEMES, *_plugins()}))
        raise UsageError(f"unknown device scheme {scheme!r} in {url!r}", hint=f"schemes: {known}")
    return "dump", url


def backend_class(scheme: str) -> type[Backend]:
    """The Backend class of a scheme (built-in or plugin; the plugin's module is imported now)."""
    if scheme in SCHEMES:
        module, attr, _usage, _desc = SCHEMES[scheme]
        return getattr(importlib.import_module(module), attr)
    plugin = _plugins().get(scheme)
    if plugin is None:
        raise UsageError(f"unknown device scheme {scheme!r}")
    module, _, attr = plugin.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as exc:
        raise UnavailableError(f"backend {scheme!r} ({plugin}) cannot be loaded: {exc}") from None


#: Set by ``l4vctl --trace FILE`` (or $L4VCTL_TRACE): every live device opened is traced into this file.
TRACE_FILE: str | None = None


def open_backend(url: str, traced: bool = True) -> Backend:
    """The backend object for a device URL (not yet connected).

    With :data:`TRACE_FILE` set (and ``traced``), a live backend comes back
    wrapped in a ``trace+`` one that records into that file.
    """
    scheme, rest = split_url(url)
    cls = backend_class(scheme)
    ok, why = cls.available()
    if not ok:
        raise UnavailableError(f"{scheme}: backend not available here: {why}")
    backend = cls(url, rest)
    if traced and TRACE_FILE and scheme != "trace" and backend.live:
        from l4vctl.backends.trace import TraceBackend

        return TraceBackend.around(backend, TRACE_FILE)
    return backend


def list_backends() -> list[dict[str, object]]:
    """Every scheme with its availability (built-ins are checked cheaply)."""
    out = []
    for scheme, (_module, _attr, usage, desc) in SCHEMES.items():
        ok, why = builtin_available(scheme)
        out.append({"scheme": scheme, "usage": usage, "description": desc, "available": ok,
                    "reason": why, "source": "built-in"})  # fmt: skip
    for scheme, value in sorted(_plugins().items()):
        out.append({"scheme": scheme, "usage": f"{scheme}:...", "description": f"plugin {value}",
                    "available": None, "reason": "not checked (plugins are not imported for listing)",
                    "source": "plugin"})  # fmt: skip
    return out


def builtin_available(scheme: str) -> tuple[bool, str]:
    """Whether a built-in scheme works on this machine: (True, "") or (False, why)."""
    if scheme == "dump":
        return True, ""
    if not hasattr(os, "memfd_create") or not hasattr(os, "eventfd"):
        return False, "needs Linux memfd and eventfd"
    if not _has_seqpacket():
        return False, "needs AF_UNIX SOCK_SEQPACKET sockets"
    return True, ""


def _has_seqpacket() -> bool:
    """Whether AF_UNIX SOCK_SEQPACKET sockets exist here (always on Linux, which memfd and eventfd imply)."""
    import sys

    if sys.platform.startswith("linux"):
        return True  # without importing socket, which costs every command its start-up
    import socket

    return hasattr(socket, "SOCK_SEQPACKET")


def connect_unix(path: str, kind: int, timeout: float, listener: str) -> socket.socket:
    """A connected AF_UNIX socket, or a clear error naming what should be listening.

    A listener whose backlog is full makes a non-blocking connect fail with
    EAGAIN at once; that is retried (backing off) until ``timeout``, so many
    commands started together all get through.
    """
    import socket
    import time

    from l4vctl.errors import TimeoutExpired

    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + timeout
    pause = 0.0005
    try:
        sock.setblocking(False)
        while True:
            try:
                sock.connect(path)
                break
            except (BlockingIOError, InterruptedError):  # EAGAIN: the backlog is full
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError() from None
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.02)
        sock.setblocking(True)
        return sock
    except FileNotFoundError:
        why = f"no such socket (is {listener} running?)"
    except ConnectionRefusedError:
        why = f"connection refused (no {listener} is listening)"
    except TimeoutError:
        sock.close()
        raise TimeoutExpired(
            f"{path}: the listener's queue stayed full for {timeout:g} s (too many clients connecting)"
        ) from None
    except OSError as exc:
        why = exc.strerror or str(exc)
    sock.close()
    raise UnavailableError(f"{path}: {why}")
