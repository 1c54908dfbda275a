"""The stall doctor: what two looks at a device, some time apart, say about it.

Everything here is a pure function of plain data: a :class:`State` holds one
look (the config page's status, cmd word and features, each ready queue's
ring indices, flags and event words, and the device's own counters where
its monitor interface gives them); :func:`diagnose` compares two of them (or
reads one, for saved state) and returns findings.  ``l4vctl diagnose``
takes the looks (see :func:`capture`) and renders the findings.

A finding is a dict ``{kind, queue, severity, message, evidence}``; ``kind``
is one of :data:`KINDS`, ``queue`` a queue index or None for the device,
``severity`` "ok", "warning" (a problem unless the driver means it, e.g. it
polls) or "error", ``evidence`` the fields the finding rests on (a pair
``[first, second]`` where a field was read twice).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from l4vctl import catalog as cat

#: Every kind of finding, with what it means (``l4vctl diagnose --help`` and the README show this table).
KINDS: dict[str, str] = {
    "idle": "nothing to do: no requests outstanding and nothing moved (a receive queue with buffers posted "
    "waits for input); for the device: no driver has it running",
    "working": "requests were offered or completed while the device was looked at",
    "driver-starved": "a queue the device fills (net or console receive, input events) has no buffer posted",
    "device-stalled": "requests are outstanding and used.idx did not move: not taken by the device, "
    "or taken and not completed",
    "completion-unsignalled": "completions in the used ring the driver was not interrupted for: the driver set "
    "NO_INTERRUPT, used_event is behind, no IRQ is bound, or the device did not send it",
    "kick-suppressed": "requests wait untaken while the device asks for no kick (NO_NOTIFY or avail_event) "
    "and does not poll",
    "cmd-stuck": "the cmd word was not cleared within the interval",
    "device-needs-reset": "the device set DEVICE_NEEDS_RESET (with its reason when it gives one)",
    "device-failed": "the driver set FAILED",
    "features-not-accepted": "FEATURES_OK was refused or cleared by the device",
    "index-corruption": "ring indices that cannot be: used.idx ahead of avail.idx, avail.idx more than the "
    "queue size ahead, or an index that jumped by more than the queue size",
}

#: Findings that are not problems.
HEALTHY = ("idle", "working")
#: Kinds that need two looks; a saved state (one look) says so instead of guessing.
NEED_MOVEMENT = ("device-stalled", "completion-unsignalled", "kick-suppressed", "cmd-stuck")

_RING_FIELDS = ("avail_flags", "avail_idx", "used_flags", "used_idx", "used_event", "avail_event")


def u16(value: int) -> int:
    """A ring index difference, modulo 2^16."""
    return value & 0xFFFF


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did the index pass ``event`` going from ``old`` to ``new``?"""
    return u16(new - event - 1) < u16(new - old)


@dataclass
class QueueLook:
    """One queue at one instant.

    ``ring``: avail_flags, avail_idx, used_flags, used_idx, used_event and
    avail_event (None: the ring memory could not be read).  ``device``: the
    device's monitor STATS words of the queue (enabled, next_avail,
    completed, notified, signalled_idx ...), None where there is no monitor.
    """

    index: int
    num: int
    ready: bool
    ring: dict[str, int] | None = None
    device: dict[str, int] | None = None
    ring_source: str | None = None  # "memory" (the driver's ring memory) or "device" (the device's view)


@dataclass
class State:
    """One look at a device: page fields, queues, device counters."""

    status: int
    cmd: int
    device_class: str | None
    accepted: set[int]
    offered: set[int]
    queues: list[QueueLook]
    #: monitor STATS without the queues (kicks, irqs_sent, irq_bound, polling, features_refused, reason ...)
    device: dict[str, Any] | None = None
    time: float = field(default_factory=time.monotonic)
    abi: str = cat.DEFAULT_ABI
    #: what could not be read, as sentences
    unseen: list[str] = field(default_factory=list)

    @property
    def event_idx(self) -> bool:
        """Whether VIRTIO_F_EVENT_IDX is in use (offered and accepted)."""
        return cat.EVENT_IDX_BIT in self.accepted and cat.EVENT_IDX_BIT in self.offered


