"""The emulator's log: one line per message on stderr, filtered by level.

A few functions instead of the logging package keep an embedded emulator
cheap to start; the interface mirrors ``logging`` (``log.info("x %d", n)``).
"""

from __future__ import annotations

import os
import sys

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"DEBUG": DEBUG, "INFO": INFO, "WARNING": WARNING, "ERROR": ERROR}

_state = {"level": WARNING, "prefix": "l4vctl emulator"}


def configure(level: int | str, prefix: str) -> None:
    if isinstance(level, str):
        level = LEVELS.get(level.upper(), WARNING)
    _state["level"] = level
    _state["prefix"] = prefix


def enabled(level: int) -> bool:
    return level >= _state["level"]


def _emit(level: int, msg: str, args) -> None:
    if level < _state["level"]:
        return
    text = msg % args if args else msg
    try:
        sys.stderr.write(f"{_state['prefix']}[{os.getpid()}]: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr is gone: nothing to tell anyone


def debug(msg: str, *args) -> None:
    _emit(DEBUG, msg, args)


def info(msg: str, *args) -> None:
    _emit(INFO, msg, args)


def warning(msg: str, *args) -> None:
    _emit(WARNING, msg, args)


def error(msg: str, *args) -> None:
    _emit(ERROR, msg, args)


def exception(msg: str, *args) -> None:
    """An error with the traceback of the exception being handled."""
    import traceback

    _emit(ERROR, msg + "\n" + traceback.format_exc().rstrip(), args)
