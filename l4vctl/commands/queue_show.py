"""``l4vctl queue-show``: the descriptor chains of a queue, walked read-only and decoded."""

from __future__ import annotations

import click

from l4vctl.commands._common import (
    Command,
    abi_option,
    begin,
    device_options,
    examples,
    json_option,
    resolve_device,
    timeout_option,
)

JSON_KEYS = """\b
JSON result keys:
  queue       index, num, ready, desc_addr, avail_addr, used_addr, event_idx,
              indirect, avail {flags, idx, used_event}, used {flags, idx,
              avail_event}, next_avail (device side; null offline without it),
              pending, findings
  device_class  the page's device class (blk, net, console, rng; null if unknown)
  role        what the queue carries: rx, tx, ctrl, control-rx, control-tx, requests
  selection   {mode: outstanding|index|head|all, value}
  chains      per chain: head, slot, avail_index, state (in-device, pending,
              offered, completed, idle), used_len, buffers [{index, addr, len,
              flags, flag_names, next, write, indirect_level, table}],
              indirect_tables [{index, addr, len}], findings [{kind, message}],
              payload {kind: blk-request|net-tx|net-rx|net-ctrl|console-tx|
              console-rx|console-control|rng|unknown, ...}
  findings    queue-level findings [{kind, message}]
Payload keys by kind (every kind also has notes):
  blk-request      type, type_name, barrier, ioprio, sector, data_len,
                   data_buffers, direction (in|out|mixed), status, status_name,
                   completed, used_len
  net-tx, net-rx   header_size (10|12), header {flags, flag_names, gso_type,
                   gso_name, hdr_len, gso_size, csum_start, csum_offset,
                   num_buffers (12-byte header only)}, frame_len, frame,
                   buffer_len, completed, used_len
  net-ctrl         class, class_name, cmd, cmd_name, data_len, ack, ack_name,
                   completed
  console-tx/rx    bytes, text (escaped, --bytes at most), truncated,
                   buffer_len, completed
  console-control  id, event, event_name, value, completed
  rng              buffers (lengths), requested, produced, completed
  memory      {source: live|archive, regions, bytes, note}
Finding kinds: head-out-of-range, next-out-of-range, loop, chain-too-long,
indirect-size, nested-indirect, indirect-with-next, indirect-not-negotiated,
outside-memory, not-captured, read-after-write, no-table, index-corruption."""


@click.command(
    cls=Command,
    epilog=examples(
        ("l4vctl queue-show unix:/tmp/blk.sock --queue 0", "Every request in flight on queue 0 (a driver may run):"),
        ("l4vctl queue-show unix:/tmp/blk.sock --queue 0 --index 7", "The chain in avail slot 7:"),
        ("l4vctl queue-show unix:/tmp/con.sock --queue 1 --all --bytes 200", "Every slot, 200 bytes of text each:"),
        ("l4vctl dump-config unix:/tmp/blk.sock --with-memory -o blk.l4vm", "Save page and memory, then look later:"),
        ("l4vctl queue-show dump:blk.l4vm --queue 0 --json", "The saved state as JSON:"),
    )
    + "\n\n"
    + JSON_KEYS,
)
@device_options
@abi_option(auto=True)
@click.option("-q", "--queue", "queue", type=click.IntRange(min=0), required=True, metavar="N", help="Queue index.")
@click.option("--index", "avail_index", type=click.IntRange(0, 0xFFFF), default=None, metavar="I",
              help="Show the chain offered at avail index I (slot I mod num).")  # fmt: skip
@click.option("--head", type=click.IntRange(0, 0xFFFF), default=None, metavar="H", help="Show the chain at head H.")
@click.option("--all", "show_all", is_flag=True, help="Show the chain of every slot of the available ring.")
@click.option("--bytes", "max_bytes", type=click.IntRange(0, 1 << 20), default=64, show_default=True, metavar="N",
              help="Payload bytes shown per chain (console text, frames).")  # fmt: skip
