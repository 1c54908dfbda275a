"""``l4vctl trace``: show a recorded session as a timeline, or replay it against a device."""

from __future__ import annotations

import click

from l4vctl.commands._common import Group, begin, examples, json_option, timeout_option
from l4vctl.errors import DeviceStateError, FormatError
from l4vctl.trace import KINDS


@click.group(
    cls=Group,
    epilog=examples(
        (
            "l4vctl blk write 'trace+emu:blk?size=1M&trace=w.jsonl' --sector 0 --count 8 --pattern a5",
            "Record a session:",
        ),
        ("l4vctl --trace w.jsonl negotiate unix:/tmp/blk.sock", "Record any command's sessions:"),
        ("l4vctl trace show w.jsonl --kind status --kind cmd", "The status transitions and cmd words:"),
        ("l4vctl trace replay w.jsonl unix:/tmp/new-server.sock", "Does another device answer the same?"),
    ),
)
def trace():
    """Recorded sessions: every transport step of a driver, as JSON lines.

    A device URL prefixed with 'trace+' (trace+emu:blk, trace+unix:PATH, ...)
    or the root option 'l4vctl --trace FILE COMMAND ...' records IPC calls and
    replies, page writes, cmd words, status transitions, kicks, interrupts and
    every request.  'show' prints the timeline, 'replay' re-drives a device
    with the same steps.  docs/trace.md describes the format.
    """


@trace.command(
    epilog=examples(
        ("l4vctl trace show w.jsonl", "The whole timeline:"),
        ("l4vctl trace show w.jsonl --queue 0 --kind request", "The requests of queue 0:"),
        ("l4vctl trace show w.jsonl --json", "The events, for a script:"),
    )
)
@click.argument("file", metavar="FILE")
@click.option("--queue", type=click.IntRange(min=0), default=None, help="Only steps of this queue.")
@click.option("--kind", "kinds", type=click.Choice(KINDS), multiple=True,
              help="Only steps of this kind (repeatable).")  # fmt: skip
@click.option("--session", type=click.IntRange(min=1), default=None, help="Only steps of this session.")
@json_option
@click.pass_context
def show(ctx, file, queue, kinds, session, json_mode):
    """Print a trace as a timeline: time since the start, session, step, what it was.

    Statuses are shown with their flag names, feature-map writes with the
    features they accept, IPC results with their L4 error names, requests with
    a decoded summary for the device class.

    \b
    --json result keys:
      file         the trace file
      format       the trace format version
      truncated    line number of a last line cut short, or null
      events       the steps shown: each record as stored (t: seconds since
                   the trace started, s: session number, kind, and the keys
                   of docs/trace.md) plus 'line' (its line in the file) and
                   'text' (the timeline's description)
    """
    from l4vctl.output import warn
    from l4vctl.trace.read import describe, load

    out = begin(ctx, "trace show", json_mode)
    tr = load(file)
    if tr.truncated:
        warn(f"{file}:{tr.truncated}: the last line is cut short (the recording process ended while writing); "
             "it is left out")  # fmt: skip
    ctx_info: dict = {}
    shown = []
    for ev in tr.events:
        try:
            line = describe(ev, ctx_info)  # every step, so that later ones know the ABI and device
        except (TypeError, ValueError, KeyError, AttributeError, IndexError):
            raise FormatError(f"{file}:{ev['line']}: malformed {ev['kind']} record") from None
        if kinds and ev["kind"] not in kinds:
            continue
        if queue is not None and ev.get("queue") != queue:
            continue
        if session is not None and ev["s"] != session:
            continue
        shown.append({**ev, "text": line})
    result = {"file": file, "format": tr.header.get("format"), "truncated": tr.truncated, "events": shown}
    urls = {sid: e.get("url") for sid, e in tr.sessions().items()}
    if len(urls) == 1:
        out.device = next(iter(urls.values()))

    def text():
        lines = []
        for ev in shown:
            what = ev["kind"]
            lines.append(f"{ev['t'] * 1e3:10.3f} ms  s{ev['s']}  {what:<8} {ev['text']}")
        if not lines:
            lines.append("no steps match")
        return "\n".join(lines) + "\n"

    out.emit(result, text)


