"""The cases of ``l4vctl check``: each a driver behaviour and the rule of the spec it checks.

Sections refer to the L4-VIRTIO transport specification (§3 IPC operations,
§5 device rules, §6 split ring).  Every case runs in a fresh session; the
suite resets the device and checks it with a fresh handshake afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat
from l4vctl.conformance import Case, CaseSkipped, Outcome, Verdict
from l4vctl.conformance.probe import (
    DATA_QUEUE,
    REQUEST_CLASSES,
    close_session,
    config_queue,
    fail_bits,
    keep_view,
    queue_enabled,
    status_steps,
    up_to_features_ok,
    write_queue_entry,
)
from l4vctl.errors import DeviceStateError, ProtocolError, UnavailableError

if TYPE_CHECKING:
    from l4vctl.conformance.probe import Target
    from l4vctl.session import Session
    from l4vctl.virtqueue import Virtqueue

ACK, DRIVER, FEATURES_OK, DRIVER_OK = (cat.STATUS_ACKNOWLEDGE, cat.STATUS_DRIVER, cat.STATUS_FEATURES_OK,
                                       cat.STATUS_DRIVER_OK)  # fmt: skip
NEEDS_RESET, FAILED = cat.STATUS_DEVICE_NEEDS_RESET, cat.STATUS_FAILED
#: A device address far outside anything the suite lends (the session lends from 0x200000 up).
OUTSIDE = 0x7000_0000
NEXT, WRITE, INDIRECT = cat.VRING_DESC_F_NEXT, cat.VRING_DESC_F_WRITE, cat.VRING_DESC_F_INDIRECT

CASES: list[Case] = []


def case(name: str, section: str, rule: str, accept: str, **kw: Any) -> Callable[[Callable[[Target], Outcome]], Any]:
    """Register the decorated function as a case (in the order of this module)."""

    def register(fn: Callable[[Target], Outcome]) -> Callable[[Target], Outcome]:
        CASES.append(Case(name, section, rule, accept, fn, **kw))
        return fn

    return register


def applies(check: Callable[[Target], str | None]) -> Callable[[Any], Any]:
    """Attach a test of applicability (a reason string when the case does not apply)."""

    def mark(fn: Any) -> Any:
        fn.applies = check
        return fn

    return mark


def _needs_class(t: Target) -> str | None:
    if t.device_class not in REQUEST_CLASSES:
        what = t.device_class or "unknown (the backend does not say; vhost-user needs ?type=blk)"
        return f"not applicable: no request is defined here for device class {what}"
    return None


def _needs_cmd(t: Target) -> str | None:
    if not t.offers_cmd:
        return "not applicable: the device does not offer L4VIRTIO_FEATURE_CMD_CONFIG (no cmd word)"
    return None


def _needs_ipc_mode(t: Target) -> str | None:
    if t.mode == "cmd" or (t.mode == "auto" and t.offers_cmd):
        return "not applicable in cmd mode: CMD_CFG_QUEUE applies no status gate (§5.3)"
    return None


def _needs_indirect(t: Target) -> str | None:
    if cat.INDIRECT_DESC_BIT not in t.offered:
        return "not applicable: the device does not offer VIRTIO_F_INDIRECT_DESC"
    return _needs_class(t)


# -- 1. the good driver ------------------------------------------------------------------------------


@case("handshake", "§4.3, §5.1, §5.3", "a driver that follows the rules reaches DRIVER_OK (status 0x0f)",
      "PASS: DRIVER_OK set, no fail bit", wire="ring")  # fmt: skip
def _good_handshake(t: Target) -> Outcome:
    with t.open() as s:
        s.handshake()
        st = s.status
        if st & cat.STATUS_FAIL_MASK or not st & DRIVER_OK:
            return Outcome(Verdict.FAIL, f"status {st:#04x} after the handshake")
        queues = ", ".join(f"{q.index}:{q.num}" for q in s.queues) or "none"
        return Outcome(Verdict.PASS, f"status {st:#04x}, {len(s.negotiated)} features, queues {queues}")


@applies(_needs_class)
@case("request", "§5.5, §6", "a well-formed request of the device class completes",
      "PASS: completed (blk: status OK)", needs_handshake=True, wire="ring")  # fmt: skip
def _good_request(t: Target) -> Outcome:
    with t.open() as s:
        s.handshake()
        req, kind, what = run_good(s, t.device_class, t.timeout)  # type: ignore[arg-type]
        if kind == "completed":
            ok, text = req.judge(what)
            return Outcome(Verdict.PASS if ok else Verdict.FAIL, text)
        if kind == "flagged":
            return Outcome(Verdict.FAIL, f"the device flagged a good request: status {what:#04x} ({fail_bits(what)})")
        return Outcome(Verdict.WEDGED, f"a good {req.cls} request did not complete within {t.timeout:g} s")


def post_good(s: Session, cls: str) -> tuple[Request, Any]:
    """Post one good request of class ``cls`` on a session at DRIVER_OK and kick: (request, virtqueue)."""
    req = Request(s, cls)
    vq = s.virtqueue(DATA_QUEUE[cls])
    vq.add(req.bufs(), 1)
    vq.kick()
    return req, vq


def run_good(s: Session, cls: str, timeout: float) -> tuple[Request, str, Any]:
    """:func:`post_good`, then wait for it: (request, outcome kind, what) as :func:`wait_outcome` tells."""
    req, vq = post_good(s, cls)
    kind, what = wait_outcome(s, vq, timeout)
    return req, kind, what


def good_request_in(s: Session, cls: str, timeout: float) -> str | None:
    """Post one good request of class ``cls`` on a session at DRIVER_OK: None if it completes
    well, else what happened."""
    req, kind, what = run_good(s, cls, timeout)
    if kind == "completed":
        ok, text = req.judge(what)
        return None if ok else f"a good request afterwards: {text}"
    if kind == "flagged":
        return f"a good request afterwards was flagged: status {what:#04x} ({fail_bits(what)})"
    return f"a good request afterwards did not complete within {timeout:g} s"


# -- 2. status order and features (§5.1) --------------------------------------------------------------


def _order(t: Target, steps: list[int], bad_bit: int, what: str) -> Outcome:
    with t.open() as s:
        st = status_steps(s, steps)
        if st & NEEDS_RESET:
            return Outcome(Verdict.REJECT, f"{what}: status {st:#04x} (DEVICE_NEEDS_RESET)")
        if st & bad_bit:
            return Outcome(Verdict.FAIL, f"{what} was accepted: status {st:#04x}")
        return Outcome(Verdict.REJECT, f"{what} was ignored: status {st:#04x}")


@case("status-driver-ok-before-features-ok", "§5.1 step 4",
      "DRIVER_OK without FEATURES_OK is an ordering error: status |= DEVICE_NEEDS_RESET",
      "REJECT: DEVICE_NEEDS_RESET set, or DRIVER_OK not taken")  # fmt: skip
def _order_driver_ok(t: Target) -> Outcome:
    return _order(t, [ACK, ACK | DRIVER, ACK | DRIVER | DRIVER_OK], DRIVER_OK, "DRIVER_OK before FEATURES_OK")


@case("status-features-ok-before-driver", "§5.1 step 4",
      "FEATURES_OK without DRIVER is an ordering error: status |= DEVICE_NEEDS_RESET",
      "REJECT: DEVICE_NEEDS_RESET set, or FEATURES_OK not taken")  # fmt: skip
def _order_features_ok(t: Target) -> Outcome:
    return _order(t, [ACK, ACK | FEATURES_OK], FEATURES_OK, "FEATURES_OK before DRIVER")


@case("status-driver-before-acknowledge", "§5.1 step 4",
      "DRIVER without ACKNOWLEDGE is an ordering error: status |= DEVICE_NEEDS_RESET",
      "REJECT: DEVICE_NEEDS_RESET set, or DRIVER not taken")  # fmt: skip
def _order_driver(t: Target) -> Outcome:
    return _order(t, [DRIVER], DRIVER, "DRIVER before ACKNOWLEDGE")


@case("status-failed-sticks", "§5.1 step 3", "only a reset leaves a fail state: FAILED stays through later writes",
      "PASS: FAILED still set after writing ACKNOWLEDGE|DRIVER")  # fmt: skip
def _failed_sticks(t: Target) -> Outcome:
    with t.open() as s:
        st = status_steps(s, [ACK, ACK | FAILED, ACK | DRIVER])
        if st & FAILED:
            return Outcome(Verdict.PASS, f"status {st:#04x}: FAILED kept")
        return Outcome(Verdict.FAIL, f"a status write left the fail state without a reset: status {st:#04x}")


def _unoffered(t: Target, s: Session) -> int:
    """A feature bit inside the maps that the device does not offer."""
    words = len(s.words("dev_features_map"))
    for bit in range(words * 32 - 1, 32, -1):
        if bit not in t.offered:
            return bit
    raise CaseSkipped("not applicable: the device offers every feature bit")


@case("features-unknown-bit", "§5.1 step 5",
      "FEATURES_OK with a feature the device does not offer is refused (FEATURES_OK dropped)",
      "REJECT: FEATURES_OK not set")  # fmt: skip
def _unknown_feature(t: Target) -> Outcome:
    from l4vctl import page as pg

    with t.open() as s:
        bit = _unoffered(t, s)
        s.reset()
        s.write_status(ACK)
        s.write_status(ACK | DRIVER)
        s._view.set_words("driver_features_map", pg.feature_words(s.abi, {cat.VERSION_1_BIT, bit}))  # type: ignore[union-attr]
        st = s.write_status(ACK | DRIVER | FEATURES_OK)
        if st & FEATURES_OK:
            return Outcome(Verdict.FAIL, f"FEATURES_OK accepted with unoffered bit {bit}: status {st:#04x}")
        return Outcome(Verdict.REJECT, f"FEATURES_OK refused for unoffered bit {bit}: status {st:#04x}")


@case("features-after-features-ok", "§5.1 step 5",
      "features changed after FEATURES_OK never get a device to show FEATURES_OK for bits it does not offer",
      "REJECT: FEATURES_OK dropped on the next write; PASS: the change is ignored (features stay as accepted)",
      needs_handshake=True)  # fmt: skip
def _features_after(t: Target) -> Outcome:
    from l4vctl import page as pg

    with t.open() as s:
        up_to_features_ok(s)
        bit = _unoffered(t, s)
        s._view.set_words("driver_features_map", pg.feature_words(s.abi, s.negotiated | {bit}))  # type: ignore[union-attr]
        st = s.write_status(ACK | DRIVER | FEATURES_OK)
        if st & NEEDS_RESET or not st & FEATURES_OK:
            return Outcome(Verdict.REJECT, f"re-negotiation with unoffered bit {bit} refused: status {st:#04x}")
        shown = set(cat.bits_of(s.words("dev_features_map")))
        if bit in shown:
            return Outcome(Verdict.FAIL, f"the device now offers bit {bit} it did not offer before")
        return Outcome(Verdict.PASS, f"FEATURES_OK kept ({st:#04x}): the change after FEATURES_OK was ignored")


# -- 3. queue configuration (§3.3, §5.3) ---------------------------------------------------------------


def _bad_queue(t: Target, what: str, index: int = 0, **fields: int) -> Outcome:
    """Offer queue ``index`` with ``fields`` changed from a good ring in registered memory."""
    from l4vctl.formats.fast import ring as ring_geometry

    with t.open() as s:
        up_to_features_ok(s)
        num_max = t.num_max[index] if index < len(t.num_max) else 256
        good = 1 << (max(num_max, 1).bit_length() - 1)
        num = fields.get("num", good)
        room = max(num, good)
        total = ring_geometry().simple_layout(min(room, 32768))["total"]
        _mem, base = s._lend(-(-total // 4096) * 4096, "l4vctl-check-rings")
        lay = ring_geometry().simple_layout(min(room, 32768))
        entry = {"num": num, "desc_addr": base + lay["desc"], "avail_addr": base + lay["avail"],
                 "used_addr": base + lay["used"], "ready": 1}  # fmt: skip
        entry.update(fields)
        if index < t.num_queues:
            write_queue_entry(s, index, **entry)
        result = config_queue(s, index)
        st = s.status
        if result is not None and result < 0:
            return Outcome(Verdict.REJECT, f"{what}: CONFIG_QUEUE answered {cat.l4_error_name(result)}")
        if st & cat.STATUS_FAIL_MASK:
            return Outcome(Verdict.REJECT, f"{what}: status {st:#04x} ({fail_bits(st)})")
        enabled = queue_enabled(s, index) if index < t.num_queues else False
        if enabled:
            return Outcome(Verdict.FAIL, f"{what}: the device enabled the queue")
        said = "the cmd word was consumed" if result is None else f"CONFIG_QUEUE answered {result}"
        seen = ("the device left the queue disabled" if enabled is False
                else "the queue state cannot be seen from here (§3.3: devices may answer >= 0)")  # fmt: skip
        return Outcome(Verdict.PASS, f"{what}: {said}; {seen}")


@case("queue-size-not-power-of-two", "§5.3 step 3", "a queue whose num is not a power of two is rejected",
      "REJECT: negative CONFIG_QUEUE result or fail bit; PASS: answered >= 0 and the queue stays disabled",
      needs_handshake=True)  # fmt: skip
def _queue_not_pow2(t: Target) -> Outcome:
    num_max = t.num_max[0] if t.num_max else 256
    num = 3 if num_max >= 3 else 0xFFFF
    return _bad_queue(t, f"num {num}", num=num)


@case("queue-size-zero", "§5.3 step 3", "a queue with num 0 is rejected",
      "REJECT: negative CONFIG_QUEUE result or fail bit; PASS: answered >= 0 and the queue stays disabled",
      needs_handshake=True)  # fmt: skip
def _queue_zero(t: Target) -> Outcome:
    return _bad_queue(t, "num 0", num=0)


@case("queue-size-above-num-max", "§5.3 step 3", "a queue with num above num_max is rejected",
      "REJECT: negative CONFIG_QUEUE result or fail bit; PASS: answered >= 0 and the queue stays disabled",
      needs_handshake=True)  # fmt: skip
def _queue_above(t: Target) -> Outcome:
    num_max = t.num_max[0] if t.num_max else 256
    num = num_max * 2 if num_max * 2 <= 0xFFFF else 0xFFFF
    return _bad_queue(t, f"num {num} > num_max {num_max}", num=num)


@case("queue-rings-outside-memory", "§5.3 step 5",
      "rings that do not lie inside registered memory are rejected",
      "REJECT: negative CONFIG_QUEUE result or fail bit; PASS: answered >= 0 and the queue stays disabled",
      needs_handshake=True)  # fmt: skip
def _queue_outside(t: Target) -> Outcome:
    return _bad_queue(t, f"rings at {OUTSIDE:#x}", desc_addr=OUTSIDE, avail_addr=OUTSIDE + 0x10000,
                      used_addr=OUTSIDE + 0x20000)  # fmt: skip


@case("queue-misaligned", "§5.3 step 4", "a descriptor table that is not 16-byte aligned is rejected",
      "REJECT: negative CONFIG_QUEUE result or fail bit; PASS: answered >= 0 and the queue stays disabled",
      needs_handshake=True)  # fmt: skip
def _queue_misaligned(t: Target) -> Outcome:
    return _bad_queue(t, "desc_addr 8 bytes off", desc_addr=0x200008)


@applies(_needs_ipc_mode)
@case("config-queue-index-out-of-range", "§3.3, §5.3", "CONFIG_QUEUE for a queue that does not exist is refused",
      "REJECT: -L4_ERANGE/-L4_EINVAL; PASS: answered >= 0 (§3.3: some devices do) and the device still works",
      needs_handshake=True)  # fmt: skip
def _queue_index(t: Target) -> Outcome:
    with t.open() as s:
        up_to_features_ok(s)
        r = s._call(cat.L4VIRTIO_PROTOCOL, cat.OP_CONFIG_QUEUE, [t.num_queues])
        r.close()
        if r.result < 0:
            return Outcome(Verdict.REJECT, f"CONFIG_QUEUE({t.num_queues}) answered {cat.l4_error_name(r.result)}")
        return Outcome(Verdict.PASS, f"CONFIG_QUEUE({t.num_queues}) answered {r.result}")


@applies(_needs_ipc_mode)
@case("config-queue-before-driver", "§3.3", "CONFIG_QUEUE before ACKNOWLEDGE|DRIVER is refused with -L4_EIO",
      "REJECT: a negative result; FAIL: the queue was accepted")  # fmt: skip
def _queue_early(t: Target) -> Outcome:
    with t.open() as s:
        s.reset()
        r = s._call(cat.L4VIRTIO_PROTOCOL, cat.OP_CONFIG_QUEUE, [0])
        r.close()
        if r.result < 0:
            return Outcome(Verdict.REJECT, f"CONFIG_QUEUE at status 0 answered {cat.l4_error_name(r.result)}")
        return Outcome(Verdict.FAIL, f"CONFIG_QUEUE at status 0 answered {r.result}")


# -- 4. REGISTER_DS (§3.4) ------------------------------------------------------------------------------


def _register(t: Target, what: str, pages: int, base: int | None, offset: int, size: int, cap: bool = True) -> Outcome:
    with t.open() as s:
        link = s._live()
        lend = getattr(link.channel, "lend", None)
        from l4vctl.backends.base import lend_local

        nbytes = pages * 4096
        lent = lend(nbytes, "l4vctl-check-ds") if lend is not None else lend_local(nbytes, "l4vctl-check-ds")
        try:
            addr = link.next_address if base is None else base
            caps, fds = ([lent.cap], lent.fds) if cap else ([], [])
            r = s._call(cat.L4VIRTIO_PROTOCOL, cat.OP_REGISTER_DS, [addr, offset, size], caps, fds)
            r.close()
        finally:
            lent.close()
        if r.result < 0:
            return Outcome(Verdict.REJECT, f"{what}: REGISTER_DS answered {cat.l4_error_name(r.result)}")
        return Outcome(Verdict.FAIL, f"{what}: REGISTER_DS accepted it ({r.result})")


@case("register-ds-offset-beyond", "§3.4", "an offset at or beyond the dataspace's end is refused (-L4_ERANGE)",
      "REJECT: a negative result")  # fmt: skip
def _ds_offset(t: Target) -> Outcome:
    return _register(t, "offset 0x2000 into a 4 KiB dataspace", 1, None, 0x2000, 0x1000)


@case("register-ds-size-beyond", "§3.4", "offset + size beyond the dataspace's end is refused (-L4_EINVAL)",
      "REJECT: a negative result")  # fmt: skip
def _ds_size(t: Target) -> Outcome:
    return _register(t, "16 KiB of a 4 KiB dataspace", 1, None, 0, 0x4000)


@case("register-ds-base-overflow", "§3.4", "base + size overflowing 64 bits is refused (-L4_EINVAL)",
      "REJECT: a negative result")  # fmt: skip
def _ds_overflow(t: Target) -> Outcome:
    return _register(t, "base 0xfffffffffffff000 + 8 KiB", 2, 0xFFFF_FFFF_FFFF_F000, 0, 0x2000)


@case("register-ds-without-dataspace", "§3.4", "REGISTER_DS without a capability item is refused (-L4_EMSGTOOSHORT)",
      "REJECT: a negative result")  # fmt: skip
def _ds_missing(t: Target) -> Outcome:
    return _register(t, "no capability item", 1, None, 0, 0x1000, cap=False)


# -- 5. the cmd word (§4.6, §5.4) -----------------------------------------------------------------------


def _post_cmd(s: Session, words: list[int], timeout: float) -> float:
    """Store each word in cmd (the later ones over the earlier), kick once, wait until cmd is 0.

    Returns the seconds it took; raises TimeoutExpired if cmd stays set."""
    from l4vctl.errors import TimeoutExpired

    assert s._view is not None and s.device_irq is not None
    for w in words:
        s._view.set("cmd", w)
    s.device_irq.trigger()
    start = time.monotonic()
    while s.get("cmd"):
        if time.monotonic() - start > timeout:
            raise TimeoutExpired(f"cmd {words[-1]:#010x} was not cleared within {timeout:g} s")
        s._live().check()  # a device that died ends the wait
        time.sleep(0.001)
    return time.monotonic() - start


@applies(_needs_cmd)
@case("cmd-unknown", "§5.4 step 2-3", "an unknown cmd is ignored and cleared (cmd := 0), the status unchanged",
      "PASS: cmd cleared, status unchanged")  # fmt: skip
def _cmd_unknown(t: Target) -> Outcome:
    with t.open() as s:
        st0 = status_steps(s, [ACK])
        _post_cmd(s, [0x10000000 | 0x42], t.timeout)
        st = s.status
        if st != st0:
            return Outcome(Verdict.FAIL, f"an unknown cmd changed the status from {st0:#04x} to {st:#04x}")
        return Outcome(Verdict.PASS, f"cmd 0x10000042 cleared, status {st:#04x} unchanged")


@applies(_needs_cmd)
@case("cmd-overwritten-while-pending", "§4.6, §5.4",
      "a cmd overwritten before the device saw it: the device acts on what it reads and clears the word",
      "PASS: cmd cleared and the status one of the two written")  # fmt: skip
def _cmd_overwrite(t: Target) -> Outcome:
    with t.open() as s:
        status_steps(s, [ACK])
        first = cat.cmd_word(cat.CMD_SET_STATUS, ACK | DRIVER)
        second = cat.cmd_word(cat.CMD_SET_STATUS, ACK | FAILED)
        _post_cmd(s, [first, second], t.timeout)
        st = s.status
        if st in (ACK | DRIVER, ACK | FAILED):
            return Outcome(Verdict.PASS, f"cmd cleared, status {st:#04x}")
        return Outcome(Verdict.FAIL, f"status {st:#04x} is neither of the values written")


@applies(_needs_cmd)
@case("cmd-in-fail-state", "§5.1 step 3, §5.4", "a SET_STATUS cmd in a fail state is cleared and the fail bit stays",
      "PASS: cmd cleared, FAILED kept")  # fmt: skip
def _cmd_fail_state(t: Target) -> Outcome:
    with t.open() as s:
        status_steps(s, [ACK])
        _post_cmd(s, [cat.cmd_word(cat.CMD_SET_STATUS, ACK | FAILED)], t.timeout)
        _post_cmd(s, [cat.cmd_word(cat.CMD_SET_STATUS, ACK | DRIVER | FEATURES_OK)], t.timeout)
        st = s.status
        if st & FAILED:
            return Outcome(Verdict.PASS, f"cmd cleared, status {st:#04x}: FAILED kept")
        return Outcome(Verdict.FAIL, f"a cmd left the fail state without a reset: status {st:#04x}")


@applies(_needs_cmd)
@case("cmd-queue-out-of-range", "§5.3, §5.4", "CMD_CFG_QUEUE for a queue that does not exist is cleared",
      "PASS: cmd cleared and the device still works")  # fmt: skip
def _cmd_queue_range(t: Target) -> Outcome:
    with t.open() as s:
        status_steps(s, [ACK, ACK | DRIVER])
        _post_cmd(s, [cat.cmd_word(cat.CMD_CFG_QUEUE, 0xFFFFFF)], t.timeout)
        return Outcome(Verdict.PASS, f"CMD_CFG_QUEUE(0xffffff) cleared, status {s.status:#04x}")


# -- 6. hostile rings (§5.5, §6) ---------------------------------------------------------------------------


#: Where a request's pieces lie in its memory (740 bytes: it fits the spare end of every ring area's last page).
DATA, HDR_AT, STATUS_AT, OUTER_AT, INNER_AT, PAYLOAD_AT, REQ_BYTES = 0, 512, 528, 544, 576, 640, 740


def _request_memory(s: Session, cls: str) -> tuple[memoryview, int]:
    """Memory for one request: the unused end of the data queue's ring area (already registered, so a
    case costs the device no region of its table), else newly lent memory."""
    from l4vctl.formats.fast import ring as ring_geometry

    q = next((q for q in s.queues if q.index == DATA_QUEUE[cls]), None)
    if q is not None and s.ring_memory is not None:
        lay = ring_geometry().simple_layout(q.num)
        start = (lay["total"] + 15) & ~15
        if -(-lay["total"] // 4096) * 4096 - start >= REQ_BYTES:
            at = q.offset + start
            return keep_view(s, s.ring_memory[at : at + REQ_BYTES]), q.desc - lay["desc"] + start
    mem, addr = s.alloc(4096, "l4vctl-check-req")
    return keep_view(s, mem[:REQ_BYTES]), addr


class Request:
    """A request of one device class: its buffers and how to judge its completion."""

    def __init__(self, s: Session, cls: str):
        self.cls = cls
        self.mem, self.addr = _request_memory(s, cls)
        a, m = self.addr, self.mem
        if cls == "blk":
            from l4vctl.formats.fast import codec

            codec("l4virtio_block_header_t").struct.pack_into(m, HDR_AT, cat.BLK_T_IN, 0, 0)
            m[STATUS_AT] = 0xFF
            self._bufs = [(a + HDR_AT, 16, False), (a + DATA, 512, True), (a + STATUS_AT, 1, True)]
        elif cls == "console":
            m[PAYLOAD_AT : PAYLOAD_AT + 8] = b"l4vchk\r\n"
            self._bufs = [(a + PAYLOAD_AT, 8, False)]
        elif cls == "net":
            from l4vctl.drivers.net import BROADCAST, DEFAULT_MAC, ETHERTYPE, TX_HEADER, frame

            data = TX_HEADER + frame(BROADCAST, DEFAULT_MAC, ETHERTYPE, b"l4vctl check".ljust(46, b"\0"))
            assert len(data) <= REQ_BYTES - PAYLOAD_AT
            m[PAYLOAD_AT : PAYLOAD_AT + len(data)] = data
            self._bufs = [(a + PAYLOAD_AT, len(data), False)]
        else:
            self._bufs = [(a + DATA, 64, True)]

    def bufs(self) -> list[tuple[int, int, bool]]:
        """The request's buffers: (device address, length, device writes)."""
        return list(self._bufs)

    def judge(self, done: list[tuple[Any, int]]) -> tuple[bool, str]:
        """(ok, text) of a completion: blk by its status byte, the others by being completed."""
        _token, used = done[0]
        if self.cls == "blk":
            status = self.mem[STATUS_AT]
            name = {0: "OK", 1: "IOERR", 2: "UNSUPP"}.get(status, f"{status:#04x}")
            return status == cat.BLK_S_OK, f"completed, blk status {name}, {used} bytes written"
        if self.cls == "rng":
            return used > 0, f"completed, {used} random bytes"
        return True, f"completed ({used} bytes written)"

    def judge_hostile(self, what: str, done: list[tuple[Any, int]]) -> Outcome:
        """The verdict on a malformed request that came back completed."""
        ok, text = self.judge(done)
        if self.cls in ("console", "net"):
            # a transmit request comes back either way; its completion does not show what was sent
            return Outcome(Verdict.PASS, f"{what}: returned to the driver ({text}), the device kept working")
        if ok:
            return Outcome(Verdict.FAIL, f"{what}: accepted and processed ({text})")
        return Outcome(Verdict.REJECT, f"{what}: {text}")


