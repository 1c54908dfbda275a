"""Memory archives: a config page plus the driver's memory, saved for offline inspection.

Layout (docs/memory-archive.md): the 16-byte ``archive_header`` (magic
``\\x89L4VMEM\\n``, version 1, flags 0, manifest size), a UTF-8 JSON manifest,
then the data section: the page's bytes, then each region's bytes in the
order the manifest lists them, with nothing between and nothing after.

Reading trusts nothing: a wrong magic or version, a manifest that is not a
JSON object of the documented shape, blobs that do not add up to the file
(truncated or with trailing bytes), overlapping regions, sizes beyond the
limits — each is a :class:`FormatError` (exit 4) naming what is wrong.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from l4vctl.errors import FormatError
from l4vctl.files import strict_json

MAGIC = b"\x89L4VMEM\n"
VERSION = 1
FORMAT_NAME = "l4vctl-memory-archive"
#: Largest manifest accepted (a manifest of 4096 regions is about 300 KiB).
MAX_MANIFEST = 1 << 20
#: Most regions an archive may hold.
MAX_REGIONS = 4096
#: Largest archive read (page, manifest and memory).
MAX_ARCHIVE = 1 << 30
#: Per-queue STATS counters readers use; an archive's must be numbers (others are kept as they are).
NUMERIC_QUEUE_KEYS = ("enabled", "num", "next_avail", "avail_idx", "avail_flags", "used_idx", "used_flags",
                      "completed", "notified", "used_event", "avail_event", "signalled_idx")  # fmt: skip
#: Global STATS counters readers use; an archive's must be numbers.
NUMERIC_DEVICE_KEYS = ("stats_version", "driver_attached", "status", "generation", "kicks", "irqs_sent", "regions",
                       "device_errors", "num_queues", "irq_bound", "polling", "features_refused")  # fmt: skip


def _header_codec() -> Any:
    from l4vctl.formats.fast import codec

    return codec("archive_header")


def is_archive(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file) starts with the archive magic."""
    return bytes(head[: len(MAGIC)]) == MAGIC


class Archive:
    """A parsed archive: the page, the manifest's fields and the regions' bytes (views of the file)."""

    __slots__ = ("page", "manifest", "regions")

    def __init__(self, page: memoryview, manifest: dict, regions: list[tuple[int, int, bool, memoryview]]):
        self.page = page
        self.manifest = manifest
        #: ``(base, size, writable, data)`` of every captured region, in device-address order.
        self.regions = regions


def build(page: bytes | memoryview, regions: list[tuple[int, int, bool, Any]], meta: dict) -> list[Any]:
    """The pieces of an archive, in file order (write them one after the other).

    ``regions`` are ``(base, size, writable, data)``; ``meta`` holds the other
    manifest keys (source, taken, abi, registered, device_side, memory_note).
    """
    offset = len(page)
    listed = []
    for base, size, writable, data in regions:
        if len(data) != size:
            raise ValueError(f"region {base:#x}: {len(data)} bytes of data for size {size:#x}")
        listed.append({"base": base, "size": size, "writable": bool(writable), "offset": offset})
        offset += size
    manifest = {
        "format": FORMAT_NAME,
        "version": VERSION,
        **meta,
        "page": {"offset": 0, "size": len(page)},
        "regions": listed,
    }
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    header = _header_codec().pack({"magic": MAGIC, "version": VERSION, "flags": 0, "manifest_size": len(text)})
    return [header, text, page, *(data for *_rest, data in regions)]


def _int(value: Any, what: str, low: int = 0, high: int = 1 << 64) -> int:
    if type(value) is not int or not low <= value < high:
        raise FormatError(f"memory archive: {what} is not a number in {low}..{high - 1}: {value!r}")
    return value


