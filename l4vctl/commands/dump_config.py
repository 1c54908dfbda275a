"""``l4vctl dump-config``: decode a config page."""

from __future__ import annotations

import sys

import click

from l4vctl.commands._common import (
    Command,
    OutputFile,
    abi_option,
    begin,
    examples,
    json_option,
    queue_stride_option,
    timeout_option,
    write_output,
)
from l4vctl.errors import FormatError, UsageError


@click.command(
    cls=Command,
    epilog=examples(
        ("l4vctl dump-config unix:/tmp/blk.sock", "The live page of a running emulator:"),
        ("l4vctl dump-config unix:/tmp/blk.sock --hex -o page.hex", "Save it for later ('dump:page.hex'):"),
        ("l4vctl dump-config page.bin", "Decode a raw page saved from a device:"),
        ("l4vctl dump-config --abi classic page.hex", "Decode a hex dump as a classic-era page:"),
        ("l4vctl dump-config page.bin --hex -o page.hex", "Save a page as a hex dump that reads back:"),
        ("l4vctl dump-config ds.bin --offset 0x1000", "Decode the page at 0x1000 of a dataspace dump:"),
        ("l4vctl dump-config page.bin --json | jq .result.status", "Status for a script:"),
        ("l4vctl dump-config unix:/tmp/blk.sock --with-memory -o blk.l4vm", "Page plus the driver's memory:"),
        ("l4vctl queue-show dump:blk.l4vm --queue 0", "...whose rings queue-show reads later:"),
    ),
)
@click.argument("source", metavar="SOURCE")
@abi_option(auto=True)
@timeout_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "raw", "hex"]),
    default="auto",
    show_default=True,
    help="How SOURCE is stored: raw bytes or hex dump text; auto tells them apart.",
)
@click.option(
    "--offset",
    default="0",
    show_default=True,
    metavar="BYTES",
    help="Where the page starts inside SOURCE (decimal or 0x hex).",
)
@queue_stride_option
@click.option("--force", is_flag=True, help="Decode a page that fails validation; problems become warnings.")
@click.option("--hex", "as_hex", is_flag=True, help="Print the page as a hex dump (hexdump -C form) instead.")
@click.option("--raw", "as_raw", is_flag=True, help="Write the page as raw bytes instead (needs -o or a pipe).")
@click.option("--with-memory", "with_memory", is_flag=True,
              help="Write a memory archive instead: the page plus all memory the driver registered "
                   "(live emu:/unix: devices; needs -o or a pipe; read back as dump:FILE).")  # fmt: skip