@timeout_option
@json_option
@click.pass_context
def queue_show(ctx, device, device_opt, abi, queue, avail_index, head, show_all, max_bytes, timeout, json_mode):
    """Show the descriptor chains of a queue: buffers, flags and what they carry.

    By default every chain in flight: offered in the available ring and not
    yet used (from used.idx to avail.idx), each marked in-device (the device
    has taken it: below its next_avail) or pending (not taken yet).  --index
    shows the chain at one avail index, --head one chain by its head, --all
    every slot of the available ring.

    Each chain is walked read-only with every bound checked: head and next
    indices, loops, chains longer than the queue, indirect tables (size a
    multiple of 16, no nesting) and buffers outside the driver's registered
    memory are reported as findings, not followed.  Each buffer shows its
    address, length and flags (NEXT, WRITE, INDIRECT); the payload is decoded
    for the device class: blk request type, sector, data length and status
    byte (once completed); the net header (10 or 12 bytes, as negotiated) and
    frame length; console bytes as escaped text (--bytes); rng lengths.

    DEVICE is a live device (emu:, unix: — read as a monitor: no driver slot
    is taken, a driver may be attached) or a memory archive saved with
    'dump-config --with-memory' (dump:FILE).  Backends that give no access to
    the driver's memory (a plain saved page, vhost-user:, l4re:) end with exit
    status 3.
    """
    from l4vctl.catalog import Role
    from l4vctl.errors import UsageError
    from l4vctl.ringread import gc_paused
    from l4vctl.session import Session

    picked = [name for name, on in (("--index", avail_index is not None), ("--head", head is not None),
                                    ("--all", show_all)) if on]  # fmt: skip
    if len(picked) > 1:
        raise UsageError(f"{' and '.join(picked)} exclude each other")
    url = resolve_device(ctx, device, device_opt)
    out = begin(ctx, "queue-show", json_mode)
    out.device = url
    with Session(url, abi=abi, timeout=timeout, role=Role.MONITOR, check=False) as s:
        out.abi = s.abi
        with gc_paused():  # thousands of chains and dicts, none in a cycle
            result = show(s, queue, avail_index=avail_index, head=head, show_all=show_all, max_bytes=max_bytes)
    out.emit(result, lambda: _text(result))


def show(s, queue: int, *, avail_index: int | None = None, head: int | None = None, show_all: bool = False,
         max_bytes: int = 64) -> dict:  # fmt: skip
    """The result of ``queue-show`` for an open session (see the command's help for the keys)."""
    from l4vctl import decode
    from l4vctl.errors import UnavailableError, UsageError
    from l4vctl.ringread import queue_state
    from l4vctl.snapshot import Snapshot

    snap = Snapshot.capture(s, memory="rings")
    if snap.registered is None and not snap.regions:
        raise UnavailableError(snap.memory_note or f"{s.url}: the driver's memory is not reachable")
    queues = snap.decoded.get("queues", [])
    if queue >= len(queues):
        raise UsageError(f"queue {queue} does not exist: the device has {len(queues)} queue(s)")
    q = queue_state(snap, queue)
    if q is None:
        entry = queues[queue]
        raise UnavailableError(f"queue {queue} is not ready (ready {entry['ready']}, num {entry['num']})")
    findings = list(q.findings)
    picks: list[tuple[int | None, int | None]]
    if avail_index is not None:
        picks = [(avail_index, q.head_at(avail_index))]
        mode, value = "index", avail_index
    elif head is not None:
        picks = [(None, head)]
        mode, value = "head", head
    elif show_all:
        picks = [(slot, q.head_at(slot)) for slot in range(q.num)] if q.avail_ring is not None else []
        mode, value = "all", None
    else:
        window, found = q.outstanding()
        findings += found
        picks = [(idx, h) for idx, _slot, h, _state in window]
        mode, value = "outstanding", None
    states = _states(q)
    chains = q.walk_many((h, idx) for idx, h in picks if h is not None)
    if s.live and chains:
        _fetch_payloads(s, snap, q, chains, max_bytes)
        chains = _rewalk(q, chains)
    completions = None
    side_queues = (snap.device_side or {}).get("queues") or []
    if queue < len(side_queues) and isinstance(side_queues[queue].get("completed"), int):
        completions = side_queues[queue]["completed"]
    used = q.used_lengths(completions)
    role = decode.queue_role(snap.device_class, queue, len(queues), snap.negotiated)
    shown = []
    for c in chains:
        state = states.get(c.avail_index) if c.avail_index is not None else None
        if state is None:
            state = "completed" if c.head in used else "idle"
        used_len = used.get(c.head) if state == "completed" else None
        item = c.to_json()
        item["state"] = state
        item["used_len"] = used_len
        item["payload"] = decode.payload(snap, c, queue, used_len=used_len, max_bytes=max_bytes)
        shown.append(item)
    return {
        "queue": q.to_json(),
        "role": role,
        "device_class": snap.device_class,
        "selection": {"mode": mode, "value": value},
        "chains": shown,
        "findings": [{"kind": f.kind, "message": f.message} for f in findings],
        "memory": {
            "source": "live" if snap.live else "archive",
            "regions": len(snap.regions),
            "bytes": sum(r.size for r in snap.regions),
            "note": snap.memory_note,
        },
    }


