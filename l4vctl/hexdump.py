"""Hex dumps of config pages: written in ``hexdump -C`` form, read back leniently.

The writer produces exactly what ``hexdump -C`` prints (16 bytes a line,
``*`` for repeated lines, a last line with the total length), preceded by
``#`` comment lines; ``# abi: classic`` among them records the ABI the
page was decoded with.  The reader accepts that form, ``xxd`` output and
plain ``OFFSET: HEX BYTES`` lines, and names the line of any error.
"""

from __future__ import annotations

import re
import string

from l4vctl.errors import FormatError

_PRINTABLE = set(string.printable.encode()) - set(b"\x0b\x0c")
_HEX_GROUP = re.compile(r"^(?:[0-9a-fA-F]{2})+$")
_OFFSET = re.compile(r"^([0-9a-fA-F]{1,16}):?$")
_ABI_HINT = re.compile(r"^#\s*abi:\s*(classic|current)\b")
MAX_BYTES_PER_LINE = 64
MAX_SIZE = 1 << 24


def _ascii(chunk: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)


def format_hexdump(data: bytes, comments: list[str] | tuple[str, ...] = ()) -> str:
    """``data`` as ``hexdump -C`` text with leading ``# comment`` lines."""
    lines = [f"# {c}" for c in comments]
    previous = None
    starred = False
    for off in range(0, len(data), 16):
        chunk = bytes(data[off : off + 16])
        if chunk == previous and len(chunk) == 16:
            if not starred:
                lines.append("*")
                starred = True
            continue
        starred = False
        previous = chunk
        left = " ".join(f"{b:02x}" for b in chunk[:8])
        right = " ".join(f"{b:02x}" for b in chunk[8:])
        hexpart = f"{left:<23}  {right:<23}"
        lines.append(f"{off:08x}  {hexpart}  |{_ascii(chunk)}|")
    lines.append(f"{len(data):08x}")
    return "\n".join(lines) + "\n"


def looks_like_text(data: bytes) -> bool:
    """True if ``data`` is printable ASCII text (a hex dump, not a raw page)."""
    if not data or data.startswith(b"virt"):
        return False
    return all(b in _PRINTABLE for b in data[:65536])


def _line_bytes(rest: str, lineno: int, raw: str) -> bytes:
    """The data bytes of one line, without offset and ASCII column."""
    if "|" in rest:
        rest = rest[: rest.index("|")]
        segments = [rest]
    else:
        # xxd puts its ASCII column after two or more spaces.
        segments = [s for s in re.split(r"\s{2,}", rest.strip()) if s]
    out = bytearray()
    for i, segment in enumerate(segments):
        tokens = segment.split()
        if tokens and all(_HEX_GROUP.match(t) for t in tokens):
            for token in tokens:
                out += bytes.fromhex(token)
            continue
        if i == len(segments) - 1 and i > 0:
            break  # trailing ASCII column
        raise FormatError(f"hex dump line {lineno}: not hex bytes: {raw.strip()[:60]!r}")
    if len(out) > MAX_BYTES_PER_LINE:
        raise FormatError(f"hex dump line {lineno}: {len(out)} bytes on one line (at most {MAX_BYTES_PER_LINE})")
    return bytes(out)


def parse_hexdump(text: str) -> tuple[bytes, dict[str, str]]:
    """Bytes and hints (``{"abi": ...}``) from hex dump text.

    Raises :class:`FormatError` naming the first bad line.
    """
    data = bytearray()
    hints: dict[str, str] = {}
    previous = b""
    pending_repeat = False
    ended = False
    seen_data = False
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = _ABI_HINT.match(line)
            if m:
                hints["abi"] = m.group(1)
            continue
        if ended:
            raise FormatError(f"hex dump line {lineno}: data after the end-of-dump line")
        if line == "*":
            if not previous:
                raise FormatError(f"hex dump line {lineno}: '*' without a line to repeat")
            pending_repeat = True
            continue
        head, _, rest = line.partition(" ")
        m = _OFFSET.match(head)
        if not m:
            raise FormatError(f"hex dump line {lineno}: expected an offset, found {head[:24]!r}")
        offset = int(m.group(1), 16)
        if offset > MAX_SIZE:
            raise FormatError(f"hex dump line {lineno}: offset {offset:#x} is beyond {MAX_SIZE:#x}")
        if not seen_data and offset != 0:
            raise FormatError(f"hex dump line {lineno}: the dump must start at offset 0, not {offset:#x}")
        chunk = _line_bytes(rest, lineno, raw)
        if pending_repeat:
            gap = offset - len(data)
            if gap < 0 or gap % len(previous):
                raise FormatError(f"hex dump line {lineno}: offset {offset:#x} does not continue the repeated lines")
            data += previous * (gap // len(previous))
            pending_repeat = False
        if offset != len(data):
            raise FormatError(f"hex dump line {lineno}: offset {offset:#x}, expected {len(data):#x}")
        if not chunk:
            ended = True  # "OFFSET" alone: total length, the last line of hexdump -C
            continue
        seen_data = True
        data += chunk
        previous = chunk
    if pending_repeat:
        raise FormatError("hex dump ends with '*' but no closing offset line")
    if not data:
        raise FormatError("no hex dump data found")
    return bytes(data), hints