def receive_queues(device_class: str | None, num_queues: int, accepted: set[int]) -> set[int]:
    """The queues the device fills on its own (buffers the driver posts in advance)."""
    if device_class == "net":
        rx = set(range(0, num_queues, 2))
        if cat.NET_F_CTRL_VQ in accepted and num_queues % 2:
            rx.discard(num_queues - 1)  # the control queue is the last one
        return rx
    if device_class == "console":
        if cat.CONSOLE_F_MULTIPORT in accepted:
            return {0, 2} | set(range(4, num_queues, 2))
        return {0}
    if device_class == "input":
        return {0}  # eventq
    return set()


def _finding(kind: str, queue: int | None, severity: str, message: str, evidence: dict) -> dict:
    return {"kind": kind, "queue": queue, "severity": severity, "message": message, "evidence": evidence}


def _status_text(value: int) -> str:
    names, unknown = cat.flag_names(value, cat.STATUS_BITS)
    text = "+".join(names) if names else "none"
    if unknown:
        text += f"+{unknown:#x}"
    return f"{value:#04x} ({text})"


def _moved(a: int, b: int) -> str:
    return f"{a} → {b}"


def problems(findings: list[dict]) -> list[dict]:
    """The findings that are problems (exit status 6)."""
    return [f for f in findings if f["severity"] != "ok"]


def diagnose(first: State, second: State | None, interval: float) -> list[dict]:
    """Findings about the device and each ready queue, from one or two looks ``interval`` seconds apart."""
    out: list[dict] = []
    last = second or first
    out += _device_findings(first, second, interval)
    before = {q.index: q for q in first.queues}
    running = last.status & cat.STATUS_DRIVER_OK and not last.status & cat.STATUS_FAIL_MASK
    rx = receive_queues(last.device_class, len(last.queues), last.accepted)
    for q in last.queues:
        if not q.ready or q.ring is None:
            continue
        a = before.get(q.index) if second is not None else None
        if running:
            out += _queue_findings(q.index in rx, a, q, first, last, interval)
        elif last.status & cat.STATUS_DRIVER_OK:  # failed: the rings may still say why
            out += _corruption(q.index, (q.device or {}).get("num") or q.num, a, q, interval)
    if not any(f["queue"] is None for f in out):
        if last.status & cat.STATUS_DRIVER_OK:
            kinds = [f["kind"] for f in out]
            bad = sum(1 for f in out if f["severity"] != "ok")
            busy = any(k != "idle" for k in kinds)
            what = (f"{bad} queue finding{'s' if bad != 1 else ''} below" if bad
                    else "requests moving" if busy else "every ready queue is idle")  # fmt: skip
            out.insert(0, _finding("working" if busy else "idle", None, "ok",
                                   f"status {_status_text(last.status)}: running, {what}",
                                   {"status": last.status}))  # fmt: skip
        else:
            what = "no driver has started the device" if not last.status else "the handshake has not reached DRIVER_OK"
            out.insert(0, _finding("idle", None, "ok", f"status {_status_text(last.status)}: {what}",
                                   {"status": last.status}))  # fmt: skip
    return out


# -- the device -----------------------------------------------------------------------------


def _device_findings(first: State, second: State | None, interval: float) -> list[dict]:
    out = []
    last = second or first
    st = last.status
    dev = last.device or {}
    reason = dev.get("reason") or ""
    if st & cat.STATUS_FAILED:
        out.append(_finding("device-failed", None, "error",
                            f"status {_status_text(st)}: the driver gave up on the device (FAILED); "
                            f"only a reset leaves this state",
                            {"status": st, **({"reason": reason} if reason else {})}))  # fmt: skip
    if st & cat.STATUS_DEVICE_NEEDS_RESET:
        why = f": {reason}" if reason else " (the device gives no reason)"
        ev: dict[str, Any] = {"status": st, "reason": reason or None}
        if "device_errors" in dev:
            ev["device_errors"] = dev["device_errors"]
        out.append(_finding("device-needs-reset", None, "error",
                            f"status {_status_text(st)}: the device set DEVICE_NEEDS_RESET{why}", ev))  # fmt: skip
    out += _features(first, second, interval)
    out += _cmd(first, second, interval)
    return out