def _rewalk(q, chains: list) -> list:
    """The chains again where the walk stopped at memory not captured then (an indirect table)."""
    again = [i for i, c in enumerate(chains) if any(f.kind == "not-captured" for f in c.findings)]
    if again:
        for i, c in zip(again, q.walk_many((chains[i].head, chains[i].avail_index) for i in again), strict=True):
            chains[i] = c
    return chains


def _states(q) -> dict[int, str]:
    """Avail index -> state of every chain in the outstanding window."""
    window, _found = q.outstanding()
    return {idx: state for idx, _slot, _head, state in window}


def _fetch_payloads(s, snap, q, chains, max_bytes: int) -> None:
    """Read the memory the chains' payloads need: all registered memory when it is small, else
    indirect tables first and then the first bytes and the last byte of every buffer."""
    from l4vctl import catalog as cat

    registered = snap.registered or []
    if sum(n for _b, n, _w in registered) <= cat.MONITOR_READ_MAX_BYTES:
        snap.fetch(s, [(b, n) for b, n, _w in registered])
        return
    tables = [(a, n) for c in chains for _i, a, n in c.tables if n and n % 16 == 0]
    if tables:
        snap.fetch(s, tables)
        chains = _rewalk(q, chains)
    want = max(max_bytes, 64)
    ranges = []
    for c in chains:
        for b in c.buffers:
            if b.len:
                ranges.append((b.addr, min(b.len, want)))
                ranges.append((b.addr + b.len - 1, 1))
    snap.fetch(s, ranges)


def _text(r: dict):
    from l4vctl import decode
    from l4vctl.output import Doc, escape

    doc = Doc()
    q = r["queue"]
    av, us = q["avail"], q["used"]
    top = [
        ("queue", f"{q['index']} ({r['device_class'] or 'unknown class'} {r['role']}), num {q['num']}"),
        ("desc/avail/used", f"{q['desc_addr']:#x} / {q['avail_addr']:#x} / {q['used_addr']:#x}"),
        ("avail", _ring_text(av, "used_event", "NO_INTERRUPT")),
        ("used", _ring_text(us, "avail_event", "NO_NOTIFY")),
        ("next_avail", "unknown" if q["next_avail"] is None else str(q["next_avail"])),
    ]
    mode = r["selection"]["mode"]
    what = {"outstanding": "in flight", "index": "at the avail index", "head": "at the head", "all": "in the ring"}
    top.append(("chains", f"{len(r['chains'])} {what[mode]}"))
    doc.kv(top, indent=0)
    for c in r["chains"]:
        where = f"avail {c['avail_index']} slot {c['slot']}" if c["avail_index"] is not None else "by head"
        doc.heading(f"chain head {c['head']} ({where}): {c['state']}")
        rows = []
        for b in c["buffers"]:
            level = f"indirect {b['table']:#x}" if b["indirect_level"] else ""
            rows.append([str(b["index"]), f"{b['addr']:#x}", str(b["len"]), " ".join(b["flag_names"]) or "-", level])
        if rows:
            doc.table(["desc", "addr", "len", "flags", "table"], rows, align="rrrll")
        doc.line(escape(decode.summary(c["payload"])), indent=2)
        for n in c["payload"].get("notes", []):
            doc.line(f"note: {escape(n)}", indent=2)
        for f in c["findings"]:
            doc.line(f"finding {f['kind']}: {escape(f['message'])}", indent=2)
    for f in r["findings"] + r["queue"]["findings"]:
        doc.line(f"finding {f['kind']}: {escape(f['message'])}")
    if r["memory"]["note"]:
        doc.line(f"note: {r['memory']['note']}")
    return doc


def _ring_text(part: dict, event: str, flag: str) -> str:
    if part["idx"] is None:
        return "not captured"
    text = f"idx {part['idx']} flags {part['flags']:#x}" + (f" {flag}" if part["flags"] & 1 else "")
    if part[event] is not None:
        text += f", {event} {part[event]}"
    return text