@click.option(
    "-o",
    "--output",
    type=OutputFile(),
    help="Write the --hex, --raw or --with-memory output to this file.",
)
@json_option
@click.pass_context
def dump_config(ctx, source, abi, timeout, fmt, offset, queue_stride, force, as_hex, as_raw, with_memory, output,
                json_mode):  # fmt: skip
    """Decode an L4-VIRTIO config page, live or saved.

    SOURCE is a device URL (emu:TYPE, unix:PATH, vhost-user:PATH, l4re:LINK: the page
    is read live, without changing the device) or a saved config page: a raw binary file,
    or hex dump text as written by 'dump-config --hex', 'hexdump -C' or
    'xxd'.  'dump:PATH' is the same as PATH; '-' reads standard input.

    Shows the header (magic, version, device, vendor, status as FLAG+ FLAG-,
    generation, the cmd word decoded), features offered and accepted by name
    for the device class (unknown bits are kept as numbers), the device-specific
    config and every queue-config entry.

    The page is validated first: magic "virt", version 2, a queue array that
    lies inside the page, queue sizes within the split-ring limits.  A page
    that fails is rejected with exit status 4 unless --force is given.  A
    device config shorter than l4vctl's struct (the queue array starts
    earlier) is not a fault: the fields before the queue array are shown and
    the rest are named in a note ("truncated_fields" in JSON).

    With --abi auto the header era is guessed: VERSION_1 (bit 32, always
    offered by L4Re devices) sits at 0xAC bit 0 in classic pages and at 0xC4
    bit 0 in current ones; if both are set, feature word 0 (0xA8 classic,
    0xC0 current) decides.  A hex dump whose header names an ABI uses that.
    The output always says which ABI was used and why.

    --with-memory saves a memory archive (docs/memory-archive.md): the page,
    every region of memory the driver registered (read through the monitor
    interface, without disturbing the driver), the device's queue counters
    and the time.  'dump:FILE' reads it back: commands that read a page get
    its page, and queue-show reads the saved rings and buffers.  Backends
    whose driver memory is out of reach (a plain saved page, vhost-user:,
    l4re:) end with exit status 3.
    """
    out = begin(ctx, "dump-config", json_mode)
    out.device = source
    if sum(map(bool, (as_hex, as_raw, with_memory))) > 1:
        raise UsageError("--hex, --raw and --with-memory exclude each other")
    if output and not (as_hex or as_raw or with_memory):
        raise UsageError("-o/--output needs --hex or --raw (or --with-memory)")
    if with_memory and not output and json_mode:
        raise UsageError("--with-memory --json needs -o FILE (the archive and the JSON cannot share stdout)")
    if with_memory and not output and sys.stdout.isatty():
        raise UsageError("refusing to write a memory archive to a terminal; use -o FILE or a pipe")
    if as_raw and json_mode:
        raise UsageError("--raw writes bytes and cannot be combined with --json")
    start = _parse_offset(offset)

    from l4vctl.session import Session

    session = Session(source, abi=abi, timeout=timeout, role="monitor", stride=int(queue_stride), check=False,
                      fmt=fmt, offset=start)  # fmt: skip
    if session.live and (start or fmt != "auto"):
        session.close()
        raise UsageError("--offset and --format apply to saved pages, not to live devices")
    with session as s:
        out.abi = s.abi
        if with_memory:
            _save_archive(out, s, output)
            return
        data = s.page_bytes()
        stored_as = s.source_format
        decoded = s.decode()
    result = decoded.result
    result["source"] = {"name": source, "format": stored_as, "offset": start}

    if decoded.problems and not (force or as_hex or as_raw):
        first = decoded.problems[0]
        more = len(decoded.problems) - 1
        message = first + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
        raise FormatError(message, hint="--force decodes it anyway")
    if force:
        from l4vctl.output import warn

        for problem in decoded.problems:
            warn(problem)

    if as_hex or as_raw:
        _save(out, data, result, as_hex, output)
        return
    out.emit(result, lambda: render_page(result))


def _save_archive(out, s, output: str | None) -> None:
    """Capture the page and all registered memory and write them as a memory archive."""
    import io

    from l4vctl.errors import UnavailableError
    from l4vctl.output import info
    from l4vctl.snapshot import Snapshot

    snap = Snapshot.capture(s, memory="all")
    if snap.registered is None and not snap.regions:
        raise UnavailableError(snap.memory_note or f"{s.url}: the driver's memory is not reachable")
    buf = io.BytesIO()
    snap.save(buf)
    payload = buf.getbuffer()
    memory = sum(r.size for r in snap.regions)
    if output:
        write_output(output, payload)
    else:
        sys.stdout.buffer.write(payload)
        sys.stdout.flush()
    summary = {"written": output or "-", "format": "archive", "bytes": len(payload), "regions": len(snap.regions),
               "memory_bytes": memory, "note": snap.memory_note}  # fmt: skip
    if out.json_mode and output:
        out.emit(summary, str)
    else:
        where = output or "standard output"
        info(f"wrote a memory archive to {where}: page and {len(snap.regions)} region(s), {memory} bytes of memory"
             + (f" ({snap.memory_note})" if snap.memory_note else ""))  # fmt: skip


