"""Output conventions: stdout carries data, stderr carries messages.

Commands build two things: a JSON-able ``result`` dict and, lazily, a text
:class:`Doc` (headings, key/value blocks, tables, lines).  :class:`Output`
prints one of them.  Plain text is rendered here without any dependency;
on a colour terminal the same document goes through rich.  JSON output is
always one envelope::

    {"schema": 1, "command": ..., "device": ..., "abi": ..., "ok": true, "result": {...}}

and on failure ``"ok": false`` with ``"error": {"type", "message", "exit_code"}``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

SCHEMA_VERSION = 1

# C0 controls (ESC among them), DEL, C1 controls, and the bidirectional
# overrides and isolates that reorder what a terminal shows.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(m) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escape(text: str, keep: str = "") -> str:
    """``text`` safe for a terminal: control characters as ``\\x1b``-style escapes.

    Device-supplied strings (ids, names, frames) go through this before any
    text rendering, so a device cannot move the cursor, retitle the window or
    clear the screen.  ``keep`` names control characters to let through
    (``"\\n"`` for multi-line text that l4vctl itself made).
    """
    if not keep:
        return _CONTROL.sub(_escape_char, text)
    return _CONTROL.sub(lambda m: m.group() if m.group() in keep else _escape_char(m), text)


# -- the text document model ------------------------------------------------------


class Heading:
    """A section heading of a :class:`Doc`."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class KeyValues:
    """A block of ``key: value`` rows, keys aligned."""

    __slots__ = ("rows", "indent")

    def __init__(self, rows: list[tuple[str, str]], indent: int = 2):
        self.rows = rows
        self.indent = indent


class Table:
    """A table with a header row; columns aligned per ``align`` (one ``l`` or ``r`` each)."""

    __slots__ = ("headers", "rows", "align", "indent")

    def __init__(self, headers: Sequence[str], rows: list, align: str = "", indent: int = 2):
        self.headers = headers
        self.rows = rows
        self.align = align  # one of "l"/"r" per column; default left
        self.indent = indent


class Line:
    """One line of free text, indented by ``indent`` spaces."""

    __slots__ = ("text", "indent")

    def __init__(self, text: str, indent: int = 0):
        self.text = text
        self.indent = indent


class Doc:
    """A text document: headings, key/value blocks, tables and lines."""

    def __init__(self):
        self.blocks: list = []

    def heading(self, text: str) -> Doc:
        """Add a heading; returns the document, so calls chain."""
        self.blocks.append(Heading(text))
        return self

    def kv(self, rows: list[tuple[str, str]], indent: int = 2) -> Doc:
        """Add a key/value block; returns the document."""
        self.blocks.append(KeyValues(list(rows), indent))
        return self

    def table(self, headers: Sequence[str], rows, align: str = "", indent: int = 2) -> Doc:
        """Add a table (``align``: one ``l`` or ``r`` per column, left by default); returns the document."""
        self.blocks.append(Table(list(headers), [list(r) for r in rows], align, indent))
        return self

    def line(self, text: str = "", indent: int = 0) -> Doc:
        """Add a line of text (an empty line by default); returns the document."""
        self.blocks.append(Line(text, indent))
        return self


def flags_text(value: int, bits) -> str:
    """lspci style: 'ACKNOWLEDGE+ DRIVER- ...', unknown bits as hex."""
    from l4vctl.catalog import flag_names

    text = " ".join(f"{name}{'+' if value & mask else '-'}" for mask, name in bits)
    _names, unknown = flag_names(value, bits)
    if unknown:
        text += f" unknown:{unknown:#x}"
    return text


def _cell(value) -> str:
    return escape(str(value))


def render_plain(doc: Doc) -> str:
    """The document as plain text (no colour, no box drawing, no control characters)."""
    out: list[str] = []
    for i, block in enumerate(doc.blocks):
        if isinstance(block, Heading):
            if i:
                out.append("")
            out.append(escape(block.text))
        elif isinstance(block, KeyValues):
            if not block.rows:
                continue
            rows = [(_cell(k), _cell(v)) for k, v in block.rows]
            width = max(len(k) for k, _ in rows) + 1
            pad = " " * block.indent
            for key, value in rows:
                out.append(f"{pad}{key + ':':<{width}} {value}".rstrip())
        elif isinstance(block, Table):
            out.extend(_plain_table(block))
        elif isinstance(block, Line):
            out.append((" " * block.indent + escape(block.text)).rstrip())
    return "\n".join(out) + "\n"