def _features(first: State, second: State | None, interval: float) -> list[dict]:
    last = second or first
    st = last.status
    if st & cat.STATUS_FAIL_MASK:
        return []
    names = _feature_names(last)
    if st & cat.STATUS_DRIVER_OK and not st & cat.STATUS_FEATURES_OK:
        return [_finding("features-not-accepted", None, "error",
                         f"status {_status_text(st)}: DRIVER_OK without FEATURES_OK: the device cleared FEATURES_OK",
                         {"status": st, "accepted": sorted(last.accepted), "accepted_names": names})]  # fmt: skip
    handshake = cat.STATUS_ACKNOWLEDGE | cat.STATUS_DRIVER
    if (st & handshake) != handshake or st & (cat.STATUS_FEATURES_OK | cat.STATUS_DRIVER_OK) or not last.accepted:
        return []
    refused = (last.device or {}).get("features_refused")
    ev: dict[str, Any] = {"status": st, "accepted": sorted(last.accepted), "accepted_names": names}
    if refused:
        ev["features_refused"] = refused
        return [_finding("features-not-accepted", None, "error",
                         f"status {_status_text(st)}: the device refused FEATURES_OK ({refused} time"
                         f"{'s' if refused != 1 else ''} since the reset) for the features "
                         f"{', '.join(names) or 'none'}", ev)]  # fmt: skip
    if second is not None and first.status == st and first.accepted == last.accepted:
        ev["status"] = [first.status, st]
        return [_finding("features-not-accepted", None, "warning",
                         f"status {_status_text(st)} for {interval:g} s with driver features written "
                         f"({', '.join(names) or 'none'}) and no FEATURES_OK: refused by the device, "
                         f"or the driver stopped before setting it", ev)]  # fmt: skip
    return []


def _feature_names(state: State) -> list[str]:
    table = cat.feature_table(state.abi, _device_id(state.device_class))
    return [table[b].name if b in table else str(b) for b in sorted(state.accepted)]


def _device_id(device_class: str | None) -> int:
    for d in cat.DEVICE_IDS.values():
        if d.cls == device_class and device_class is not None:
            return d.id
    return 0


def _cmd(first: State, second: State | None, interval: float) -> list[dict]:
    from l4vctl.page import cmd_info

    last = second or first
    if not last.cmd:
        return []
    info = cmd_info(last.cmd, last.abi)
    what = f"cmd {last.cmd:#010x} ({info['command'] or 'unknown command'} {info['argument']:#x})"
    if second is None:
        return []  # one look: a cmd in flight is normal; diagnose() notes it
    if first.cmd != last.cmd:
        return []
    return [_finding("cmd-stuck", None, "error",
                     f"{what} not cleared by the device after {interval:g} s",
                     {"cmd": [first.cmd, last.cmd], "command": info["command"], "argument": info["argument"],
                      "interval": interval})]  # fmt: skip


# -- the queues ------------------------------------------------------------------------------