def _parse_offset(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise UsageError(f"--offset {text!r} is not a number (decimal or 0x hex)") from None
    if value < 0:
        raise UsageError("--offset must not be negative")
    return value


def _save(out, data: bytes, result: dict, as_hex: bool, output: str | None) -> None:
    from l4vctl import hexdump
    from l4vctl.output import info

    if as_hex:
        comments = [
            f"l4vctl config page from {result['source']['name']}",
            f"abi: {result['abi']}",
            f"device: {result['device']['name']} ({result['device']['id']})",
        ]
        payload = hexdump.format_hexdump(data, comments).encode()
    else:
        payload = bytes(data)
    if output:
        write_output(output, payload)
        if out.json_mode:
            out.emit({"written": output, "format": "hex" if as_hex else "raw", "bytes": len(payload)}, str)
        else:
            info(f"wrote {len(data)}-byte page to {output} ({'hex dump' if as_hex else 'raw'})")
        return
    if as_hex:
        out.emit({"format": "hex", "text": payload.decode()}, lambda: payload.decode())
        return
    if sys.stdout.isatty():
        raise UsageError("refusing to write raw bytes to a terminal; use -o FILE or a pipe")
    sys.stdout.buffer.write(payload)
    sys.stdout.flush()


# -- text rendering -----------------------------------------------------------------


def _window_rows(hdr: dict) -> list[tuple[str, str]]:
    names = (
        "dev_features", "dev_features_sel", "driver_features", "driver_features_sel",
        "queue_sel", "queue_num_max", "queue_num", "queue_ready", "queue_notify", "irq_ack",
        "queue_desc", "queue_avail", "queue_used",
    )  # fmt: skip
    return [(n, f"{hdr[n]:#x}") for n in names if hdr.get(n)]


def _config_rows(fields: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in fields.items():
        if isinstance(value, dict):
            rows.extend(_config_rows(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            rows.append((prefix + key, " ".join(str(v) for v in value) or "-"))
        else:
            rows.append((prefix + key, str(value)))
    return rows


def _device_config_rows(cls: str | None, fields: dict) -> list[tuple[str, str]]:
    """Rows of a decoded device config, with units where they help."""
    from l4vctl import catalog as cat
    from l4vctl.output import flags_text

    shown = dict(fields)
    derived = {k: shown.pop(k) for k in ("capacity_bytes", "status_flags", "decoded") if k in shown}
    rows = _config_rows(shown)
    if cls == "blk":
        rows = [(k, f"{v} sectors ({_size(derived['capacity_bytes'])})" if k == "capacity" else v) for k, v in rows]
    elif cls == "net":
        rows = [(k, f"{int(v):#x} {flags_text(int(v), cat.NET_STATUS_BITS)}" if k == "status" else v) for k, v in rows]
    if "decoded" in derived:
        rows += _config_rows(derived["decoded"], "u as ")
    return rows


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_page(r: dict):
    """The text document of a decoded page (offline or live)."""
    from l4vctl import catalog as cat
    from l4vctl.output import Doc, flags_text

    doc = Doc()
    hdr = r["header"]
    det = r["abi_detection"]
    src = r.get("source")
    top = []
    if src:
        where = f" at offset {src['offset']:#x}" if src.get("offset") else ""
        top.append(("source", f"{src['name']} ({src['format']}, {r['size']} bytes{where})"))
    top.append(("abi", f"{r['abi']} ({det['method']}: {det['reason']})"))
    doc.kv(top, indent=0)

    doc.heading("Header")
    magic = hdr["magic"].to_bytes(4, "little")
    vendor = r["vendor"]
    cmd = r["cmd"]
    if cmd["command"] == "NONE":
        cmd_text = f"{cmd['value']:#010x} idle"
    elif cmd["command"]:
        cmd_text = f"{cmd['value']:#010x} {cmd['command']} argument {cmd['argument']:#x}"
        if "status" in cmd:
            cmd_text += f" ({flags_text(cmd['status']['value'], cat.STATUS_BITS)})"
    else:
        cmd_text = f"{cmd['value']:#010x} unknown command byte {cmd['command_byte']:#04x}"
    rows = [
        ("magic", f"{hdr['magic']:#010x} {magic!r}"),
        ("version", str(hdr["version"])),
        ("device", f"{hdr['device']} {r['device']['name']}"),
        ("vendor", f"{vendor['id']:#x}" + (f" {vendor['name']}" if vendor["name"] else "")),
        ("status", f"{hdr['status']:#04x} {flags_text(hdr['status'], cat.STATUS_BITS)}"),
        ("generation", str(hdr["generation"])),
        ("cmd", cmd_text),
        ("irq_status", f"{hdr['irq_status']:#x} {flags_text(hdr['irq_status'], cat.IRQ_STATUS_BITS)}"),
        ("num_queues", str(hdr["num_queues"])),
        ("queues_offset", f"{hdr['queues_offset']:#x}"),
        ("cfg_driver_notify_index", str(hdr["cfg_driver_notify_index"])),
        ("cfg_device_notify_index", str(hdr["cfg_device_notify_index"])),
    ]
    if r["abi"] == "current":
        rows.append(("shm_sel/len/base", f"{hdr['shm_sel']} / {hdr['shm_len']:#x} / {hdr['shm_base']:#x}"))
    doc.kv(rows)
    window = _window_rows(hdr)
    if window:
        doc.heading("virtio-mmio window (not used by L4Re devices)")
        doc.kv(window)

    feats = r["features"]
    doc.heading("Features")
    if feats["table"]:
        doc.table(
            ("bit", "name", "offered", "accepted"),
            [
                (f["bit"], f["name"] or "(unknown)", "+" if f["offered"] else "-", "+" if f["accepted"] else "-")
                for f in feats["table"]
            ],
            align="rl",
        )
    else:
        doc.line("none offered, none accepted", indent=2)
    for which in ("offered", "accepted"):
        fs = feats[which]
        if fs["unknown_bits"]:
            doc.line(
                f"unknown {which} bits: {', '.join(map(str, fs['unknown_bits']))} (mask {fs['unknown_mask']:#x})",
                indent=2,
            )

    dc = r["device_config"]
    if dc["struct"]:
        cut = dc.get("truncated_fields") or []
        size = f"{dc['present']} of {dc['size']} bytes" if cut else f"{dc['size']} bytes"
        doc.heading(f"Device config ({dc['struct']} at {dc['offset']:#x}, {size})")
        fields = dc.get("fields")
        if cut and not fields:
            doc.line("no field lies before the queue array or the end of the page", indent=2)
        elif not fields:
            doc.line("(this device class has no config fields)", indent=2)
        else:
            doc.kv(_device_config_rows(r["device"]["class"], fields))
    else:
        doc.heading(f"Device config (no decoder for device {hdr['device']}, {dc['size']} bytes raw)")
        raw = bytes.fromhex(dc["raw"])
        for i in range(0, len(raw), 16):
            doc.line(f"{dc['offset'] + i:#05x}  {raw[i : i + 16].hex(' ')}", indent=2)

    doc.heading(f"Queues ({hdr['num_queues']} at {hdr['queues_offset']:#x}, stride {r['queue_stride']})")
    if r["queues"]:
        doc.table(
            ("queue", "num/max", "ready", "desc", "avail", "used", "notify drv/dev"),
            [
                (
                    q["index"],
                    f"{q['num']}/{q['num_max']}",
                    q["ready"],
                    f"{q['desc_addr']:#x}",
                    f"{q['avail_addr']:#x}",
                    f"{q['used_addr']:#x}",
                    f"{q['driver_notify_index']}/{q['device_notify_index']}",
                )
                for q in r["queues"]
            ],
            align="rrr",
        )
        for q in r["queues"]:
            for note in q["notes"]:
                doc.line(f"queue {q['index']}: {note}", indent=2)
    else:
        doc.line("none", indent=2)

    if r["notes"] or r["problems"]:
        doc.heading("Notes")
        for p in r["problems"]:
            doc.line(f"problem: {p}", indent=2)
        for n in r["notes"]:
            doc.line(n, indent=2)
    return doc
