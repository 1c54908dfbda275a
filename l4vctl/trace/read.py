"""Loading a trace file and describing its steps."""

from __future__ import annotations

from typing import Any

from l4vctl import catalog as cat
from l4vctl.errors import FormatError
from l4vctl.files import read_input, strict_json
from l4vctl.trace import FORMAT_VERSION, KINDS, META_KINDS

#: Largest trace file loaded (a trace is read whole).
MAX_BYTES = 1 << 30


class Trace:
    """A loaded trace: its header, its events (each with its line number as ``line``) and what was wrong."""

    def __init__(self, path: str, header: dict[str, Any], events: list[dict[str, Any]], truncated: int | None):
        self.path = path
        self.header = header
        self.events = events
        #: the line number of a last line cut short (the process that wrote it died), else None
        self.truncated = truncated

    def sessions(self) -> dict[int, dict[str, Any]]:
        """The session records, by session number."""
        return {e["s"]: e for e in self.events if e["kind"] == "session"}


def load(path: str) -> Trace:
    """Read and check a trace file.

    Raises UnavailableError when it cannot be read and FormatError naming the
    line for anything that is not a trace record.  A last line without its
    newline that does not parse is a truncated write: it is dropped and
    reported in :attr:`Trace.truncated`.
    """
    data = read_input(path, lambda f: f.read(MAX_BYTES + 1))
    if len(data) > MAX_BYTES:
        raise FormatError(f"{path}: larger than {MAX_BYTES >> 20} MiB; not loaded")
    lines = data.split(b"\n")
    truncated = None
    if lines and lines[-1] == b"":
        lines.pop()
        cut_last = False
    else:
        cut_last = True  # no newline after the last line
    events: list[dict[str, Any]] = []
    header: dict[str, Any] | None = None
    for number, raw in enumerate(lines, 1):
        try:
            rec = strict_json(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nesting too deep
            if cut_last and number == len(lines):
                truncated = number
                break
            raise FormatError(f"{path}:{number}: not a JSON line") from None
        problem = _check(rec, number == 1)
        if problem:
            raise FormatError(f"{path}:{number}: {problem}")
        if number == 1:
            header = rec
            continue
        rec["line"] = number
        events.append(rec)
    if header is None:
        raise FormatError(f"{path}: no complete first line (empty, or cut short): not a trace file")
    return Trace(path, header, events, truncated)


def _check(rec: Any, first: bool) -> str | None:
    """Why ``rec`` is not a valid record, or None."""
    if not isinstance(rec, dict):
        return "not a trace record (a JSON object is expected)"
    kind = rec.get("kind")
    if first:
        if kind != "trace":
            return "not a trace file (the first line is not the trace header)"
        if rec.get("format") != FORMAT_VERSION:
            return f"trace format {rec.get('format')!r} is not supported (l4vctl reads format {FORMAT_VERSION})"
        return None
    if kind == "trace" or (kind not in KINDS and kind not in META_KINDS):
        return f"unknown record kind {kind!r}"
    t = rec.get("t")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or t < 0:
        return "record without a valid time 't'"
    s = rec.get("s")
    if not isinstance(s, int) or isinstance(s, bool) or s < 1:
        return "record without a valid session number 's'"
    for key in _INT_KEYS.get(kind, ()):
        if key in rec and not (isinstance(rec[key], int) and not isinstance(rec[key], bool)) and rec[key] is not None:
            return f"{kind} record: {key!r} is not an integer"
    for key in _REQUIRED.get(kind, ()):
        if key not in rec:
            return f"{kind} record without {key!r}"
    for key in ("words", "reply"):
        if kind == "ipc" and key in rec and not _words(rec[key]):
            return f"ipc record: {key!r} is not a list of 64-bit words"
    for key in _STR_KEYS:
        if key in rec and not isinstance(rec[key], str) and not (key in _MAYBE_NULL and rec[key] is None):
            return f"{kind} record: {key!r} is not a string"
    for key in ("caps", "reply_caps"):
        if key in rec and not (isinstance(rec[key], list) and all(isinstance(c, dict) for c in rec[key])):
            return f"{kind} record: {key!r} is not a list of capability items"
    if "bufs" in rec and not (isinstance(rec["bufs"], list) and all(_buffer(b) for b in rec["bufs"])):
        return f"{kind} record: 'bufs' is not a list of [address, length, device writes]"
    if "after" in rec and (not isinstance(rec["after"], (int, float)) or isinstance(rec["after"], bool)):
        return f"{kind} record: 'after' is not a number"
    return None


#: Keys whose values are strings wherever they appear (the ones in _MAYBE_NULL may also be null).
_STR_KEYS = ("op", "phase", "url", "role", "out_b64", "field", "cmd", "abi", "lend", "result_name", "cause")
_MAYBE_NULL = ("field",)


def _buffer(value: Any) -> bool:
    """Whether ``value`` is ``[device address, length, device writes]``."""
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value[:2])
        and isinstance(value[2], bool)
    )