def _queue_findings(rx: bool, a: QueueLook | None, b: QueueLook, first: State, last: State,
                    interval: float) -> list[dict]:  # fmt: skip
    i = b.index
    if b.ring is None:
        return []  # what could not be read is in State.unseen
    num = (b.device or {}).get("num") or b.num
    if not num:
        return []
    corrupt = _corruption(i, num, a, b, interval)
    if corrupt:
        return corrupt
    r1 = a.ring if a is not None and a.ring is not None else None
    r2 = b.ring
    d1 = a.device if a is not None else None
    d2 = b.device if b.device is not None and b.device.get("enabled") else None
    if d1 is not None and not d1.get("enabled"):
        d1 = None
    out: list[dict] = []
    outstanding = u16(r2["avail_idx"] - r2["used_idx"])
    used_moved = r1 is not None and r1["used_idx"] != r2["used_idx"]
    avail_moved = r1 is not None and r1["avail_idx"] != r2["avail_idx"]
    ev = _ring_evidence(r1, r2)
    if d2 is not None:
        ev["last_avail_idx"] = [d1["next_avail"], d2["next_avail"]] if d1 is not None else d2["next_avail"]
    if rx:
        if outstanding == 0 and (r1 is None or u16(r1["avail_idx"] - r1["used_idx"]) == 0):
            out.append(_finding("driver-starved", i, "warning",
                                f"queue {i}: driver-starved — no buffers posted for the device to fill "
                                f"(avail.idx {_pair(r1, r2, 'avail_idx')} = used.idx {_pair(r1, r2, 'used_idx')}"
                                f"{' for ' + format(interval, 'g') + ' s' if r1 is not None else ''}): "
                                f"input that arrives now has nowhere to go", ev))  # fmt: skip
    else:
        out += _stall(i, num, r1, r2, d1, d2, first, last, interval, ev)
    out += _unsignalled(i, num, r1, r2, d1, d2, last, interval)
    if not out:
        if r1 is None:
            if outstanding and not rx:
                out.append(_finding("working", i, "ok",
                                    f"queue {i}: {outstanding} requests outstanding at the capture "
                                    f"(one look: whether they move cannot be told)", ev))  # fmt: skip
            else:
                extra = f", {outstanding} buffers posted" if rx and outstanding else ""
                out.append(_finding("idle", i, "ok", f"queue {i}: idle at the capture (one look{extra})", ev))
        elif used_moved or avail_moved:
            done = u16(r2["used_idx"] - r1["used_idx"])
            offered = u16(r2["avail_idx"] - r1["avail_idx"])
            out.append(_finding("working", i, "ok",
                                f"queue {i}: working — {offered} offered, {done} completed in {interval:g} s "
                                f"(avail.idx {_pair(r1, r2, 'avail_idx')}, used.idx {_pair(r1, r2, 'used_idx')})",
                                ev))  # fmt: skip
        else:
            extra = f", {outstanding} buffers posted for the device to fill" if rx else ""
            out.append(_finding("idle", i, "ok",
                                f"queue {i}: idle — avail.idx {_pair(r1, r2, 'avail_idx')}, "
                                f"used.idx {_pair(r1, r2, 'used_idx')}{extra}", ev))  # fmt: skip
    return out


def _pair(r1: dict | None, r2: dict, key: str) -> str:
    return _moved(r1[key], r2[key]) if r1 is not None else str(r2[key])


def _ring_evidence(r1: dict | None, r2: dict) -> dict:
    return {k: ([r1[k], r2[k]] if r1 is not None else r2[k]) for k in _RING_FIELDS}


