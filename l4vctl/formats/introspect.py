"""Walk Construct schemas: field offsets, sizes, C types and meanings.

Used by ``l4vctl layout`` and by the fast-codec derivation.  Only fixed-size
schemas built from little-endian integers, byte strings, padding, arrays and
nested structs are supported; anything else raises ``TypeError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import construct as cs

_CTYPES = {"B": "u8", "H": "u16", "L": "u32", "I": "u32", "Q": "u64", "b": "s8", "h": "s16", "l": "s32", "q": "s64"}


def unwrap(c, adapters: bool = True):
    """Strip renames (names and docstrings), and adapters unless told not to."""
    kinds = (cs.Renamed, cs.Adapter) if adapters else (cs.Renamed,)
    while isinstance(c, kinds):
        c = c.subcon
    return c


def docs_of(c) -> str:
    """The docstring of the outermost named wrapper of ``c`` that has one, else ``""``."""
    while isinstance(c, cs.Renamed):
        if c.docs:
            return c.docs
        c = c.subcon
    return ""


def scalar_format(c) -> str | None:
    """The struct format character of a little-endian integer construct."""
    if isinstance(c, cs.FormatField):
        if c.fmtstr[0] not in "<=" and c.length > 1:
            raise TypeError(f"{c.fmtstr!r}: only little-endian fields are supported")
        return c.fmtstr[1]
    return None


@dataclass
class FieldInfo:
    """One field of a described struct: place, C type, meaning, and members if nested."""

    name: str | None  # None for padding
    offset: int
    size: int
    ctype: str
    doc: str = ""
    count: int | None = None
    fields: list[FieldInfo] = field(default_factory=list)  # members of a nested struct

    def to_json(self) -> dict:
        """The field as a JSON-ready dict (padding and nested members marked)."""
        out = {"name": self.name if self.name is not None else "(padding)", "offset": self.offset, "size": self.size}
        out["type"] = self.ctype
        if self.count is not None:
            out["count"] = self.count
        if self.name is None:
            out["padding"] = True
        if self.doc:
            out["meaning"] = self.doc
        if self.fields:
            out["fields"] = [f.to_json() for f in self.fields]
        return out


def describe(schema, names: dict[int, str] | None = None, base: int = 0) -> list[FieldInfo]:
    """The fields of a struct schema with offsets relative to ``base``.

    ``names`` maps ``id(schema)`` of known sub-structs to their C names, used
    for the type column (``vring_used_elem ring[256]``).
    """
    names = names or {}
    top = unwrap(schema)
    if not isinstance(top, cs.Struct):
        raise TypeError(f"{type(top).__name__} is not a struct")
    out = []
    pos = base
    for sc in top.subcons:
        info = _field(sc, pos, names)
        out.append(info)
        pos += info.size
    return out


def _field(sc, pos: int, names: dict[int, str]) -> FieldInfo:
    name = getattr(sc, "name", None)
    doc = docs_of(sc)
    c = unwrap(sc)
    ch = scalar_format(c)
    if ch:
        return FieldInfo(name, pos, c.length, _CTYPES.get(ch, ch), doc)
    if isinstance(c, cs.BytesInteger) and isinstance(c.length, int):
        return FieldInfo(name, pos, c.length, f"u{8 * c.length}", doc)
    if isinstance(c, cs.Array) and isinstance(c.count, int):
        elem = unwrap(c.subcon)
        ch = scalar_format(elem)
        if ch:
            return FieldInfo(name, pos, elem.length * c.count, _CTYPES.get(ch, ch), doc, c.count)
        if isinstance(elem, cs.Struct):
            elem_name = names.get(id(elem), "struct")
            size = elem.sizeof() * c.count
            return FieldInfo(name, pos, size, elem_name, doc, c.count)
    if isinstance(c, cs.Struct):
        members = describe(c, names, pos)
        size = sum(m.size for m in members)
        return FieldInfo(name, pos, size, names.get(id(c), "struct"), doc, None, members)
    if isinstance(c, cs.Bytes) and isinstance(c.length, int):
        return FieldInfo(name, pos, c.length, "u8", doc, c.length)
    if isinstance(c, cs.Padded) and isinstance(c.length, int):
        return FieldInfo(None, pos, c.length, "u8", "padding", c.length)
    raise TypeError(f"{name}: {type(c).__name__} has no fixed layout")