def _words(value: Any) -> bool:
    """Whether ``value`` is a list of message words (integers 0 .. 2^64-1)."""
    return isinstance(value, list) and all(
        isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 1 << 64 for w in value
    )


_REQUIRED: dict[str, tuple[str, ...]] = {
    "ipc": ("label", "opcode", "words"),
    "page": ("op",),
    "cmd": ("op", "word"),
    "status": ("status",),
    "request": ("phase", "queue", "head"),
    "queue": ("queue", "num", "desc", "avail", "used"),
    "session": ("url",),
}
_INT_KEYS: dict[str, tuple[str, ...]] = {
    "ipc": ("label", "opcode", "result"),
    "page": ("offset", "size", "old", "new"),
    "cmd": ("word",),
    "status": ("status",),
    "request": ("queue", "head", "used"),
    "queue": ("queue", "num", "desc", "avail", "used"),
    "kick": ("queue",),
}


# -- describing steps -------------------------------------------------------------------------


def status_text(value: int) -> str:
    """``0x0b ACKNOWLEDGE+DRIVER+FEATURES_OK``."""
    names, unknown = cat.flag_names(value, cat.STATUS_BITS)
    parts = names + ([f"{unknown:#x}"] if unknown else [])
    return f"{value:#04x} " + ("+".join(parts) if parts else "(reset)")


def feature_text(field: str, value: int, abi: str | None, device: int | None) -> str:
    """The feature bits a word of a feature map sets, by name."""
    try:
        word = int(field.rsplit("[", 1)[1].rstrip("]"))
    except (IndexError, ValueError):
        return ""
    table = cat.feature_table(abi or cat.DEFAULT_ABI, device)
    names = []
    for bit in cat.bits_of([value]):
        n = word * 32 + bit
        names.append(table[n].name if n in table else f"bit {n}")
    return ", ".join(names)