def wait_outcome(s: Session, vq: Virtqueue, timeout: float) -> tuple[str, Any]:
    """Wait for the request: ("completed", [(token, len)]), ("flagged", status) or ("silent", None)."""
    deadline = time.monotonic() + timeout
    while True:
        done = vq.reap()
        if done:
            return "completed", done
        st = s.status
        if st & cat.STATUS_FAIL_MASK:
            return "flagged", st
        left = deadline - time.monotonic()
        if left <= 0:
            return "silent", None
        try:
            s.wait_irq(min(left, 0.05))
        except DeviceStateError:
            return "flagged", s.status


def _patch(vq: Virtqueue, index: int, table: memoryview | None = None, **fields: int) -> None:
    """Rewrite fields of descriptor ``index`` (in the ring's table or in ``table``)."""
    from l4vctl.virtqueue import _DESC

    mem = vq.desc if table is None else table
    addr, length, flags, nxt = _DESC.unpack_from(mem, index * _DESC.size)
    cur = {"addr": addr, "len": length, "flags": flags, "next": nxt}
    cur.update(fields)
    _DESC.pack_into(mem, index * _DESC.size, cur["addr"], cur["len"], cur["flags"], cur["next"])


def _hostile(t: Target, what: str, build: Callable[[Session, Virtqueue, Request], None],
             completed: Callable[[Request, list[Any]], Outcome] | None = None) -> Outcome:  # fmt: skip
    """Post a malformed request made by ``build`` and judge what the device makes of it."""
    with t.open() as s:
        s.handshake()
        req = Request(s, t.device_class)  # type: ignore[arg-type]
        vq = s.virtqueue(DATA_QUEUE[req.cls])
        build(s, vq, req)
        vq.kick()
        try:
            kind, got = wait_outcome(s, vq, t.timeout)
        except ProtocolError as exc:
            return Outcome(Verdict.FAIL, f"{what}: the device completed it wrongly: {exc}")
        except UnavailableError as exc:
            # a back-end may drop the driver's connection to refuse it; the recovery check tells a crash
            return Outcome(Verdict.REJECT, f"{what}: the device ended the connection ({exc})")
        if kind == "flagged":
            return Outcome(Verdict.REJECT, f"{what}: status {got:#04x} ({fail_bits(got)})")
        if kind == "silent":
            return Outcome(Verdict.PASS, f"{what}: not completed, no fail bit within {t.timeout:g} s (dropped)")
        if completed is not None:
            return completed(req, got)
        return req.judge_hostile(what, got)