def parse(data: bytes | bytearray | memoryview, name: str = "archive") -> Archive:
    """Check and split an archive held in memory; FormatError for anything malformed."""
    view = memoryview(data)
    hc = _header_codec()
    if len(view) < hc.size:
        raise FormatError(f"{name}: truncated memory archive ({len(view)} bytes, the header alone has {hc.size})")
    hdr = hc.unpack(view)
    if hdr["magic"] != MAGIC:
        raise FormatError(f"{name}: not a memory archive (bad magic {bytes(hdr['magic'])!r})")
    if hdr["version"] != VERSION:
        raise FormatError(f"{name}: memory archive version {hdr['version']}; l4vctl reads version {VERSION}")
    if hdr["flags"]:
        raise FormatError(f"{name}: memory archive flags {hdr['flags']:#x} are not known")
    msize = hdr["manifest_size"]
    if msize > MAX_MANIFEST:
        raise FormatError(f"{name}: memory archive manifest of {msize} bytes (at most {MAX_MANIFEST})")
    start = hc.size + msize
    if len(view) < start:
        raise FormatError(f"{name}: truncated memory archive (the manifest needs {msize} bytes)")
    try:
        manifest = strict_json(bytes(view[hc.size : start]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise FormatError(f"{name}: memory archive manifest is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"{name}: memory archive manifest is not an {FORMAT_NAME} manifest")
    if manifest.get("version") != VERSION:
        raise FormatError(f"{name}: memory archive manifest version {manifest.get('version')!r}")
    body = view[start:]
    page_entry = manifest.get("page")
    if not isinstance(page_entry, dict):
        raise FormatError(f"{name}: memory archive manifest has no page")
    if _int(page_entry.get("offset"), "page offset") != 0:
        raise FormatError(f"{name}: memory archive page does not start the data section")
    psize = _int(page_entry.get("size"), "page size", 256, 65537)
    entries = manifest.get("regions")
    if not isinstance(entries, list) or len(entries) > MAX_REGIONS:
        raise FormatError(f"{name}: memory archive regions must be a list of at most {MAX_REGIONS}")
    expected = psize
    regions = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise FormatError(f"{name}: memory archive region {i} is not an object")
        base = _int(entry.get("base"), f"region {i} base")
        size = _int(entry.get("size"), f"region {i} size", 1)
        offset = _int(entry.get("offset"), f"region {i} offset")
        if base + size > 1 << 64:
            raise FormatError(
                f"{name}: memory archive region {i} ({base:#x}+{size:#x}) passes the end of the address space"
            )
        if offset != expected:
            raise FormatError(
                f"{name}: memory archive region {i} is at {offset:#x} of the data section, expected {expected:#x}"
            )
        if not isinstance(entry.get("writable"), bool):
            raise FormatError(f"{name}: memory archive region {i} lacks writable true/false")
        expected += size
        if expected > len(body):
            raise FormatError(
                f"{name}: truncated memory archive: region {i} ends at {expected:#x} of the data section, "
                f"which holds {len(body):#x} bytes"
            )
        regions.append((base, size, entry["writable"], body[offset : offset + size]))
    if psize > len(body):
        raise FormatError(f"{name}: truncated memory archive: the page needs {psize} bytes, {len(body)} are there")
    if len(body) != expected:
        raise FormatError(f"{name}: memory archive has {len(body) - expected} bytes after its last region")
    regions.sort(key=lambda r: r[0])
    for a, b in itertools.pairwise(regions):
        if a[0] + a[1] > b[0]:
            raise FormatError(f"{name}: memory archive regions {a[0]:#x}+{a[1]:#x} and {b[0]:#x} overlap")
    for key in ("registered", "device_side"):
        if manifest.get(key) is not None and not isinstance(manifest[key], (list, dict)):
            raise FormatError(f"{name}: memory archive {key} has the wrong type")
    side = manifest.get("device_side")
    if side is not None:
        queues = side.get("queues", []) if isinstance(side, dict) else None
        if not isinstance(queues, list) or not all(
            isinstance(q, dict) and all(type(q.get(k, 0)) in (int, bool) for k in NUMERIC_QUEUE_KEYS) for q in queues
        ):
            raise FormatError(f"{name}: memory archive device_side queues must be objects with numeric counters")
        if not all(type(side.get(k, 0)) in (int, bool) for k in NUMERIC_DEVICE_KEYS):
            raise FormatError(f"{name}: memory archive device_side counters must be numbers")
        if not isinstance(side.get("reason", ""), str):
            raise FormatError(f"{name}: memory archive device_side reason must be text")
    if not isinstance(manifest.get("memory_note"), (str, type(None))):
        raise FormatError(f"{name}: memory archive memory_note must be text or null")
    registered = manifest.get("registered")
    if registered is not None:
        if not isinstance(registered, list) or len(registered) > MAX_REGIONS:
            raise FormatError(f"{name}: memory archive registered regions must be a list")
        for i, item in enumerate(registered):
            if not isinstance(item, dict):
                raise FormatError(f"{name}: memory archive registered region {i} is not an object")
            _int(item.get("base"), f"registered region {i} base")
            _int(item.get("size"), f"registered region {i} size")
    return Archive(body[:psize], manifest, regions)


def read_file(path: str) -> Archive:
    """Read and parse the archive at ``path`` (``-``: standard input); errors as the dump backend gives them."""
    from l4vctl.files import read_input

    raw = read_input(path, lambda f: f.read(MAX_ARCHIVE + 1))
    if len(raw) > MAX_ARCHIVE:
        raise FormatError(f"{path}: larger than {MAX_ARCHIVE >> 20} MiB; not a memory archive l4vctl reads")
    return parse(raw, path)
