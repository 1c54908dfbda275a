"""``l4vctl queue-stats``: per-queue state, like QEMU's info virtio-queue-status."""

from __future__ import annotations

import functools
import sys
import time

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


@click.command(
    cls=Command,
    epilog=examples(
        ("l4vctl queue-stats unix:/tmp/blk.sock", "The queues of a running emulator (a driver may be attached):"),
        ("l4vctl queue-stats unix:/tmp/blk.sock --watch", "Redraw every second until Ctrl-C:"),
        ("l4vctl queue-stats unix:/tmp/blk.sock --watch --count 5 --json", "Five samples as JSON lines:"),
    ),
)
@device_options
@abi_option(auto=True)
@click.option("--watch", is_flag=True, help="Sample again and again (redraw on a terminal) until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True, metavar="SECONDS",
              help="Time between samples with --watch.")  # fmt: skip
@click.option("--count", type=click.IntRange(min=1), default=None, metavar="N", help="Stop after N samples.")
@timeout_option
@json_option
@click.pass_context
def queue_stats(ctx, device, device_opt, abi, watch, interval, count, timeout, json_mode):
    """Show every queue: size, ready, ring addresses, indices, requests in flight.

    From the config page: num/num_max, ready, desc/avail/used addresses and
    notify indices.  From the device side (the emulator's monitor interface,
    which works while a driver is attached): whether the device enabled the
    queue, avail.idx and used.idx with their flags, the device's next
    available index (QEMU's last_avail_idx), buffers pending (offered, not
    yet taken), in flight (taken, not yet used) and counters.  A saved page
    shows the page's part only.

    With --json and --watch, each sample is one JSON envelope per line.
    """
    from l4vctl.catalog import Role
    from l4vctl.session import Session

    url = resolve_device(ctx, device, device_opt)
    out = begin(ctx, "queue-stats", json_mode)
    out.device = url
    samples = count if count is not None else (None if watch else 1)
    tty = sys.stdout.isatty() and not json_mode
    n = 0
    with Session(url, abi=abi, timeout=timeout, role=Role.MONITOR, check=False) as s:
        out.abi = s.abi
        try:
            while True:
                result = sample(s, url)
                n += 1
                if json_mode and (watch or samples != 1):
                    out.emit(result, str, compact=True)  # JSON lines: one envelope per sample
                else:
                    if tty and watch:
                        sys.stdout.write("\x1b[H\x1b[2J")
                    elif n > 1:
                        sys.stdout.write("\n")
                    out.emit(result, functools.partial(_text, result, n if watch else None))
                if samples is not None and n >= samples:
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            if not watch:
                raise  # only a watch is ended by Ctrl-C on purpose


def _u16(value: int) -> int:
    return value & 0xFFFF


def sample(s, url: str) -> dict:
    """One snapshot of every queue (page entries plus device-side state)."""
    decoded = s.decode().result
    stats = s.stats() if s.live else None
    queues = []
    for q in decoded["queues"]:
        entry = {k: q[k] for k in ("index", "num_max", "num", "ready", "driver_notify_index", "desc_addr",
                                   "avail_addr", "used_addr", "device_notify_index")}  # fmt: skip
        dev = None
        if stats and q["index"] < len(stats["queues"]):
            d = dict(stats["queues"][q["index"]])
            d["enabled"] = bool(d["enabled"])
            d["pending"] = _u16(d["avail_idx"] - d["next_avail"]) if d["enabled"] else 0
            d["in_flight"] = _u16(d["next_avail"] - d["used_idx"]) if d["enabled"] else 0
            dev = d
        entry["device"] = dev
        queues.append(entry)
    result = {
        "url": url,
        "time": time.time(),
        "abi": decoded["abi"],
        "status": decoded["status"],
        "generation": decoded["header"]["generation"],
        "num_queues": decoded["header"]["num_queues"],
        "queues": queues,
        "device_side": None,
        "notes": list(decoded["problems"]),
    }
    if stats:
        result["device_side"] = {k: v for k, v in stats.items() if k != "queues"}
        result["device_side"]["driver_attached"] = bool(stats["driver_attached"])
    elif not s.live:
        result["notes"].append("a saved page shows no ring state")
    else:
        result["notes"].append("this device has no monitor interface: ring state unavailable")
    return result


def _text(r: dict, sample_no: int | None):
    from l4vctl import catalog as cat
    from l4vctl.output import Doc, flags_text

    doc = Doc()
    st = r["status"]["value"]
    top = [("url", r["url"]), ("status", f"{st:#04x} {flags_text(st, cat.STATUS_BITS)}"),
           ("generation", str(r["generation"]))]  # fmt: skip
    side = r["device_side"]
    if side:
        top.append(("driver", "attached" if side["driver_attached"] else "none"))
        top.append(("kicks / irqs", f"{side['kicks']} / {side['irqs_sent']}"))
        top.append(("regions", str(side["regions"])))
    if sample_no is not None:
        top.append(("sample", f"{sample_no} at {time.strftime('%H:%M:%S', time.localtime(r['time']))}"))
    doc.kv(top, indent=0)
    for q in r["queues"]:
        doc.heading(f"queue {q['index']}")
        rows = [
            ("num/num_max", f"{q['num']}/{q['num_max']}"),
            ("ready", str(q["ready"])),
            ("desc/avail/used", f"{q['desc_addr']:#x} / {q['avail_addr']:#x} / {q['used_addr']:#x}"),
            ("notify driver/device", f"{q['driver_notify_index']} / {q['device_notify_index']}"),
        ]
        d = q["device"]
        if d is not None:
            rows.append(("device", "enabled" if d["enabled"] else "disabled"))
            if d["enabled"]:
                rows += [
                    ("avail.idx", f"{d['avail_idx']} flags {d['avail_flags']:#x}"
                                  + (" NO_INTERRUPT" if d["avail_flags"] & 1 else "")),
                    ("last_avail_idx", str(d["next_avail"])),
                    ("used.idx", f"{d['used_idx']} flags {d['used_flags']:#x}"
                                 + (" NO_NOTIFY" if d["used_flags"] & 1 else "")),
                    ("pending / in flight", f"{d['pending']} / {d['in_flight']}"),
                    ("completed / notified", f"{d['completed']} / {d['notified']}"),
                ]  # fmt: skip
        doc.kv(rows)
    if not r["queues"]:
        doc.line("no queues")
    for n in r["notes"]:
        doc.line(f"note: {n}")
    return doc