def describe(ev: dict[str, Any], ctx: dict[str, Any] | None = None) -> str:
    """One line saying what a step was.  ``ctx`` carries what earlier steps said (abi, device)."""
    ctx = ctx if ctx is not None else {}
    kind = ev["kind"]
    if kind == "session":
        return f"session {ev['s']} on {ev.get('url')} as {ev.get('role', 'driver')}"
    if kind == "end":
        return "session ends"
    if kind == "ipc":
        words = ", ".join(f"{w:#x}" for w in ev.get("words", []))
        caps = "".join(f" +{c.get('type')}" for c in ev.get("caps", []) if isinstance(c, dict))
        text = f"{ev.get('op', '?')}({words}){caps}"
        if "error" in ev:
            err = ev["error"] if isinstance(ev["error"], dict) else {}
            return f"{text} -> failed: {err.get('type')}: {err.get('message')}"
        result = ev.get("result", 0)
        text += f" -> {cat.l4_error_name(result) if isinstance(result, int) else result}"
        reply = ev.get("reply") or []
        if reply:
            text += " [" + ", ".join(f"{w:#x}" if isinstance(w, int) else str(w) for w in reply) + "]"
        rcaps = "".join(f" +{c.get('type')}" for c in ev.get("reply_caps", []) if isinstance(c, dict))
        return text + rcaps
    if kind == "page":
        if ev["op"] == "map":
            ctx["abi"] = ev.get("abi")
            ident = ev.get("identity") or {}
            ctx["device"] = ident.get("device")
            dev = ident.get("device")
            name = cat.device_name(dev) if isinstance(dev, int) else "?"
            return f"config page mapped: {name} device, {ev.get('abi')} ABI, status {status_text(ev.get('status', 0))}"
        field = ev.get("field") or f"offset {ev.get('offset', 0):#x}"
        text = f"{field} = {ev.get('new', 0):#x} (was {ev.get('old', 0):#x})"
        if field.startswith(("driver_features_map[", "dev_features_map[")):
            names = feature_text(field, ev.get("new", 0), ctx.get("abi"), ctx.get("device"))
            if names:
                text += f": {names}"
        return text
    if kind == "cmd":
        if ev["op"] == "cleared":
            return f"cmd {ev['word']:#010x} cleared by the device after {ev.get('after', 0) * 1e3:.3f} ms"
        if not ev["word"]:
            return "cmd = 0"
        return f"cmd = {ev['word']:#010x} ({ev.get('cmd')} {ev.get('arg', 0):#x})"
    if kind == "status":
        return f"status reads {status_text(ev['status'])}"
    if kind == "kick":
        where = f"queue {ev['queue']}" if ev.get("queue") is not None else (ev.get("cause") or "device")
        idx = ev.get("index")
        text = f"kick {where} (notify index {idx if idx is not None else 'device'})"
        if ev.get("avail_idx") is not None:
            text += f" avail.idx={ev['avail_idx']}"
        if ev.get("notified") is False:
            text += " suppressed: the device asked for no notification"
        elif ev.get("delivered") is False:
            text += " not delivered: the IRQ's counter is full"
        return text
    if kind == "irq":
        return f"interrupt (index {ev.get('index')}) x{ev.get('count', 1)}"
    if kind == "queue":
        return (f"queue {ev['queue']}: {ev['num']} entries, desc {ev['desc']:#x} avail {ev['avail']:#x} "
                f"used {ev['used']:#x}" + (", event idx" if ev.get("event_idx") else "")
                + (", indirect" if ev.get("indirect") else ""))  # fmt: skip
    if kind == "request":
        s = ev.get("summary") or (_posted_summary(ev, ctx) if ev["phase"] == "posted" else {})
        what = _summary_text(s)
        if ev["phase"] == "posted":
            sizes = f"out {ev.get('out_len', 0)} in {ev.get('in_len', 0)}"
            return f"queue {ev['queue']} post head {ev['head']}: {sizes}" + (f" {what}" if what else "")
        return f"queue {ev['queue']} done head {ev['head']}: used {ev.get('used')}" + (f" {what}" if what else "")
    return kind


def _posted_summary(ev: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """The summary of a posted request, decoded from the bytes it gave the device (recorded without one)."""
    import base64

    from l4vctl.trace.record import summarize

    device = ctx.get("device")
    try:
        out = base64.b64decode(ev.get("out_b64", ""), validate=True)
        return summarize(cat.device_class(device) if isinstance(device, int) else None, ev["queue"], out, None, 0)
    except (ValueError, TypeError):
        return {}


def _summary_text(s: dict[str, Any]) -> str:
    cls = s.get("class")
    if cls == "blk":
        if s.get("malformed"):
            return "blk: malformed header"
        text = f"blk {s.get('type_name') or s.get('type')} sector {s.get('sector')}"
        data = s.get("in_data") if s.get("type") in (cat.BLK_T_IN, cat.BLK_T_GET_ID) else s.get("out_data")
        if data:
            text += f" {data} bytes"
        if "status_name" in s:
            text += f" -> {s['status_name']}"
        return text
    if cls == "net":
        if "frame_len" not in s:
            return f"net {s.get('direction')} buffer"
        text = f"net {s.get('direction')} {s['frame_len']} bytes"
        if "src" in s:
            text += f" {s['src']} > {s['dst']} type {s['ethertype']:#06x}"
        return text
    if cls == "console":
        return f"console {s.get('bytes')} bytes {s.get('text')!r}"
    if cls == "rng":
        return f"rng {s.get('length')} bytes"
    return ""