RING = dict(needs_handshake=True, wire="ring")


@applies(_needs_class)
@case("desc-loop", "§5.5", "a descriptor chain that loops back to its head is a bad descriptor (no endless walk)",
      "REJECT: DEVICE_NEEDS_RESET or an error completion; PASS: dropped; FAIL: processed", **RING)  # fmt: skip
def _desc_loop(t: Target) -> Outcome:
    def build(s: Session, vq: Virtqueue, req: Request) -> None:
        head = vq.add(req.bufs(), 1)
        chain = vq.chains[head]
        assert chain is not None
        _patch(vq, chain[-1], flags=(vq.desc[chain[-1] * 16 + 12] | NEXT), next=head)

    return _hostile(t, "a chain whose last descriptor points at its head", build)


@applies(_needs_class)
@case("head-out-of-range", "§5.5", "an available ring slot naming a head >= num is a bad descriptor",
      "REJECT: DEVICE_NEEDS_RESET or an error completion; PASS: dropped; FAIL: processed or completed",
      **RING)  # fmt: skip
def _head_range(t: Target) -> Outcome:
    def build(s: Session, vq: Virtqueue, req: Request) -> None:
        vq.add(req.bufs(), 1)
        vq._avail_ring[(vq.avail_idx - 1) % vq.num] = vq.num + 1

    return _hostile(t, "head index num+1", build)