def _corruption(i: int, num: int, a: QueueLook | None, b: QueueLook, interval: float) -> list[dict]:
    """Indices that cannot be, in either look or between them."""
    out: list[tuple[str, dict[str, Any]]] = []
    looks = [("", b.ring, b.device)]
    if a is not None and a.ring is not None:
        looks.insert(0, ("", a.ring, a.device))
    seen: set[str] = set()
    for _tag, r, d in looks:
        assert r is not None
        if d is not None and d.get("enabled") and "avail_idx" in d:
            # a live device: its own view, whose indices and counters were read at one moment
            # (words from memory and counters from the monitor are read at two)
            r = {"avail_idx": d["avail_idx"], "used_idx": d["used_idx"]}
        ahead = u16(r["avail_idx"] - r["used_idx"])
        if ahead > num:
            back = u16(r["used_idx"] - r["avail_idx"])
            if back <= num:
                why = (f"used.idx {r['used_idx']} is {back} ahead of avail.idx {r['avail_idx']}: "
                       f"more completed than offered")  # fmt: skip
            else:
                why = (f"avail.idx {r['avail_idx']} is {ahead} ahead of used.idx {r['used_idx']}, "
                       f"more than the queue size {num}")  # fmt: skip
            if why not in seen:
                seen.add(why)
                out.append((why, {"avail_idx": r["avail_idx"], "used_idx": r["used_idx"], "num": num}))
        elif d is not None and d.get("enabled"):
            nxt = d["next_avail"]
            if u16(r["avail_idx"] - nxt) > num:
                why = (f"avail.idx {r['avail_idx']} is {u16(r['avail_idx'] - nxt)} ahead of the device "
                       f"(last_avail_idx {nxt}), more than the queue size {num}")  # fmt: skip
                if why not in seen:
                    seen.add(why)
                    out.append((why, {"avail_idx": r["avail_idx"], "last_avail_idx": nxt, "num": num}))
    # between the looks: a busy queue moves its indices by far more than its size, so a jump
    # is judged against what the device says it took and completed meanwhile
    da, db = (a.device if a is not None else None), b.device
    if (a is not None and a.ring is not None and b.ring is not None and da is not None and db is not None
            and da.get("enabled") and db.get("enabled")):  # fmt: skip
        # the device's own view of the indices, read in the same reply as its counters
        ra = {k: da.get(k, a.ring[k]) for k in ("avail_idx", "used_idx")}
        rb = {k: db.get(k, b.ring[k]) for k in ("avail_idx", "used_idx")}
        used_jump = u16(rb["used_idx"] - ra["used_idx"])
        completed = (db["completed"] - da["completed"]) & 0xFFFFFFFFFFFFFFFF
        if used_jump != completed & 0xFFFF and abs(used_jump - completed) > num:
            out.append((f"used.idx moved by {used_jump} ({_moved(ra['used_idx'], rb['used_idx'])}) in "
                        f"{interval:g} s while the device completed {completed} requests",
                        {"used_idx": [ra["used_idx"], rb["used_idx"]], "completed": [da["completed"],
                         db["completed"]], "num": num}))  # fmt: skip
        avail_jump = u16(rb["avail_idx"] - ra["avail_idx"])
        taken = u16(db["next_avail"] - da["next_avail"])
        if avail_jump > taken + num:
            out.append((f"avail.idx jumped by {avail_jump} ({_moved(ra['avail_idx'], rb['avail_idx'])}) in "
                        f"{interval:g} s while the device took {taken}: more than the queue size {num} beyond",
                        {"avail_idx": [ra["avail_idx"], rb["avail_idx"]],
                         "last_avail_idx": [da["next_avail"], db["next_avail"]], "num": num}))  # fmt: skip
    return [_finding("index-corruption", i, "error", f"queue {i}: index-corruption — {why}", ev) for why, ev in out]


