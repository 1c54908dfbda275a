"""The emulator's log: one line per message on stderr, filtered by level.

A few functions instead of the logging package keep an embedded emulator
cheap to start; the interface mirrors ``logging`` (``log.info("x %d", n)``).
"""

from __future__ import annotations

import os
import sys
from typing import TypedDict

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"DEBUG": DEBUG, "INFO": INFO, "WARNING": WARNING, "ERROR": ERROR}


class _State(TypedDict):
    level: int
    prefix: str


_state: _State = {"level": WARNING, "prefix": "l4vctl emulator"}


def configure(level: int | str, prefix: str) -> None:
    """Set the lowest level written (a number or a name; unknown names mean WARNING) and the line prefix."""
    if isinstance(level, str):
        level = LEVELS.get(level.upper(), WARNING)
    _state["level"] = level
    _state["prefix"] = prefix


def prefix() -> str:
    """The line prefix (the emulator's name)."""
    return _state["prefix"]


def set_prefix(text: str) -> None:
    """Change the line prefix only (to name the device a message is about)."""
    _state["prefix"] = text


def enabled(level: int) -> bool:
    """Whether messages of ``level`` are written (to skip building costly arguments)."""
    return level >= _state["level"]


def _emit(level: int, msg: str, args: tuple[object, ...]) -> None:
    if level < _state["level"]:
        return
    text = msg % args if args else msg
    try:
        sys.stderr.write(f"{_state['prefix']}[{os.getpid()}]: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr is gone: nothing to tell anyone


def debug(msg: str, *args: object) -> None:
    """Write ``msg % args`` at DEBUG level."""
    _emit(DEBUG, msg, args)


def info(msg: str, *args: object) -> None:
    """Write ``msg % args`` at INFO level."""
    _emit(INFO, msg, args)


def warning(msg: str, *args: object) -> None:
    """Write ``msg % args`` at WARNING level."""
    _emit(WARNING, msg, args)


def error(msg: str, *args: object) -> None:
    """Write ``msg % args`` at ERROR level."""
    _emit(ERROR, msg, args)


def exception(msg: str, *args: object) -> None:
    """An error with the traceback of the exception being handled."""
    import traceback

    _emit(ERROR, msg + "\n" + traceback.format_exc().rstrip(), args)