@applies(_needs_class)
@case("next-out-of-range", "§5.5", "a NEXT pointing at or beyond the table size is a bad descriptor",
      "REJECT: DEVICE_NEEDS_RESET or an error completion; PASS: dropped; FAIL: processed", **RING)  # fmt: skip
def _next_range(t: Target) -> Outcome:
    def build(s: Session, vq: Virtqueue, req: Request) -> None:
        head = vq.add(req.bufs(), 1)
        chain = vq.chains[head]
        assert chain is not None
        _patch(vq, chain[0], flags=vq.desc[chain[0] * 16 + 12] | NEXT, next=vq.num + 7)

    return _hostile(t, "next = num+7", build)


def _indirect_table(s: Session, vq: Virtqueue, req: Request) -> tuple[memoryview, int]:
    return req.mem[OUTER_AT:INNER_AT], req.addr + OUTER_AT


@applies(_needs_indirect)
@case("indirect-nested", "§5.5", "an INDIRECT descriptor inside an indirect table is never followed",
      "REJECT: DEVICE_NEEDS_RESET or an error completion; PASS: treated as a plain buffer; FAIL: followed",
      **RING)  # fmt: skip
def _indirect_nested(t: Target) -> Outcome:
    def build(s: Session, vq: Virtqueue, req: Request) -> None:
        from l4vctl.virtqueue import _DESC

        outer, outer_addr = _indirect_table(s, vq, req)
        inner, inner_addr = req.mem[INNER_AT:PAYLOAD_AT], req.addr + INNER_AT
        bufs = req.bufs()
        for i, (addr, length, write) in enumerate(bufs):
            flags = (WRITE if write else 0) | (NEXT if i < len(bufs) - 1 else 0)
            _DESC.pack_into(inner, i * 16, addr, length, flags, i + 1 if i < len(bufs) - 1 else 0)
        vq.add_indirect(outer, outer_addr, [(inner_addr, 16 * len(bufs), False)], 1)
        _patch(vq, 0, table=outer, flags=INDIRECT)

    def completed(req: Request, got: list[Any]) -> Outcome:
        if req.cls == "blk":
            ok, text = req.judge(got)
            if ok:
                return Outcome(Verdict.FAIL, f"the nested table was followed ({text})")
            return Outcome(Verdict.REJECT, text)
        return Outcome(Verdict.PASS, "completed: the nested descriptor was taken as a plain buffer (§5.5)")

    return _hostile(t, "an indirect table whose entry is INDIRECT", build, completed)