def _stall(i, num, r1, r2, d1, d2, first: State, last: State, interval: float, ev: dict) -> list[dict]:
    """device-stalled and kick-suppressed: outstanding requests whose used.idx did not move."""
    outstanding = u16(r2["avail_idx"] - r2["used_idx"])
    if not outstanding or r1 is None or r1["used_idx"] != r2["used_idx"]:
        return []
    out = []
    dev1, dev2 = first.device or {}, last.device or {}
    kicks = [dev1["kicks"], dev2["kicks"]] if "kicks" in dev1 and "kicks" in dev2 else None
    if kicks:
        ev["kicks"] = kicks
    pending = taken = None
    if d2 is not None:
        pending = u16(r2["avail_idx"] - d2["next_avail"])
        taken = u16(d2["next_avail"] - r2["used_idx"])
        ev["pending"], ev["in_flight"] = pending, taken
    # kick-suppressed: untaken requests and a device that asks for no kick
    waiting = pending if pending is not None else outstanding
    not_taken = d1 is None or d2 is None or d1["next_avail"] == d2["next_avail"]
    polling = dev2.get("polling")
    if waiting and not_taken and not polling:
        seen = d2["next_avail"] if d2 is not None else r2["used_idx"]
        if last.event_idx:
            wish = not need_event(r2["avail_event"], r2["avail_idx"], seen)
            how = f"avail_event {r2['avail_event']} is not passed by avail.idx {seen} → {r2['avail_idx']}"
        else:
            wish = bool(r2["used_flags"] & cat.VRING_USED_F_NO_NOTIFY)
            how = f"used.flags {r2['used_flags']:#x} NO_NOTIFY"
        if wish:
            ev["polling"] = polling
            if d1 is not None and d2 is not None:
                where = f"last_avail_idx {_moved(d1['next_avail'], d2['next_avail'])}"
            else:
                where = f"used.idx {_moved(r1['used_idx'], r2['used_idx'])}"
            poll = ", and it does not poll the ring" if polling is not None else ""
            out.append(_finding("kick-suppressed", i, "error",
                                f"queue {i}: kick-suppressed — {waiting} requests wait (avail.idx "
                                f"{_moved(r1['avail_idx'], r2['avail_idx'])}, {where}) and the device asks for "
                                f"no kick ({how}){poll}", ev))  # fmt: skip
            if not taken:
                return out
    parts = []
    if pending is not None and taken is not None:
        if pending and not out:
            moved = d1 is not None and d1["next_avail"] != d2["next_avail"]
            kick_note = f"; kicks {_moved(*kicks)}" if kicks else ""
            if kicks and kicks[1] == 0:
                kick_note += ": the device was never kicked and does not poll (a kick the driver left out?)"
            if not moved:
                parts.append(f"{pending} requests offered and not taken by the device "
                             f"(last_avail_idx {d2['next_avail']}{kick_note})")  # fmt: skip
        if taken:
            parts.append(f"{taken} requests taken (last_avail_idx {d2['next_avail']}) and not completed "
                         f"in {interval:g} s")  # fmt: skip
    elif not out:
        parts.append(f"{outstanding} requests outstanding and none completed in {interval:g} s "
                     f"(the device's own state is not visible here: taken or not cannot be told)")  # fmt: skip
    if parts:
        out.append(_finding("device-stalled", i, "error",
                            f"queue {i}: device-stalled — avail.idx {_moved(r1['avail_idx'], r2['avail_idx'])}, "
                            f"used.idx {_moved(r1['used_idx'], r2['used_idx'])}, " + "; ".join(parts), ev))  # fmt: skip
    return out


