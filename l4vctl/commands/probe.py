"""``l4vctl probe``: who is this device?"""

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
from l4vctl.errors import NegotiationError


@click.command(
    cls=Command,
    epilog=examples(
        ("l4vctl probe emu:blk", "An emulator started just for this (the zero-setup default):"),
        ("l4vctl probe unix:/tmp/blk.sock", "A running emulator:"),
        ("l4vctl probe unix:/tmp/blk.sock --expect-device blk", "Fail (exit 5) unless it is a block device:"),
        (
            "l4vctl probe 'vhost-user:/tmp/qsd.sock?type=blk'",
            "A vhost-user back-end (say its type: vhost-user does not report it):",
        ),
        ("l4vctl probe page.bin --json | jq .result.features.names", "A saved page, for a script:"),
    ),
)
@device_options
@abi_option(auto=True)
@click.option("--expect-device", metavar="TYPE",
              help="Fail with exit status 5 unless the device is of this type "
                   "(blk, net, console, rng, input, vsock, or an id).")  # fmt: skip
@timeout_option
@json_option
@click.pass_context
def probe(ctx, device, device_opt, abi, expect_device, timeout, json_mode):
    """Identify a device: id, vendor, ABI, queues, offered features, status.

    Reads the config page and changes nothing on the device: no reset, no
    status write, no driver slot taken (against the emulator, probe attaches
    as a monitor).  Note that L4Re devices publish their features on the
    first reset, so a device nobody has reset yet may show none.
    """
    from l4vctl import catalog as cat
    from l4vctl.session import Session

    url = resolve_device(ctx, device, device_opt)
    out = begin(ctx, "probe", json_mode)
    out.device = url
    expected = _expected_id(expect_device) if expect_device else None
    with Session(url, abi=abi, timeout=timeout, role=cat.Role.MONITOR) as s:
        out.abi = s.abi
        decoded = s.decode().result
    dev = decoded["device"]
    result = {
        "url": url,
        "live": decoded.get("live", True),
        "magic": decoded["header"]["magic"],
        "version": decoded["header"]["version"],
        "device": dev,
        "vendor": decoded["vendor"],
        "abi": decoded["abi"],
        "abi_detection": decoded["abi_detection"],
        "status": decoded["status"],
        "generation": decoded["header"]["generation"],
        "num_queues": decoded["header"]["num_queues"],
        "queues_offset": decoded["header"]["queues_offset"],
        "queues": [
            {k: q[k] for k in ("index", "num_max", "num", "ready", "device_notify_index")} for q in decoded["queues"]
        ],
        "features": decoded["features"]["offered"],
        "cmd_config_offered": cat.CMD_CONFIG_BIT[decoded["abi"]] in decoded["features"]["offered"]["bits"],
        "notes": decoded["notes"] + [f"problem: {p}" for p in decoded["problems"]],
    }
    if not result["features"]["bits"] and result["status"]["value"] == 0:
        result["notes"].append("no features published yet: L4Re devices publish them on the first reset")
    if expected is not None and dev["id"] is None:
        suggestion = url + ("&" if "?" in url else "?") + f"type={cat.device_class(expected) or expect_device}"
        raise NegotiationError(
            f"expected a {expect_device} device ({expected}), found a device of type {dev['name']}",
            hint=f"if it is one, say so: {suggestion}",
        )
    if expected is not None and dev["id"] != expected:
        raise NegotiationError(f"expected a {expect_device} device ({expected}), found {dev['name']} ({dev['id']})")
    out.emit(result, lambda: _text(result))


def _expected_id(text: str) -> int:
    from l4vctl import catalog as cat
    from l4vctl.errors import UsageError

    key = text.strip().lower()
    if key in cat.DEVICE_CLASSES:
        return cat.DEVICE_CLASSES[key]
    for d in cat.DEVICE_IDS.values():
        if d.name.lower() == key:
            return d.id
    try:
        return int(key, 0)
    except ValueError:
        raise UsageError(
            f"--expect-device {text!r}: not a device type",
            hint="blk, net, console, rng, input, vsock, a name like BLOCK, or an id",
        ) from None


def _text(r: dict):
    from l4vctl import catalog as cat
    from l4vctl.output import Doc, flags_text

    doc = Doc()
    dev = r["device"]
    det = r["abi_detection"]
    vendor = r["vendor"]
    queues = ", ".join(f"{q['index']}: num_max {q['num_max']}" + (" ready" if q["ready"] else "") for q in r["queues"])
    st = r["status"]["value"]
    doc.kv(
        [
            (
                "device",
                (dev["name"] if dev["id"] is None else f"{dev['id']} {dev['name']}")
                + (f" ({dev['class']})" if dev["class"] else ""),
            ),
            ("vendor", f"{vendor['id']:#x}" + (f" {vendor['name']}" if vendor["name"] else "")),
            ("url", r["url"]),
            ("abi", f"{r['abi']} ({det['method']}: {det['reason']})"),
            ("status", f"{st:#04x} {flags_text(st, cat.STATUS_BITS)}"),
            ("generation", str(r["generation"])),
            ("queues", f"{r['num_queues']} at {r['queues_offset']:#x}" + (f" ({queues})" if queues else "")),
            ("cmd mode", "offered (L4VIRTIO_FEATURE_CMD_CONFIG)" if r["cmd_config_offered"] else "not offered"),
        ],
        indent=0,
    )
    doc.heading("Offered features")
    f = r["features"]
    table = cat.feature_table(r["abi"], dev["id"])
    if f["bits"]:
        doc.table(("bit", "name"), [(b, table[b].name if b in table else "(unknown)") for b in f["bits"]], align="r")
    else:
        doc.line("none", indent=2)
    if r["notes"]:
        doc.heading("Notes")
        for n in r["notes"]:
            doc.line(n, indent=2)
    return doc