@applies(_needs_indirect)
@case("indirect-bad-size", "§5.5", "an indirect table with 0 entries (len < 16) is a bad descriptor",
      "REJECT: DEVICE_NEEDS_RESET or an error completion; PASS: dropped; FAIL: processed", **RING)  # fmt: skip
def _indirect_size(t: Target) -> Outcome:
    def build(s: Session, vq: Virtqueue, req: Request) -> None:
        table, table_addr = req.mem[INNER_AT:PAYLOAD_AT], req.addr + INNER_AT  # room for 4 entries
        head = vq.add_indirect(table, table_addr, req.bufs(), 1)
        _patch(vq, head, len=8)

    return _hostile(t, "an indirect descriptor of 8 bytes", build)


# -- 7. destructive: what is known to kill real servers ---------------------------------------------------


@applies(_needs_class)
@case("buffer-outside-memory", "§5.5", "a buffer outside registered memory is a bad descriptor",
      "REJECT: DEVICE_NEEDS_RESET or an error completion; PASS: dropped; FAIL: processed or the device died",
      destructive=True, **RING)  # fmt: skip
def _buffer_outside(t: Target) -> Outcome:
    def build(s: Session, vq: Virtqueue, req: Request) -> None:
        head = vq.add(req.bufs(), 1)
        chain = vq.chains[head]
        assert chain is not None
        target = chain[1] if req.cls == "blk" else chain[0]
        _patch(vq, target, addr=OUTSIDE)

    return _hostile(t, f"a buffer at {OUTSIDE:#x}", build)


