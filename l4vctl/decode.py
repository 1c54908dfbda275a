"""What a descriptor chain carries, per device class: blk requests, net headers, console bytes, rng buffers.

Decoders read a walked :class:`~l4vctl.ringread.Chain` out of a
:class:`~l4vctl.snapshot.Snapshot` and return a JSON-ready dict whose
``kind`` names what was decoded (stable keys, documented in ``queue-show
--help``).  Structures come from the schemas in :mod:`l4vctl.formats` through
their fast codecs; bytes that were not captured are reported, never guessed.
``queue-show``, ``diagnose`` and ``trace`` share these decoders.
"""

from __future__ import annotations

from collections.abc import Set
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat

if TYPE_CHECKING:
    from l4vctl.ringread import Chain
    from l4vctl.snapshot import Snapshot

#: Bytes of console and frame payload shown by default.
DEFAULT_BYTES = 64

PAYLOAD_KINDS = (
    "blk-request", "net-tx", "net-rx", "net-ctrl", "console-tx", "console-rx", "console-control", "rng",
    "unknown",
)  # fmt: skip


def _codec(name: str) -> Any:
    from l4vctl.formats.fast import codec

    return codec(name)


def escape_bytes(data: bytes) -> str:
    """Bytes as text: printable ASCII as it is, ``\\n \\r \\t \\\\`` escaped, anything else ``\\xNN``."""
    out = []
    for b in data:
        if b == 0x5C:
            out.append("\\\\")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        elif b == 0x0A:
            out.append("\\n")
        elif b == 0x0D:
            out.append("\\r")
        elif b == 0x09:
            out.append("\\t")
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def gather(snap: Snapshot, buffers: list, limit: int) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of ``buffers`` in chain order, and whether all of them were captured."""
    out = bytearray()
    for b in buffers:
        if len(out) >= limit:
            break
        n = min(b.len, limit - len(out))
        if n <= 0:
            continue
        if not snap.contains(b.addr, n):
            return bytes(out), False
        out += snap.read(b.addr, n)
    return bytes(out), True


def net_header_size(negotiated: Set[int]) -> int:
    """Bytes of the net header in front of every frame: 12 with VERSION_1 or MRG_RXBUF, else 10."""
    full = _codec("l4virtio_net_header_t").size
    if cat.VERSION_1_BIT in negotiated or cat.NET_F_MRG_RXBUF in negotiated:
        return full
    return full - _codec("l4virtio_net_header_t").fields["num_buffers"][1]


def queue_role(device_class: str | None, queue: int, num_queues: int, negotiated: Set[int]) -> str:
    """What a queue of a device class carries: "rx", "tx", "ctrl", "control-rx", "control-tx", "requests"."""
    if device_class == "net":
        if cat.NET_F_CTRL_VQ in negotiated and num_queues > 2 and queue == num_queues - 1:
            return "ctrl"
        return "rx" if queue % 2 == 0 else "tx"
    if device_class == "console":
        if cat.CONSOLE_F_MULTIPORT in negotiated and queue in (2, 3):
            return "control-rx" if queue == 2 else "control-tx"
        return "rx" if queue % 2 == 0 else "tx"
    return "requests"


def payload(snap: Snapshot, chain: Chain, queue: int, *, used_len: int | None = None,
            max_bytes: int = DEFAULT_BYTES) -> dict[str, Any]:  # fmt: skip
    """The decoded payload of ``chain`` on ``queue``; ``used_len`` is the device's used length when
    the chain was completed (None while it is in flight: what the device writes is not there yet)."""
    negotiated = snap.negotiated
    cls = snap.device_class
    num_queues = len(snap.decoded.get("queues", []))
    role = queue_role(cls, queue, num_queues, negotiated)
    if not chain.buffers:
        return {"kind": "unknown", "notes": ["the chain has no buffers"]}
    if cls == "blk":
        return blk_request(snap, chain, used_len)
    if cls == "net":
        if role == "ctrl":
            return net_ctrl(snap, chain, used_len)
        return net_frame(snap, chain, role, used_len, max_bytes)
    if cls == "console":
        if role.startswith("control"):
            return console_control(snap, chain, role, used_len)
        return console_bytes(snap, chain, role, used_len, max_bytes)
    if cls == "rng":
        return rng_request(chain, used_len)
    return {"kind": "unknown", "notes": [f"no payload decoder for device class {cls or 'unknown'}"]}


def _lens(buffers: list) -> list[int]:
    return [b.len for b in buffers]


def blk_request(snap: Snapshot, chain: Chain, used_len: int | None) -> dict[str, Any]:
    """A virtio-blk request: header (type, sector), data buffers, status byte (once completed)."""
    hc = _codec("l4virtio_block_header_t")
    bufs = chain.buffers
    out: dict[str, Any] = {"kind": "blk-request", "type": None, "type_name": None, "barrier": False,
                           "ioprio": None, "sector": None, "data_len": 0, "data_buffers": 0, "direction": None,
                           "status": None, "status_name": None, "completed": used_len is not None,
                           "used_len": used_len, "notes": []}  # fmt: skip
    head_bytes, ok = gather(snap, [b for b in bufs if not b.write], hc.size)
    if len(head_bytes) < hc.size:
        note = "header not captured" if not ok else f"no {hc.size}-byte device-readable header"
        out["notes"].append(note)
    else:
        hdr = hc.unpack(head_bytes)
        rtype = hdr["type"]
        out["barrier"] = bool(rtype & cat.BLK_T_BARRIER)
        rtype &= ~cat.BLK_T_BARRIER
        out.update(type=rtype, type_name=cat.BLK_REQUEST_TYPES.get(rtype), ioprio=hdr["ioprio"], sector=hdr["sector"])
    # header: readable bytes up to 16; status: the last byte of the last (writable) buffer
    last = bufs[-1]
    data = bufs[1:-1] if len(bufs) >= 2 else []
    if bufs[0].len > hc.size and not bufs[0].write:
        out["notes"].append(f"the header buffer carries {bufs[0].len - hc.size} more bytes")
    out["data_len"] = sum(_lens(data))
    out["data_buffers"] = len(data)
    writes = {b.write for b in data}
    out["direction"] = None if not data else ("in" if writes == {True} else "out" if writes == {False} else "mixed")
    if not last.write or last.len < 1:
        out["notes"].append("the last buffer is not a device-writable status byte")
    elif used_len is not None:
        at = last.addr + last.len - 1
        if snap.contains(at, 1):
            status = snap.read(at, 1)[0]
            out["status"] = status
            out["status_name"] = cat.BLK_STATUS.get(status)
        else:
            out["notes"].append("status byte not captured")
    return out


def _net_header(raw: bytes, size: int) -> dict[str, Any]:
    hc = _codec("l4virtio_net_header_t")
    hdr = hc.unpack(raw[:size].ljust(hc.size, b"\0"))
    if size < hc.size:
        hdr.pop("num_buffers", None)
    hdr["flag_names"] = [name for bit, name in cat.NET_HDR_FLAGS if hdr["flags"] & bit]
    hdr["gso_name"] = cat.NET_HDR_GSO.get(hdr["gso_type"])
    return hdr


def net_frame(snap: Snapshot, chain: Chain, role: str, used_len: int | None, max_bytes: int) -> dict[str, Any]:
    """A net TX chain (header and frame) or RX buffers (header and frame once the device filled them)."""
    size = net_header_size(snap.negotiated)
    out: dict[str, Any] = {
        "kind": "net-tx" if role == "tx" else "net-rx",
        "header_size": size,
        "header": None,
        "frame_len": None,
        "buffer_len": sum(_lens(chain.buffers)),
        "completed": used_len is not None,
        "used_len": used_len,
        "frame": None,
        "notes": [],
    }
    if role == "tx":
        bufs = chain.readable()
        total = sum(_lens(bufs))
        available = total
    else:
        bufs = chain.writable()
        if used_len is None:
            out["notes"].append("receive buffers waiting for a frame")
            return out
        available = min(used_len, sum(_lens(bufs)))
    raw, ok = gather(snap, bufs, min(available, size + max_bytes))
    if available < size:
        out["notes"].append(f"{available} bytes: shorter than the {size}-byte net header")
        return out
    if len(raw) < size:
        out["notes"].append("header not captured")
        return out
    out["header"] = _net_header(raw, size)
    out["frame_len"] = available - size
    out["frame"] = escape_bytes(raw[size:])
    if not ok:
        out["notes"].append("frame bytes not all captured")
    return out


def net_ctrl(snap: Snapshot, chain: Chain, used_len: int | None) -> dict[str, Any]:
    """A control-queue command: class and command by name, its data length, the ack once completed."""
    hc = _codec("virtio_net_ctrl_hdr")
    out: dict[str, Any] = {"kind": "net-ctrl", "class": None, "class_name": None, "cmd": None, "cmd_name": None,
                           "data_len": 0, "ack": None, "ack_name": None, "completed": used_len is not None,
                           "notes": []}  # fmt: skip
    readable = chain.readable()
    raw, _ok = gather(snap, readable, hc.size)
    if len(raw) < hc.size:
        out["notes"].append("command header not captured")
    else:
        hdr = hc.unpack(raw)
        cls_name, cmds = cat.NET_CTRL_CLASSES.get(hdr["class"], (None, {}))
        out.update({"class": hdr["class"], "class_name": cls_name, "cmd": hdr["cmd"], "cmd_name": cmds.get(hdr["cmd"])})
    out["data_len"] = max(0, sum(_lens(readable)) - hc.size)
    last = chain.buffers[-1]
    if used_len is not None and last.write and last.len and snap.contains(last.addr, 1):
        ack = snap.read(last.addr, 1)[0]
        out.update(ack=ack, ack_name=cat.NET_CTRL_ACK.get(ack))
    return out


def console_bytes(snap: Snapshot, chain: Chain, role: str, used_len: int | None, max_bytes: int) -> dict[str, Any]:
    """Console output (TX: what the driver sends) or input (RX: what the device wrote, once completed)."""
    out: dict[str, Any] = {"kind": "console-tx" if role == "tx" else "console-rx", "bytes": 0, "text": None,
                           "truncated": False, "buffer_len": sum(_lens(chain.buffers)),
                           "completed": used_len is not None, "notes": []}  # fmt: skip
    if role == "tx":
        bufs = chain.readable()
        count = sum(_lens(bufs))
    else:
        bufs = chain.writable()
        if used_len is None:
            out["notes"].append("receive buffers waiting for input")
            return out
        count = min(used_len, sum(_lens(bufs)))
    raw, ok = gather(snap, bufs, min(count, max_bytes))
    out["bytes"] = count
    out["text"] = escape_bytes(raw)
    out["truncated"] = len(raw) < count
    if not ok:
        out["notes"].append("bytes not all captured")
    return out


def console_control(snap: Snapshot, chain: Chain, role: str, used_len: int | None) -> dict[str, Any]:
    """A console control message (MULTIPORT): port, event by name, value."""
    hc = _codec("virtio_console_control")
    out: dict[str, Any] = {"kind": "console-control", "id": None, "event": None, "event_name": None, "value": None,
                           "completed": used_len is not None, "notes": []}  # fmt: skip
    bufs = chain.readable() if role == "control-tx" else chain.writable()
    if role == "control-rx" and used_len is None:
        out["notes"].append("receive buffers waiting for a control message")
        return out
    raw, _ok = gather(snap, bufs, hc.size)
    if len(raw) < hc.size:
        out["notes"].append("control message not captured")
        return out
    msg = hc.unpack(raw)
    out.update(id=msg["id"], event=msg["event"], event_name=cat.CONSOLE_EVENTS.get(msg["event"]), value=msg["value"])
    return out


def rng_request(chain: Chain, used_len: int | None) -> dict[str, Any]:
    """An entropy request: the buffer lengths asked for, the bytes produced once completed."""
    writable = chain.writable()
    out: dict[str, Any] = {"kind": "rng", "buffers": _lens(writable), "requested": sum(_lens(writable)),
                           "produced": used_len, "completed": used_len is not None, "notes": []}  # fmt: skip
    if len(writable) != len(chain.buffers):
        out["notes"].append("the chain has device-readable buffers; an entropy device writes only")
    return out


def summary(p: dict[str, Any]) -> str:
    """One line of text for a decoded payload."""
    kind = p["kind"]
    if kind == "blk-request":
        name = p["type_name"] or (f"type {p['type']}" if p["type"] is not None else "?")
        parts = [name + (" (barrier)" if p["barrier"] else "")]
        if p["sector"] is not None:
            parts.append(f"sector {p['sector']}")
        parts.append(f"data {p['data_len']} bytes in {p['data_buffers']} buffer(s)")
        if p["status"] is not None:
            parts.append(f"status {p['status']} {p['status_name'] or '?'}")
        elif not p["completed"]:
            parts.append("status not written yet")
        return ", ".join(parts)
    if kind in ("net-tx", "net-rx"):
        h = p["header"]
        if h is None:
            return f"{p['buffer_len']} bytes of buffers"
        flags = "|".join(h["flag_names"]) or "0"
        gso = h["gso_name"] or h["gso_type"]
        text = (
            f"header {p['header_size']} bytes: flags {flags}, gso {gso}, hdr_len {h['hdr_len']}, "
            f"gso_size {h['gso_size']}, csum {h['csum_start']}+{h['csum_offset']}"
        )
        if "num_buffers" in h:
            text += f", num_buffers {h['num_buffers']}"
        return text + f"; frame {p['frame_len']} bytes"
    if kind == "net-ctrl":
        text = f"{p['class_name'] or p['class']} {p['cmd_name'] or p['cmd']}, data {p['data_len']} bytes"
        return text + (f", ack {p['ack_name'] or p['ack']}" if p["ack"] is not None else "")
    if kind in ("console-tx", "console-rx"):
        if p["text"] is None:
            return f"{p['buffer_len']} bytes of buffers"
        return f'{p["bytes"]} bytes: "{p["text"]}"' + (" ..." if p["truncated"] else "")
    if kind == "console-control":
        if p["event"] is None:
            return "control message"
        return f"port {p['id']} {p['event_name'] or p['event']} value {p['value']}"
    if kind == "rng":
        text = f"{p['requested']} bytes asked in {len(p['buffers'])} buffer(s)"
        return text + (f", {p['produced']} produced" if p["produced"] is not None else "")
    return "; ".join(p.get("notes", [])) or "no decoder"
