"""``l4vctl diagnose``: the stall doctor — why is this queue stuck?"""

from __future__ import annotations

import re
import time

import click

from l4vctl.commands._common import (
    Command,
    Seconds,
    abi_option,
    begin,
    device_options,
    examples,
    json_option,
    resolve_device,
    timeout_option,
)

#: The kinds and their one-line meanings for the help text (l4vctl.diagnosis.KINDS says the same at length;
#: a test keeps them in step).
_KINDS = (
    ("idle", "nothing outstanding, nothing moved (device: not running)"),
    ("working", "requests were offered or completed meanwhile"),
    ("driver-starved", "a receive queue (net, console, input) has no buffer posted"),
    ("device-stalled", "requests outstanding, used.idx still: not taken, or taken and not completed"),
    ("completion-unsignalled", "completions the driver was not interrupted for"),
    ("kick-suppressed", "requests wait untaken; the device asks for no kick and does not poll"),
    ("cmd-stuck", "the cmd word was not cleared within the interval"),
    ("device-needs-reset", "DEVICE_NEEDS_RESET, with the device's reason when it gives one"),
    ("device-failed", "the driver set FAILED"),
    ("features-not-accepted", "FEATURES_OK refused or cleared by the device"),
    ("index-corruption", "used.idx ahead of avail.idx, or an index more than the queue size off"),
)


_HELP = (
    """Say why a device or one of its queues is stuck, with the evidence.

Reads the config page and every ready queue twice, --interval apart, as a
monitor (no driver slot is taken: the driver keeps running), and labels the
device and each queue with what the fields say and how they moved: avail.idx
and used.idx with their flags, used_event and avail_event, the cmd word and
status, and where the device's monitor interface gives them (l4vctl's
emulator) the device's own last_avail_idx, its kick and interrupt counters,
the used.idx it last interrupted the driver for and its reason for
DEVICE_NEEDS_RESET.

A saved state (a dump: archive made by dump-config --with-memory, or a page
alone) is read once: findings that need movement are not judged, and the
report says so.  Where ring memory cannot be reached (vhost-user:, l4re:),
the page-level findings (status, cmd, features) are made and the report says
what could not be seen.

\b
Findings (one line each: "queue N:" or "device:", kind, evidence):
"""
    + "\n".join(f"  {kind:<24}{text}" for kind, text in _KINDS)
    + """

Severity: ok (idle, working), warning (a problem unless the driver means it,
e.g. NO_INTERRUPT while it polls), error.  Exit status 0 when every finding is
ok, 6 when a problem is found, 4 when the config page itself is broken (bad
magic or version, a queue array outside the page).

JSON result: url, interval (null for one look), looks (1 or 2),
device_class, status, status_flags, healthy, findings: [{kind, queue (null: the device), severity, message,
evidence: {field: value, or [first, second] for a field read twice}}], notes
(what could not be seen).
"""
)


@click.command(
    cls=Command,
    help=_HELP,
    epilog=examples(
        ("l4vctl diagnose unix:/tmp/blk.sock", "Why is the driver of a running emulator stuck?"),
        ("l4vctl diagnose unix:/tmp/blk.sock --interval 2 --json", "Look twice, 2 s apart; findings as JSON:"),
        ("l4vctl diagnose dump:state.l4vm", "A saved state (dump-config --with-memory), offline:"),
        ("l4vctl emulate blk --socket /tmp/bad.sock --inject stop-completing=8", "A device to practise on:"),
    ),
    context_settings={"max_content_width": 100},
)
@device_options
@abi_option(auto=True)
@click.option("--interval", type=Seconds(min=0.01, max=3600), default=0.5, show_default=True,
              metavar="SECONDS", help="Time between the two looks at the device.")  # fmt: skip
@timeout_option
@json_option
@click.pass_context
def diagnose(ctx, device, device_opt, abi, interval, timeout, json_mode):  # noqa: D103 - the help is _HELP
    from l4vctl import catalog as cat
    from l4vctl import diagnosis as dg
    from l4vctl.catalog import Role
    from l4vctl.errors import FormatError
    from l4vctl.session import Session

    url = resolve_device(ctx, device, device_opt)
    out = begin(ctx, "diagnose", json_mode)
    out.device = url
    with Session(url, abi=abi, timeout=timeout, role=Role.MONITOR, check=False) as s:
        out.abi = s.abi
        broken = [p for p in s.decode().problems if not re.match(r"queue \d", p)]  # the header's, not a queue's
        if broken:
            raise FormatError(f"{url}: the config page is broken: {'; '.join(broken)}")
        first = _look(s, dg)
        second = None
        if s.live:
            time.sleep(interval)
            second = _look(s, dg)
        findings = dg.diagnose(first, second, interval)
        notes = dg.notes(first, second)
        last = second or first
        result = {
            "url": url,
            "interval": interval if second is not None else None,
            "looks": 2 if second is not None else 1,
            "device_class": last.device_class,
            "status": last.status,
            "status_flags": cat.flag_names(last.status, cat.STATUS_BITS)[0],
            "healthy": not dg.problems(findings),
            "findings": findings,
            "notes": notes,
        }
    out.emit(result, lambda: _text(result))
    if not result["healthy"]:
        ctx.exit(6)


def _look(s, dg):
    """One look at the device: page, STATS, ring words (from the driver's memory where it can be read)."""
    return dg.look(s)


def _text(r: dict) -> str:
    from l4vctl.page import status_info

    st = status_info(r["status"])
    flags = "+".join(st["flags"]) or "none"
    when = f"2 looks {r['interval']:g} s apart" if r["looks"] == 2 else "1 look (saved state)"
    lines = [f"{r['url']}: status {r['status']:#04x} ({flags}), {when}: "
             f"{'healthy' if r['healthy'] else 'PROBLEM'}"]  # fmt: skip
    for f in r["findings"]:
        where = "device" if f["queue"] is None else f"queue {f['queue']}"
        msg = f["message"]
        prefix = f"{where}: "
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
        if not msg.startswith(f["kind"]):
            msg = f"{f['kind']} — {msg}"
        mark = {"ok": "  ", "warning": "? ", "error": "! "}.get(f["severity"], "  ")
        lines.append(f"{mark}{where}: {msg}")
    for n in r["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines) + "\n"