def _needs_console(t: Target) -> str | None:
    if t.device_class != "console":
        return "not applicable: only for consoles"
    return None


#: Receive buffers a starved console gets, and the bytes sent through it.
STARVED_RX, BURST = 2, 32


@applies(_needs_console)
@case("console-rx-starvation", "§5.5", "a console with fewer receive buffers than input bytes waits for buffers",
      "PASS: the device survives (echoed bytes arrive once buffers are posted); FAIL: it died",
      destructive=True, **RING)  # fmt: skip
def _rx_starvation(t: Target) -> Outcome:
    from l4vctl.drivers.console import ConsoleDriver

    with t.open() as s:
        s.handshake()
        drv = ConsoleDriver(s, buffers=4, size=256, rx_buffers=STARVED_RX, rx_size=1)
        drv.send(b"x" * BURST)  # an echoing console sends them back; others get input from outside
        window = min(t.timeout, 3.0)
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:  # starved: nothing is given back meanwhile
            s.check_device()
            s.wait_irq(min(0.1, max(0.0, deadline - time.monotonic())))
        got = bytearray(drv.poll())
        deadline = time.monotonic() + window
        while time.monotonic() < deadline and len(got) < BURST:
            got += drv.receive(min(0.2, max(0.0, deadline - time.monotonic())))
        s.check_device()
        return Outcome(Verdict.PASS, f"survived {window:g} s with {STARVED_RX} one-byte buffers; {len(got)} bytes "
                                     f"received afterwards")  # fmt: skip


@applies(_needs_class)
@case("driver-vanishes", "§5.1, §5.5", "a driver that disconnects mid-request leaves a device the next driver can use",
      "PASS: a fresh driver completes a good request", destructive=True, **RING)  # fmt: skip
def _driver_vanishes(t: Target) -> Outcome:
    s = t.session()
    try:
        s.handshake()
        post_good(s, t.device_class)  # type: ignore[arg-type]
    finally:
        close_session(s, reset=False)  # gone, without a reset
    with t.open() as s2:
        s2.handshake()
        req, kind, got = run_good(s2, t.device_class, t.timeout)  # type: ignore[arg-type]
        if kind == "completed":
            ok, text = req.judge(got)
            return Outcome(Verdict.PASS if ok else Verdict.FAIL, f"the next driver's request: {text}")
        if kind == "flagged":
            return Outcome(Verdict.FAIL, f"the next driver's good request was flagged: status {got:#04x}")
        return Outcome(Verdict.WEDGED, f"the next driver's request did not complete within {t.timeout:g} s")