def _unsignalled(i, num, r1, r2, d1, d2, last: State, interval: float) -> list[dict]:
    """completion-unsignalled: completions the driver was not interrupted for, and no interrupt since."""
    dev = last.device or {}
    used = r2["used_idx"]
    ev: dict[str, Any] = {"used_idx": [r1["used_idx"], used] if r1 is not None else used}
    if d2 is not None and "signalled_idx" in d2 and d1 is not None and "signalled_idx" in d1:
        if r1 is None:
            return []
        unsignalled = u16(used - d2["signalled_idx"])
        if not unsignalled or unsignalled > num or d1["signalled_idx"] != d2["signalled_idx"]:
            return []
        ev["signalled_idx"] = d2["signalled_idx"]
        ev["notified"] = [d1["notified"], d2["notified"]]
        counted = f"{unsignalled} completions (used.idx {_moved(r1['used_idx'], used)}) since the last " \
                  f"interrupt for this queue (at used.idx {d2['signalled_idx']})"  # fmt: skip
        if "irqs_sent" in dev:
            ev["irqs_sent"] = dev["irqs_sent"]
        if dev.get("irq_bound") == 0:
            ev["irq_bound"] = 0
            return [_finding("completion-unsignalled", i, "error",
                             f"queue {i}: completion-unsignalled — {counted}: no driver IRQ is bound "
                             f"(ICU bind or REGISTER_IFACE), the device cannot interrupt", ev)]  # fmt: skip
        if last.event_idx:
            ev["used_event"] = r2["used_event"]
            asked = need_event(r2["used_event"], used, d2["signalled_idx"])
            behind = 0 < u16(used - r2["used_event"]) <= num
            if asked:
                return [_finding("completion-unsignalled", i, "error",
                                 f"queue {i}: completion-unsignalled — {counted}: the device did not interrupt "
                                 f"although used.idx passed used_event {r2['used_event']}", ev)]  # fmt: skip
            if behind and r1["used_event"] == r2["used_event"]:
                return [_finding("completion-unsignalled", i, "error",
                                 f"queue {i}: completion-unsignalled — {counted}: used_event {r2['used_event']} is "
                                 f"behind used.idx {used}; the device passed it before the driver set it, so no "
                                 f"interrupt comes for these completions", ev)]  # fmt: skip
            return [_finding("completion-unsignalled", i, "warning",
                             f"queue {i}: completion-unsignalled — {counted}: used_event {r2['used_event']} asks "
                             f"for no interrupt yet (expected only while the driver polls the queue)", ev)]  # fmt: skip
        ev["avail_flags"] = r2["avail_flags"]
        if r2["avail_flags"] & cat.VRING_AVAIL_F_NO_INTERRUPT:
            return [_finding("completion-unsignalled", i, "warning",
                             f"queue {i}: completion-unsignalled — {counted}: the driver set NO_INTERRUPT "
                             f"(avail.flags {r2['avail_flags']:#x}; expected only while it polls the queue)",
                             ev)]  # fmt: skip
        return [_finding("completion-unsignalled", i, "error",
                         f"queue {i}: completion-unsignalled — {counted}: the device did not interrupt "
                         f"although the driver asks for interrupts (avail.flags {r2['avail_flags']:#x}, "
                         f"NO_INTERRUPT clear)", ev)]  # fmt: skip
    # without the device's counters: only what the event index says
    if last.event_idx and r1 is not None:
        behind = u16(used - r2["used_event"])
        if 0 < behind <= num and r1["used_event"] == r2["used_event"] and r1["used_idx"] == used:
            ev["used_event"] = [r1["used_event"], r2["used_event"]]
            return [_finding("completion-unsignalled", i, "warning",
                             f"queue {i}: completion-unsignalled — used_event {r2['used_event']} is {behind} behind "
                             f"used.idx {used} and did not move in {interval:g} s: the driver has not seen "
                             f"these completions and no interrupt is due for them", ev)]  # fmt: skip
    return []


# -- notes ---------------------------------------------------------------------------------------


def notes(first: State, second: State | None) -> list[str]:
    """What the looks could not show, for the report."""
    last = second or first
    out = list(dict.fromkeys(first.unseen + (second.unseen if second is not None else [])))
    if second is None:
        out.append("one look only (saved state): " + ", ".join(NEED_MOVEMENT) + " need two looks and are not judged")
        if last.cmd:
            out.append(f"cmd word {last.cmd:#010x} was pending at the capture")
    return out


# -- taking the looks ------------------------------------------------------------------------


def look(session: Any) -> State:
    """One :class:`State` of a session's device (live as a monitor, or saved): the page, the device's
    STATS where it has a monitor interface, and each ready queue's ring words read from the driver's
    memory (only the words: two reads of four bytes and two of two per queue, whatever its size)."""
    from l4vctl.snapshot import Snapshot

    snap = Snapshot.capture(session, memory="none")
    ranges = {q["index"]: _word_ranges(q) for q in snap.decoded["queues"] if q["ready"] and _valid(q["num"])}
    if snap.live and snap.registered:
        snap.fetch(session, [r for rs in ranges.values() for r in rs.values()])
    rings = {}
    outside = []
    for i, rs in ranges.items():
        words = _ring_words(snap, rs)
        if words is not None:
            rings[i] = words
        elif snap.registered is not None and not all(snap.in_registered(a, n) for a, n in rs.values()):
            outside.append(i)
    note = snap.memory_note
    state = state_of(snap.decoded, snap.device_side, rings if snap.regions else None, memory_note=note)
    if note and snap.registered is None:
        state.unseen.insert(0, f"ring memory: {note}")
    for i in outside:
        state.unseen.append(f"queue {i}: its rings lie outside the memory the driver registered")
    if state.status & cat.STATUS_DRIVER_OK and not state.status & cat.STATUS_FAIL_MASK:
        for q in state.queues:
            if q.ready and q.device is not None and not q.device.get("enabled"):
                state.unseen.append(f"queue {q.index}: ready in the page, but the device did not enable it "
                                    f"(it rejected the configuration)")  # fmt: skip
    return state


