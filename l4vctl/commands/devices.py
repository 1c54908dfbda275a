"""``l4vctl devices``: the devices an L4Re agent holds."""

from __future__ import annotations

import click

from l4vctl.commands._common import Command, begin, examples, json_option, timeout_option


@click.command(
    cls=Command,
    epilog=examples(
        ("l4vctl devices l4re:unix:/tmp/com2.sock", "What the agent on QEMU's COM2 holds:"),
        ("l4vctl probe 'l4re:unix:/tmp/com2.sock?dev=blk0'", "Then address one of them by name:"),
    ),
)
@click.argument("link", metavar="LINK")
@timeout_option
@json_option
@click.pass_context
def devices(ctx, link, timeout, json_mode):
    """List the devices an L4Re agent (l4vagent) holds.

    LINK is an 'l4re:' URL without a device (l4re:unix:PATH, l4re:tcp:HOST:PORT,
    l4re:serial:DEVICE).  For each device capability the agent was started
    with: its name (use it as ?dev=NAME), the device id and class, vendor,
    status and generation read from its config page.  Nothing is changed on
    the devices.
    """
    from l4vctl.backends import open_backend
    from l4vctl.errors import UsageError

    out = begin(ctx, "devices", json_mode)
    if not link.startswith("l4re:"):
        raise UsageError(f"{link}: 'devices' lists what an L4Re agent holds; give an l4re: link (other URLs name "
                         "one device: use probe)")  # fmt: skip
    backend = open_backend(link)
    try:
        rows = backend.inventory(timeout)  # type: ignore[attr-defined]
    finally:
        backend.close()
    out.emit({"link": link, "devices": rows}, lambda: _text(rows))


def _text(rows):
    from l4vctl.output import Doc

    doc = Doc()
    doc.table(
        ("name", "device", "vendor", "status", "generation"),
        [
            (
                r["name"],
                f"{r['device_id']} {r['device_class']}" if r.get("device_id") is not None else r.get("error", "?"),
                f"{r['vendor']:#x}" if r.get("vendor") is not None else "",
                f"{r['status']:#04x}" if r.get("status") is not None else "",
                str(r["generation"]) if r.get("generation") is not None else "",
            )
            for r in rows
        ],
        indent=0,
    )
    return doc
