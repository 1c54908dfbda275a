"""The memory archive: a config page and the driver's memory, saved (``dump-config --with-memory``).

A 16-byte header, a UTF-8 JSON manifest of ``manifest_size`` bytes, then the
data section: the page, then each captured region's bytes, one after the
other, as the manifest lists them (docs/memory-archive.md).
"""

from __future__ import annotations

from construct import Bytes, Int16ul, Int32ul, Struct

archive_header = Struct(
    "magic" / Bytes(8) * "the bytes 89 4C 34 56 4D 45 4D 0A (\\x89 L4VMEM \\n)",
    "version" / Int16ul * "archive format version (1)",
    "flags" / Int16ul * "0",
    "manifest_size" / Int32ul * "bytes of the JSON manifest that follows the header",
)