def _valid(num: int) -> bool:
    return 0 < num <= cat.MAX_QUEUE_SIZE and not num & (num - 1)


def _word_ranges(q: dict) -> dict[str, tuple[int, int]]:
    """Device address and size of each ring word diagnose reads, from the ring schema's offsets."""
    from l4vctl.formats.fast import ring as ring_geometry

    g = ring_geometry()
    off = g.offsets(q["num"])
    size = g.avail_hdr.fields["idx"][1]
    avail, used = q["avail_addr"], q["used_addr"]
    return {
        "avail_flags": (avail + off["avail.flags"], size),
        "avail_idx": (avail + off["avail.idx"], size),
        "used_event": (avail + off["avail.used_event"], size),
        "used_flags": (used + off["used.flags"], size),
        "used_idx": (used + off["used.idx"], size),
        "avail_event": (used + off["used.avail_event"], size),
    }


def _ring_words(snap: Any, ranges: dict[str, tuple[int, int]]) -> dict[str, int] | None:
    """The ring words at ``ranges`` from a snapshot's captured memory (None unless all were captured)."""
    from l4vctl.formats.fast import native_format
    from l4vctl.formats.fast import ring as ring_geometry

    fmt = native_format(ring_geometry().avail_word)
    out = {}
    for name, (addr, size) in ranges.items():
        if not snap.contains(addr, size):
            return None
        out[name] = snap.read(addr, size).cast(fmt)[0]
    return out


def state_of(decoded: dict, stats: dict | None, memory_rings: dict[int, dict] | None = None,
             memory_note: str | None = None, when: float | None = None) -> State:  # fmt: skip
    """A :class:`State` from a decoded page (``page.decode_page(...).result``), monitor STATS (or None)
    and ring words read from the driver's memory by queue index (or None)."""
    hdr = decoded["header"]
    unseen: list[str] = []
    queues = []
    dev_queues = (stats or {}).get("queues") or []
    for q in decoded["queues"]:
        i = q["index"]
        dev = dict(dev_queues[i]) if i < len(dev_queues) else None
        ring = None
        source = None
        if memory_rings is not None and i in memory_rings:
            ring, source = memory_rings[i], "memory"
        elif dev is not None and dev.get("enabled") and all(k in dev for k in _RING_FIELDS):
            ring, source = {k: dev[k] for k in _RING_FIELDS}, "device"
        elif q["ready"]:
            why = memory_note or ("no monitor interface to the device" if stats is None
                                  else "the device has not enabled it and its ring memory was not read")  # fmt: skip
            unseen.append(f"queue {i}: ring indices not visible ({why})")
        queues.append(QueueLook(i, q["num"], bool(q["ready"]), ring, dev, source))
    device = {k: v for k, v in stats.items() if k != "queues"} if stats else None
    if stats is None:
        unseen.append("device-side counters (kicks, interrupts, requests taken) not visible: no monitor STATS here")
    elif stats.get("stats_version", 1) < 2:
        unseen.append("the device's monitor speaks STATS version 1: no event words, interrupt index or reason")
    return State(
        status=hdr["status"],
        cmd=hdr["cmd"],
        device_class=decoded["device"]["class"],
        accepted=set(decoded["features"]["accepted"]["bits"]),
        offered=set(decoded["features"]["offered"]["bits"]),
        queues=queues,
        device=device,
        time=time.monotonic() if when is None else when,
        abi=decoded["abi"],
        unseen=unseen,
    )