def _plain_table(t: Table) -> list[str]:
    cols = len(t.headers)
    widths = [len(h) for h in t.headers]
    for row in t.rows:
        for c in range(cols):
            widths[c] = max(widths[c], len(_cell(row[c])))
    align = (t.align or "l" * cols).ljust(cols, "l")
    pad = " " * t.indent

    def fmt(cells):
        parts = []
        for c in range(cols):
            text = _cell(cells[c])
            parts.append(text.rjust(widths[c]) if align[c] == "r" else text.ljust(widths[c]))
        return (pad + "  ".join(parts)).rstrip()

    return [fmt(t.headers)] + [fmt(r) for r in t.rows]


def render_rich(doc: Doc, file) -> None:
    """The document through rich, for colour terminals."""
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table as RichTable

    console = Console(
        file=file,
        markup=False,
        highlight=False,
        soft_wrap=True,
        force_terminal=True,
        no_color=False,
        color_system="standard" if os.environ.get("TERM") == "dumb" else "auto",
    )
    first = True
    for block in doc.blocks:
        if isinstance(block, Heading):
            if not first:
                console.print()
            console.print(escape(block.text), style="bold")
        elif isinstance(block, KeyValues):
            if block.rows:
                grid = RichTable.grid(padding=(0, 1))
                grid.add_column(style="cyan", no_wrap=True)
                grid.add_column()
                for key, value in block.rows:
                    grid.add_row(_cell(key) + ":", _cell(value))
                console.print(Padding(grid, (0, 0, 0, block.indent), expand=False))
        elif isinstance(block, Table):
            align = (block.align or "l" * len(block.headers)).ljust(len(block.headers), "l")
            table = RichTable(box=None, padding=(0, 1), show_edge=False, header_style="bold")
            for header, a in zip(block.headers, align):
                table.add_column(header, justify="right" if a == "r" else "left")
            for row in block.rows:
                table.add_row(*[_cell(c) for c in row])
            console.print(Padding(table, (0, 0, 0, max(block.indent - 1, 0)), expand=False))
        elif isinstance(block, Line):
            console.print(" " * block.indent + escape(block.text))
        first = False


def use_color(mode: str, stream) -> bool:
    """Colour decision: ``always``/``never``, or ``auto`` = a TTY without NO_COLOR."""
    if mode == "always":
        return True
    if mode == "never" or os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


# -- the output object ----------------------------------------------------------


class Output:
    """Prints one command's result (text or JSON) and its messages."""

    def __init__(self, command: str, *, json_mode: bool = False, color: str = "auto"):
        self.command = command
        self.json_mode = json_mode
        self.color = color
        self.device: str | None = None
        self.abi: str | None = None
        self.json_lines = False  # envelopes went out one per line (--watch): errors do too

    def envelope(self, ok: bool, payload: dict) -> dict:
        """The JSON envelope around ``payload`` (``result`` or ``error``)."""
        env: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "command": self.command,
            "device": self.device,
            "abi": self.abi,
            "ok": ok,
        }
        env.update(payload)
        return env

    def emit(self, result: dict, text: Callable[[], Doc | str], compact: bool = False) -> None:
        """Print the result: the JSON envelope (on one line if ``compact``), or the text."""
        if self.json_mode:
            self.json_lines = self.json_lines or compact
            write_json(self.envelope(True, {"result": result}), compact)
            return
        doc = text()
        if isinstance(doc, str):
            sys.stdout.write(escape(doc, keep="\n\t"))
        elif use_color(self.color, sys.stdout):
            render_rich(doc, sys.stdout)
        else:
            sys.stdout.write(render_plain(doc))
        sys.stdout.flush()

    def fail(self, error_type: str, message: str, exit_code: int, hint: str | None = None) -> None:
        """Report an error: one line on stderr, plus the JSON envelope in JSON mode."""
        print_error(message, hint)
        if self.json_mode:
            error = {"type": error_type, "message": message, "exit_code": exit_code}
            write_json(self.envelope(False, {"error": error}), self.json_lines)


def write_json(obj: Any, compact: bool = False) -> None:
    """Print ``obj`` as JSON on stdout: indented, or on one line if ``compact``."""
    import json

    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print_error(message: str, hint: str | None = None) -> None:
    """Print ``l4vctl: error: message (hint)`` on stderr, escaped."""
    line = f"l4vctl: error: {message}"
    if hint:
        line += f" ({hint})"
    print(escape(line), file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Print ``l4vctl: warning: message`` on stderr, escaped."""
    print(escape(f"l4vctl: warning: {message}"), file=sys.stderr, flush=True)


def info(message: str) -> None:
    """Print ``l4vctl: message`` on stderr, escaped."""
    print(escape(f"l4vctl: {message}"), file=sys.stderr, flush=True)