@trace.command(
    epilog=examples(
        ("l4vctl trace replay w.jsonl", "Replay on the device the trace names (an emu: URL starts a new one):"),
        ("l4vctl trace replay w.jsonl unix:/tmp/new.sock", "Replay on another device:"),
        (
            "l4vctl trace replay ping.jsonl 'emu:net?link=x' 'emu:net?link=x' --json",
            "A trace of two sessions, on two devices:",
        ),
    ),
)
@click.argument("file", metavar="FILE")
@click.argument("devices", nargs=-1, metavar="[DEVICE]...")
@timeout_option
@json_option
@click.pass_context
def replay(ctx, file, devices, timeout, json_mode):
    """Drive a device with the steps of a trace; stop at the first answer that differs.

    Each session of the trace is replayed on the DEVICE given for it, in order
    (default: the device URL the trace recorded, e.g. an emu: URL, which
    starts a new emulator).  Compared: IPC results and reply words, the
    config page's identity (device, vendor, queues, offered features, device
    config without a MAC address), status bytes read back, cmd words cleared,
    and every request's completion (used length, SHA-256 of the bytes the
    device wrote, its last byte: a blk status).  Not compared: times,
    interrupts, suppressed kicks, fds, addresses of memory, the generation
    counter.

    Exit status 0 when the device answered every step the same; 6 at the
    first divergence (with --json: ok false, error type 'diverged', and the
    result below).

    \b
    --json result keys:
      file         the trace file
      sessions     [{session, device}]: the device each session ran on
      steps        steps replayed before the end or the divergence
      same         true when the device answered every step the same
      divergence   null, or {line, session, kind, what, expected, got,
                   step (the recorded record)}
    """
    from l4vctl.errors import UsageError
    from l4vctl.trace.read import load
    from l4vctl.trace.replay import Divergence, Replay

    out = begin(ctx, "trace replay", json_mode)
    tr = load(file)
    if tr.truncated:
        from l4vctl.output import warn

        warn(f"{file}:{tr.truncated}: the last line is cut short; the replay ends before it")
    sids = sorted(tr.sessions())
    if len(devices) > len(sids):
        raise UsageError(f"{len(devices)} devices given for a trace of {len(sids)} session(s)")
    rp = Replay(tr, dict(zip(sids, devices)), timeout)
    urls = rp.urls()
    if urls:
        out.device = urls[sids[0]]
    result = {"file": file, "sessions": [{"session": s, "device": urls[s]} for s in sids], "steps": 0,
              "same": True, "divergence": None}  # fmt: skip
    try:
        result["steps"] = rp.run()
    except Divergence as d:
        result["steps"] = rp.steps
        result["same"] = False
        result["divergence"] = d.to_json()
        if not json_mode:
            import json

            where = f"line {d.event.get('line')} (session {d.event.get('s')}, {d.event.get('kind')})"
            print(f"diverged at {where}: {d.what}", flush=True)
            print(f"  expected: {json.dumps(d.expected)}\n  got:      {json.dumps(d.got)}", flush=True)
        plain = out.envelope
        # the failure's envelope carries the result too: where the device diverged and how
        out.envelope = lambda ok, payload: plain(ok, {"result": result, **payload})  # type: ignore[method-assign]
        raise Diverged(f"{file}:{d.event.get('line')}: the device answered differently: {d.what}") from None
    out.emit(result, lambda: f"replayed {result['steps']} steps: the device answered the same\n")


class Diverged(DeviceStateError):
    """The replayed device answered a step differently from the recording (exit status 6)."""

    type = "diverged"
