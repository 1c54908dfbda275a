"""The shared config page: ABI detection, validation, decoding and building.

Decoding goes through the fast codecs derived from the schemas in
:mod:`l4vctl.formats`, so this module never imports Construct.  The result of
:func:`decode_page` is a JSON-ready dict; keys are the C field names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from l4vctl import catalog as cat
from l4vctl.errors import FormatError, UsageError
from l4vctl.formats.fast import codec

PAGE_SIZE = cat.PAGE_SIZE
HEADER_SIZE = cat.HEADER_SIZE


def header_codec(abi: str):
    """The codec of the config page header of ABI era ``abi``."""
    return codec(f"l4virtio_config_hdr_t@{abi}")


def queue_codec(stride: int = cat.QUEUE_ENTRY_STRIDE):
    """The codec of one queue-config entry ``stride`` bytes long (40, or 36 on i386); ValueError otherwise."""
    if stride == cat.QUEUE_ENTRY_STRIDE:
        return codec("l4virtio_config_queue_t")
    if stride == cat.QUEUE_ENTRY_STRIDE_I386:
        return codec("l4virtio_config_queue_t@i386")
    raise ValueError(f"queue-config stride must be 40 or 36, not {stride}")


def device_config_codec(device_id: int, abi: str):
    """The codec of the device-specific config, or None for unknown devices."""
    from l4vctl.formats.fast import device_config_key

    cls = cat.device_class(device_id)
    if cls is None:
        return None
    return codec(device_config_key(cls, abi))


#: Bytes of device config that L4Re's own servers publish where it is shorter than
#: the specification's struct: ahci-drv and nvme-drv stop virtio_blk_config after the
#: write-zeroes fields (60 bytes, queue array at 0x140), before the secure-erase ones.
L4RE_CONFIG_BYTES = {2: 60}


def queues_offset_for(device_id: int, abi: str, config_size: int | None = None) -> int:
    """Where L4Re devices put the queue array: 0x100 + round_up(sizeof(config), 16).

    An empty C++ config struct counts as 1 byte (rng: 0x110); the config is
    as long as L4Re's servers make it (:data:`L4RE_CONFIG_BYTES`), or
    ``config_size`` bytes if given (a server whose struct differs).
    """
    if config_size is None:
        dc = device_config_codec(device_id, abi)
        config_size = min(dc.size if dc else 0, L4RE_CONFIG_BYTES.get(device_id, 1 << 12))
    size = max(config_size, 1)
    return HEADER_SIZE + (size + 15) // 16 * 16


# -- ABI detection ---------------------------------------------------------------


class AbiChoice:
    """The ABI era used for a page, how it was chosen (explicit, auto or
    dump-header) and why."""

    __slots__ = ("abi", "method", "reason", "ambiguous")

    def __init__(self, abi: str, method: str, reason: str, ambiguous: bool = False):
        self.abi = abi
        self.method = method
        self.reason = reason
        self.ambiguous = ambiguous

    def __repr__(self) -> str:
        return f"AbiChoice({self.abi!r}, {self.method!r}, {self.reason!r}, {self.ambiguous})"

    def to_json(self) -> dict:
        """How and why the era was chosen, for JSON output (the era itself is reported apart)."""
        return {"method": self.method, "reason": self.reason, "ambiguous": self.ambiguous}


def _u32(data, offset: int) -> int:
    return int.from_bytes(bytes(data[offset : offset + 4]), "little")


def detect_abi(data) -> AbiChoice:
    """Guess the header era from a page (heuristic of the protocol notes, §8.2).

    A = bit 0 of u32 @0xAC (classic: VERSION_1; current: shm_sel),
    B = bit 0 of u32 @0xC4 (current: VERSION_1; classic: CMD_CONFIG offered),
    C = u32 @0xA8 (classic: feature word 0; current: reserved),
    D = u32 @0xC0 (current: feature word 0; classic: bits 192-223).
    """
    a = _u32(data, 0xAC) & 1
    b = _u32(data, 0xC4) & 1
    c = _u32(data, 0xA8)
    d = _u32(data, 0xC0)
    if a and not b:
        return AbiChoice("classic", "auto", "VERSION_1 is at the classic position (bit 0 of 0xAC) only")
    if b and not a:
        return AbiChoice("current", "auto", "VERSION_1 is at the current position (bit 0 of 0xC4) only")
    if a and b:
        if c and not d:
            return AbiChoice("classic", "auto", "bit 0 set at 0xAC and 0xC4; feature word 0 is at the classic 0xA8")
        if d and not c:
            return AbiChoice("current", "auto", "bit 0 set at 0xAC and 0xC4; feature word 0 is at the current 0xC0")
        why = "bit 0 set at both 0xAC and 0xC4 and no feature word 0 tells them apart"
    else:
        why = "VERSION_1 is at neither 0xAC nor 0xC4 (page read before the first reset?)"
    return AbiChoice(cat.DEFAULT_ABI, "auto", f"ambiguous: {why}; assumed {cat.DEFAULT_ABI}", True)


def choose_abi(data, abi: str, hints: dict | None = None) -> AbiChoice:
    """The era for ``data``: ``abi`` if it names one, else the hex dump's ``abi`` hint, else :func:`detect_abi`.

    Raises UsageError for an ``abi`` that is neither an era nor ``auto``.
    """
    if abi in cat.ABIS:
        # the CLI marks a value that came from the environment (see commands._common)
        return AbiChoice(str(abi), "explicit", f"chosen with {getattr(abi, 'origin', '--abi')}")
    if abi != "auto":
        raise UsageError(f"unknown ABI {abi!r} (classic, current or auto)")
    hint = (hints or {}).get("abi")
    if hint in cat.ABIS:
        return AbiChoice(hint, "dump-header", f"the hex dump's header says 'abi: {hint}'")
    return detect_abi(data)


# -- bit sets ------------------------------------------------------------------------


def feature_set(words: list[int], table: dict[int, cat.Feature]) -> dict:
    """Feature words decoded: the set bits, names of those ``table`` knows, and the unknown rest."""
    bits = cat.bits_of(words)
    known = [b for b in bits if b in table]
    unknown = [b for b in bits if b not in table]
    mask = 0
    for b in unknown:
        mask |= 1 << b
    return {
        "words": list(words),
        "bits": bits,
        "names": [table[b].name for b in known],
        "unknown_bits": unknown,
        "unknown_mask": mask,
    }


def status_info(value: int) -> dict:
    """A device status byte decoded: flag names, unknown bits, and whether it failed or runs."""
    names, unknown = cat.flag_names(value, cat.STATUS_BITS)
    return {
        "value": value,
        "flags": names,
        "unknown_mask": unknown,
        "fail": bool(value & cat.STATUS_FAIL_MASK),
        "running": value == cat.STATUS_RUNNING,
    }


def cmd_info(value: int, abi: str) -> dict:
    """The cmd word decoded: command byte and name (noting one the era lacks), argument, status set."""
    byte = value >> 24
    argument = value & cat.CMD_ARG_MASK
    out: dict = {"value": value, "command": None, "command_byte": byte, "argument": argument}
    if byte == 0:
        out["command"] = "NONE"
        return out
    known = cat.CMD_WORDS.get(byte)
    if known:
        name, eras = known
        out["command"] = name
        if abi not in eras:
            out["note"] = f"{name} does not exist in the {abi} era"
        if name == "SET_STATUS":
            out["status"] = status_info(argument & 0xFF)
    return out


# -- decoding ------------------------------------------------------------------------


class Decoded:
    """Everything :func:`decode_page` found; ``result`` is JSON-ready."""

    __slots__ = ("result", "problems")

    def __init__(self, result: dict, problems: list[str]):
        self.result = result
        self.problems = problems


def _queue_problems(index: int, q: dict) -> tuple[list[str], list[str]]:
    problems, notes = [], []
    where = f"queue {index}"
    if q["num_max"] > cat.MAX_QUEUE_SIZE:
        problems.append(f"{where}: num_max {q['num_max']} exceeds the split-ring limit {cat.MAX_QUEUE_SIZE}")
    num = q["num"]
    if num:
        if num & (num - 1):  # a power of two in 16 bits is also <= 32768
            problems.append(f"{where}: num {num} is not a power of two")
        elif num > q["num_max"]:
            notes.append(f"num {num} exceeds num_max {q['num_max']}: a device rejects this queue")
    if q["ready"] and not num:
        notes.append("ready with num 0: a device rejects this queue")
    if q["ready"] not in (0, 1):
        notes.append(f"ready is {q['ready']}, neither 0 nor 1")
    for key, align in (("desc_addr", cat.DESC_ALIGN), ("avail_addr", cat.AVAIL_ALIGN), ("used_addr", cat.USED_ALIGN)):
        if q[key] % align:
            notes.append(f"{key} {q[key]:#x} is not {align}-byte aligned: a device rejects this queue")
    return problems, notes


def device_config_fields(data, device_id: int, abi: str, limit: int | None = None) -> tuple[dict, list[str]]:
    """The device-config fields that lie wholly between 0x100 and ``limit``.

    A device config is as long as the device makes it: a device may publish
    a shorter struct than the specification's (an older one, or only the
    fields it implements) and put its queue array right after it.  Fields
    that do not fit before ``limit`` (the queue array, else the end of the
    page) are left out; their names are returned, in layout order.  Unknown
    devices give ``({}, [])``.
    """
    dc = device_config_codec(device_id, abi)
    if dc is None or not dc.size:
        return {}, []
    end = len(data) if limit is None else min(limit, len(data))
    avail = max(0, end - HEADER_SIZE)
    if avail >= dc.size:
        return dc.unpack(data, HEADER_SIZE), []
    buf = bytes(data[HEADER_SIZE : HEADER_SIZE + avail]).ljust(dc.size, b"\0")
    fields = dc.unpack(buf)
    cut = [
        name for name, (offset, size, _fmt, _count) in dc.fields.items() if "." not in name and offset + size > avail
    ]
    for name in cut:
        del fields[name]
    return fields, cut


def _device_config(data, device_id: int, abi: str, limit: int) -> tuple[dict, list[str]]:
    """The decoded device config (0x100 ... limit) and notes about it."""
    dc = device_config_codec(device_id, abi)
    start = HEADER_SIZE
    if dc is None:
        raw = bytes(data[start:limit]) if limit > start else b""
        return {"struct": None, "offset": start, "size": len(raw), "raw": raw.hex()}, []
    struct_name = dc.name.split("@")[0]
    present = min(dc.size, max(0, min(limit, len(data)) - start))
    info: dict = {"struct": struct_name, "offset": start, "size": dc.size, "present": present}
    fields, cut = device_config_fields(data, device_id, abi, limit)
    info["fields"] = _jsonable_config(device_id, fields)
    info["truncated_fields"] = cut
    notes = []
    if cut:
        where = "the queue array" if limit < len(data) else "the end of the page"
        notes.append(
            f"device config: {present} of the {dc.size} bytes of {struct_name} lie before {where} "
            f"at {limit:#x}; fields not present: {', '.join(cut)}"
        )
    return info, notes


def _jsonable_config(device_id: int, fields: dict) -> dict:
    cls = cat.device_class(device_id)
    if cls == "net" and "mac" in fields:
        mac = fields["mac"]
        fields["mac"] = ":".join(f"{b:02x}" for b in mac)
        if "status" in fields:
            fields["status_flags"] = cat.flag_names(fields["status"], cat.NET_STATUS_BITS)[0]
    elif cls == "input" and "u" in fields:
        raw = fields.pop("u")
        fields["u"] = raw.hex()
        fields["decoded"] = _input_union(fields["select"], fields["subsel"], fields["size"], raw)
    elif cls == "blk" and "capacity" in fields:
        fields["capacity_bytes"] = fields["capacity"] * cat.BLK_SECTOR_SIZE
    return fields


def _input_union(select: int, subsel: int, size: int, raw: bytes) -> dict:
    name = cat.INPUT_CFG_SELECT.get(select, f"{select:#x}")
    out: dict = {"select": name}
    size = min(size, len(raw))
    if select in (cat.INPUT_CFG_ID_NAME, cat.INPUT_CFG_ID_SERIAL):
        out["string"] = raw[:size].decode("utf-8", "replace")
    elif select in (cat.INPUT_CFG_PROP_BITS, cat.INPUT_CFG_EV_BITS):
        out["bits"] = [i for i in range(size * 8) if raw[i // 8] >> (i % 8) & 1]
    elif select == cat.INPUT_CFG_ABS_INFO:
        out["absinfo"] = codec("l4virtio_input_absinfo_t").unpack(raw)
    elif select == cat.INPUT_CFG_ID_DEVIDS:
        out["devids"] = codec("l4virtio_input_devids_t").unpack(raw)
    return out


def decode_page(
    data,
    abi: AbiChoice,
    *,
    stride: int = cat.QUEUE_ENTRY_STRIDE,
) -> Decoded:
    """Decode a config page; problems are collected, never raised.

    ``data`` must hold at least the 256-byte header (see :func:`check_size`);
    shorter data is a :class:`FormatError`.
    """
    if len(data) < HEADER_SIZE:
        raise FormatError(f"too short: {len(data)} bytes, a config page has at least 256")
    hc = header_codec(abi.abi)
    qc = queue_codec(stride)
    hdr = hc.unpack(data)
    problems: list[str] = []
    notes: list[str] = []

    if hdr["magic"] != cat.L4VIRTIO_MAGIC:
        shown = bytes(data[:4])
        problems.append(f"bad magic {hdr['magic']:#010x} {shown!r} (expected 0x74726976 b'virt')")
    if hdr["version"] != cat.L4VIRTIO_VERSION:
        problems.append(f"unsupported version {hdr['version']} (expected 2)")

    size = len(data)
    nq, qoff = hdr["num_queues"], hdr["queues_offset"]
    queues_ok = True
    if nq:
        if qoff == 0:
            problems.append(f"num_queues is {nq} but queues_offset is 0")
            queues_ok = False
        elif qoff < HEADER_SIZE:
            problems.append(f"queues_offset {qoff:#x} overlaps the 256-byte header")
            queues_ok = False
        elif qoff % 8:
            problems.append(f"queues_offset {qoff:#x} is not 8-byte aligned")
            queues_ok = False
        elif qoff + nq * stride > size:
            problems.append(f"queue array runs past the end of the page: {qoff:#x} + {nq} x {stride} bytes > {size:#x}")
            queues_ok = False
    elif qoff and qoff > size:
        problems.append(f"queues_offset {qoff:#x} points outside the page ({size:#x} bytes)")

    # The device config spans 0x100 up to a usable queue array, else the page end.
    array_usable = (nq and queues_ok) or (not nq and HEADER_SIZE < qoff <= size)
    limit = qoff if array_usable else size
    devcfg, devcfg_notes = _device_config(data, hdr["device"], abi.abi, limit)
    notes.extend(devcfg_notes)

    queues = []
    if nq and queues_ok:
        for i in range(nq):
            offset = qoff + i * stride
            q = qc.unpack(data, offset)
            q_problems, q_notes = _queue_problems(i, q)
            problems.extend(q_problems)
            queues.append({"index": i, "offset": offset, **q, "notes": q_notes})

    table = cat.feature_table(abi.abi, hdr["device"])
    offered = feature_set(hdr["dev_features_map"], table)
    accepted = feature_set(hdr["driver_features_map"], table)
    extra = set(accepted["bits"]) - set(offered["bits"])
    if extra:
        notes.append("driver accepted bits the device does not offer: " + ", ".join(map(str, sorted(extra))))

    for name, value in hdr.items():
        if name.startswith("_res") and any(value):
            notes.append(f"reserved {name} is not zero: " + " ".join(f"{v:#x}" for v in value))

    cmd = cmd_info(hdr["cmd"], abi.abi)
    if cmd.get("note"):
        notes.append("cmd: " + cmd["note"])
    if cmd["command"] is None:
        notes.append(f"cmd: unknown command byte {cmd['command_byte']:#04x}")

    irq_names, irq_unknown = cat.flag_names(hdr["irq_status"], cat.IRQ_STATUS_BITS)
    dev = cat.DEVICE_IDS.get(hdr["device"])
    result = {
        "abi": abi.abi,
        "abi_detection": abi.to_json(),
        "size": size,
        "queue_stride": stride,
        "header": hdr,
        "device": {
            "id": hdr["device"],
            "name": cat.device_name(hdr["device"]),
            "class": dev.cls if dev else None,
        },
        "vendor": {"id": hdr["vendor"], "name": cat.VENDORS.get(hdr["vendor"])},
        "status": status_info(hdr["status"]),
        "irq_status": {"value": hdr["irq_status"], "flags": irq_names, "unknown_mask": irq_unknown},
        "cmd": cmd,
        "features": {
            "offered": offered,
            "accepted": accepted,
            "table": [
                {
                    "bit": b,
                    "name": table[b].name if b in table else None,
                    "offered": b in offered["bits"],
                    "accepted": b in accepted["bits"],
                }
                for b in sorted(set(offered["bits"]) | set(accepted["bits"]))
            ],
        },
        "device_config": devcfg,
        "queues": queues,
        "notes": notes,
        "problems": problems,
    }
    return Decoded(result, problems)


def check_size(data) -> None:
    """Reject data that cannot hold a page header, or more than one page."""
    if len(data) == 0:
        raise FormatError("empty input: a config page has at least 256 bytes")
    if len(data) < HEADER_SIZE:
        raise FormatError(f"too short: {len(data)} bytes, a config page has at least 256")
    if len(data) > PAGE_SIZE:
        raise FormatError(
            f"too long: {len(data)} bytes, a config page has at most {PAGE_SIZE}",
            hint="use --offset to pick the page inside a larger dump",
        )


# -- building ------------------------------------------------------------------------


def feature_words(abi: str, bits: Iterable[int]) -> list[int]:
    """Map words of the ABI era with ``bits`` set; bits beyond the map are an error."""
    n = header_codec(abi).fields["dev_features_map"][3]
    words = [0] * n
    for bit in bits:
        if not 0 <= bit < 32 * n:
            raise ValueError(f"feature bit {bit} does not fit the {abi} map ({32 * n} bits)")
        words[bit // 32] |= 1 << (bit % 32)
    return words


def build_page(
    abi: str,
    device_id: int,
    *,
    vendor: int = cat.L4VIRTIO_VENDOR_KK,
    features: Iterable[int] = (cat.VERSION_1_BIT,),
    accepted: Iterable[int] = (),
    device_config: dict | None = None,
    num_queues: int = 1,
    num_max: int = 256,
    queues: list[dict] | None = None,
    status: int = 0,
    generation: int = 0,
    cmd: int = 0,
    stride: int = cat.QUEUE_ENTRY_STRIDE,
    size: int = PAGE_SIZE,
    config_size: int | None = None,
    **header_fields,
) -> bytearray:
    """A config page as an L4Re device publishes it.

    ``device_config`` holds the device-specific fields (missing ones are 0);
    ``config_size`` is how many bytes of it the device publishes (default:
    as L4Re's servers do, see :func:`queues_offset_for`): a field beyond
    them must be 0.  ``queues`` overrides queue entries field by field.  If
    the queue array does not fit the page the device publishes no queues, as
    L4Re does.
    """
    page = bytearray(size)
    hc = header_codec(abi)
    qc = queue_codec(stride)
    qoff = queues_offset_for(device_id, abi, config_size)
    if qoff + num_queues * stride > size:
        num_queues, qoff = 0, 0
    hdr: dict[str, Any] = {name: 0 for name, (_o, _s, _f, count) in hc.fields.items() if count is None}
    for name, (_o, _s, _f, count) in hc.fields.items():
        if count is not None:
            hdr[name] = [0] * count
    hdr.update(
        magic=cat.L4VIRTIO_MAGIC,
        version=cat.L4VIRTIO_VERSION,
        device=device_id,
        vendor=vendor,
        num_queues=num_queues,
        queues_offset=qoff,
        status=status,
        generation=generation,
        cmd=cmd,
        dev_features_map=feature_words(abi, features),
        driver_features_map=feature_words(abi, accepted),
    )
    hdr.update(header_fields)
    hc.pack_into(page, 0, hdr)

    dc = device_config_codec(device_id, abi)
    if dc is not None and dc.size:
        values = _zero_struct(dc.layout)
        _merge(values, device_config or {})
        raw = bytearray(dc.size)
        dc.pack_into(raw, 0, values)
        if config_size is not None and any(raw[config_size:]):
            cut = [
                name
                for name, (offset, fsize, _f, _c) in dc.fields.items()
                if "." not in name and offset + fsize > config_size and any(raw[offset : offset + fsize])
            ]
            raise ValueError(f"device config {', '.join(cut)}: beyond the {config_size} bytes the device publishes")
        page[HEADER_SIZE : HEADER_SIZE + dc.size] = raw
    elif device_config:
        raise ValueError(f"device {device_id} has no known config struct")

    for i in range(num_queues):
        entry = {n: 0 for n, (_o, _s, _f, _c) in qc.fields.items()}
        entry["num_max"] = num_max
        if queues and i < len(queues):
            entry.update(queues[i])
        qc.pack_into(page, qoff + i * stride, entry)
    return page


def _zero_struct(layout) -> dict:
    out: dict[str, Any] = {}
    for name, fmt, count, sub in layout:
        if name is None:
            continue
        if sub is not None:
            out[name] = _zero_struct(sub) if count is None else [_zero_struct(sub) for _ in range(count)]
        elif fmt.endswith("s"):
            out[name] = bytes(int(fmt[:-1]))
        else:
            out[name] = 0 if count is None else [0] * count
    return out


def _merge(target: dict, values: dict) -> None:
    for key, value in values.items():
        if key not in target:
            raise ValueError(f"unknown device config field {key!r}")
        if isinstance(target[key], dict) and isinstance(value, dict):
            _merge(target[key], value)
        else:
            target[key] = value
