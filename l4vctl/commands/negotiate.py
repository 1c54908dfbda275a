"""``l4vctl negotiate``: the full driver handshake, feature by feature."""

from __future__ import annotations

import click

from l4vctl.catalog import MODES, Mode
from l4vctl.commands._common import (
    Command,
    abi_option,
    attach_of,
    attach_option,
    begin,
    device_options,
    examples,
    json_option,
    resolve_device,
    timeout_option,
)


def _names(values: tuple[str, ...]) -> list[str]:
    out = []
    for v in values:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


@click.command(
    cls=Command,
    epilog=examples(
        ("l4vctl negotiate emu:blk", "Handshake with a fresh emulated block device:"),
        (
            "l4vctl negotiate unix:/tmp/blk.sock --want flush,indirect_desc --require flush",
            "Ask for two features, insist on one:",
        ),
        ("l4vctl negotiate emu:blk?cmd_mode=1 --mode cmd", "Drive status and queues through the cmd word:"),
        ("l4vctl negotiate unix:/tmp/blk.sock --refuse ro --json", "Refuse a feature, for a script:"),
    ),
)
@device_options
@abi_option(auto=True)
@attach_option
@click.option("--want", multiple=True, metavar="F,...",
              help="Features to accept if offered (names like flush or VIRTIO_BLK_F_FLUSH, or bit numbers); "
                   "'all' = everything offered. Default: the transport features l4vctl implements "
                   "(indirect_desc, event_idx, version_1) and the device features its driver for the class "
                   "implements; others are accepted only through --want or --require "
                   "and shown as [forced].")  # fmt: skip
@click.option("--require", multiple=True, metavar="F,...", help="Fail with exit status 5 unless these are negotiated.")
@click.option("--refuse", multiple=True, metavar="F,...", help="Never accept these.")
@click.option("--mode", type=click.Choice(MODES), default=Mode.AUTO.value, show_default=True,
              help="Status and queue setup by IPC or through the cmd word; auto = cmd when the device offers "
                   "L4VIRTIO_FEATURE_CMD_CONFIG (as uvmm does).")  # fmt: skip
@click.option("--queue-size", type=click.IntRange(1, 32768), default=None, metavar="N",
              help="Ring size per queue (rounded down to a power of two; default num_max).")  # fmt: skip
@click.option("--no-queues", is_flag=True, help="Do not configure queues (DRIVER_OK may then be refused).")
@click.option("--keep", is_flag=True, help="Leave the device running when done (default: reset it).")
@timeout_option
@json_option
@click.pass_context
def negotiate(
    ctx, device, device_opt, abi, want, require, refuse, mode, queue_size, no_queues, keep, timeout, json_mode
):
    """Run the driver handshake up to DRIVER_OK and show what was agreed.

    Attaches as the driver, resets the device, sets ACKNOWLEDGE and DRIVER,
    accepts the wanted features the device offers (VERSION_1 always; by
    default only those l4vctl implements, the rest marked [not implemented]
    unless forced with --want), sets
    FEATURES_OK and reads it back, configures every queue in memory
    registered with REGISTER_DS, and sets DRIVER_OK.  Prints each feature as
    'name: on/off' with notes such as [not offered], [refused] or [forced], and every
    status write with the status the device accepted.

    Exit status 5 when FEATURES_OK is refused, a required feature is not
    offered or a queue is rejected; 6 when the device ends in
    DEVICE_NEEDS_RESET or FAILED; 7 when it stops answering.
    """
    from l4vctl import catalog as cat
    from l4vctl.session import Session

    url = resolve_device(ctx, device, device_opt)
    out = begin(ctx, "negotiate", json_mode)
    out.device = url
    wants = _names(want)
    want_arg = None if not wants else ("all" if wants == ["all"] else wants)
    with Session(url, abi=abi, mode=mode, timeout=timeout, attach=attach_of(ctx)) as s:
        out.abi = s.abi
        summary = s.handshake(want_arg, _names(require), _names(refuse), queues=not no_queues, queue_size=queue_size)
        choice = s.abi_choice
        assert choice is not None  # the session is open
        result = {
            "url": url,
            "device": s.device_info(),
            "abi": s.abi,
            "abi_detection": choice.to_json(),
            "mode": s.mode,
            "attach": s.attached_via,
            "features": summary["features"],
            "negotiated": summary["negotiated"],
            "forced": summary["forced"],
            "transitions": [t.to_json() for t in s.transitions],
            "status": {"value": s.status, "flags": cat.flag_names(s.status, cat.STATUS_BITS)[0]},
            "generation": s.get("generation"),
            "queues": [q.to_json() for q in s.queues],
            "kept_running": keep,
        }
        if keep:
            s.close(reset=False)
    out.emit(result, lambda: _text(result))


def feature_line(f: dict) -> str:
    """ethtool style: 'name: on' or 'name: off [not offered]'."""
    name = f["name"] or f"bit {f['bit']}"
    if f["negotiated"]:
        return f"{name}: on" + (" [forced]" if f.get("forced") else "")
    if f["refused"] and f["offered"]:
        return f"{name}: off [refused]"
    if not f["offered"]:
        return f"{name}: off [not offered]" + (" [requested on]" if f["wanted"] else "")
    if f.get("implemented") is False and not f["wanted"]:
        return f"{name}: off [not implemented]"
    return f"{name}: off"


def _text(r: dict):
    from l4vctl import catalog as cat
    from l4vctl.output import Doc, flags_text

    doc = Doc()
    dev = r["device"]
    doc.kv(
        [
            ("device", dev["name"] if dev["id"] is None else f"{dev['id']} {dev['name']}"),
            ("url", r["url"]),
            ("abi", f"{r['abi']} ({r['abi_detection']['method']}: {r['abi_detection']['reason']})"),
            ("mode", r["mode"] + (" (status and queues through the cmd word)" if r["mode"] == "cmd" else " (IPC)")),
            ("attach", {"config": "DEVICE_CONFIG + GET_DEVICE_IRQ + ICU bind", "iface": "REGISTER_IFACE"}[r["attach"]]),
        ],
        indent=0,
    )
    doc.heading("Features")
    for f in r["features"]:
        doc.line(feature_line(f), indent=2)
    doc.heading("Status writes")
    rows = []
    for t in r["transitions"]:
        note = "reset" if t["wrote"] == 0 else ""
        if t["wrote"] and t["status"] != t["wrote"]:
            note = "changed by the device"
        rows.append((t["via"], f"{t['wrote']:#04x}", f"{t['status']:#04x}", "+".join(t["flags"]) or "-", note))
    doc.table(("via", "wrote", "status", "flags", "note"), rows)
    if r["queues"]:
        doc.heading("Queues")
        doc.table(
            ("queue", "num", "desc", "avail", "used", "accepted"),
            [
                (
                    q["index"],
                    q["num"],
                    f"{q['desc_addr']:#x}",
                    f"{q['avail_addr']:#x}",
                    f"{q['used_addr']:#x}",
                    {True: "yes", False: "no", None: "(cmd mode: not reported)"}[q["accepted"]],
                )
                for q in r["queues"]
            ],
            align="rr",
        )
    st = r["status"]["value"]
    doc.heading("Result")
    doc.line(f"status {st:#04x} {flags_text(st, cat.STATUS_BITS)}", indent=2)
    doc.line("device left running (--keep)" if r["kept_running"] else "device reset on exit", indent=2)
    return doc
