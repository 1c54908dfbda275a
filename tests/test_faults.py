"""The emulator's injected faults: each one, seen by a real driver as the real thing.

Every test runs a real ``l4vctl emulate`` process (or an ``emu:`` device) and
drives it with a Session and l4vctl's drivers; what the driver sees (a wait
that times out, an interrupt that never comes, a kick it is told to skip) and
what the device's monitor counters say are both checked.
"""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4vctl import catalog as cat
from l4vctl.catalog import Role
from l4vctl.drivers.blk import BlkDriver
from l4vctl.emulator.models.base import FAULTS, parse_faults
from l4vctl.errors import DeviceStateError, TimeoutExpired
from l4vctl.session import Session
from l4vctl.virtqueue import sleep_on
from tests.emu import emulator, wait_for

SHORT = 0.4


@contextlib.contextmanager
def driven(tmp_path, *inject: str, kind: str = "blk", extra: tuple[str, ...] = ()):
    """An emulator process with faults, a driver Session through the handshake, and a monitor Session."""
    args = [a for f in inject for a in ("--inject", f)] + list(extra)
    with emulator(tmp_path, kind, *args) as (url, _proc):
        with Session(url, timeout=5) as s:
            s.handshake()
            with Session(url, role=Role.MONITOR) as mon:
                yield url, s, mon


def submit(d: BlkDriver, count: int) -> list:
    """``count`` one-sector reads, published with one kick after the device stopped polling."""
    time.sleep(0.05)  # the device's poll after the handshake's last request has ended
    slots = []
    for i in range(count):
        slot = d.free.pop()
        d.submit(slot, cat.BLK_T_IN, i, 512)
        slots.append(slot)
    d.kick()
    return slots


def q0(mon: Session) -> dict:
    return mon.stats()["queues"][0]


# -- parsing -----------------------------------------------------------------------------------


def test_every_fault_is_documented_in_emulate_help(cli):
    r = cli("emulate", "--help")
    assert r.code == 0
    for name in FAULTS:
        assert name in r.stdout, name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stop-completing", {"stop-completing": 0}),
        ("stop-completing=5,drop-irqs", {"stop-completing": 5, "drop-irqs": 0}),
        ("drop-irqs=0x2", {"drop-irqs": 2}),
        ("needs-reset-at=3,ignore-kicks", {"needs-reset-at": 3, "ignore-kicks": True}),
        ("suppress-kicks,clear-features-ok", {"suppress-kicks": True, "clear-features-ok": True}),
    ],
)
def test_parse_faults(text, expected):
    assert parse_faults(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("needs-reset-at", "needs a request number"),
        ("needs-reset-at=0", "must be at least 1"),
        ("stop-completing=-1", "must be at least 0"),
        ("drop-irqs=many", "not a number"),
        ("ignore-kicks=1", "takes no value"),
        ("stall-forever", "unknown fault"),
    ],
)
def test_bad_faults_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_faults(text)


def test_bad_fault_on_the_command_line_is_a_usage_error(cli):
    r = cli("emulate", "blk", "--socket", "/nonexistent/x.sock", "--inject", "needs-reset-at=0")
    assert r.code == 2
    assert "needs-reset-at=0: must be at least 1" in r.stderr
    assert "Traceback" not in r.stderr


# -- each fault, as a driver sees it ----------------------------------------------------------------


def test_stop_completing_after_n(tmp_path):
    with driven(tmp_path, "stop-completing=2") as (_url, s, mon):
        d = BlkDriver(s, depth=8, timeout=SHORT)
        submit(d, 4)
        done = d.wait()
        while len(done) < 2:
            done += d.wait()
        assert len(done) == 2 and all(slot.status == cat.BLK_S_OK for slot in done)
        with pytest.raises(TimeoutExpired, match="2 requests in flight"):
            d.wait()
        q = q0(mon)
        assert (q["next_avail"], q["used_idx"], q["completed"]) == (4, 2, 2)  # taken, never completed


def test_stop_completing_alone_completes_nothing(tmp_path):
    with driven(tmp_path, "stop-completing") as (_url, s, mon):
        d = BlkDriver(s, depth=8, timeout=SHORT)
        submit(d, 3)
        with pytest.raises(TimeoutExpired):
            d.wait()
        assert wait_for(lambda: q0(mon)["next_avail"] == 3)
        assert q0(mon)["used_idx"] == 0


def test_a_healthy_device_completes_what_stop_completing_holds(tmp_path):
    with driven(tmp_path) as (_url, s, mon):
        d = BlkDriver(s, depth=8, timeout=5)
        submit(d, 4)
        done = []
        while len(done) < 4:
            done += d.wait()
        assert q0(mon)["used_idx"] == 4


def test_ignore_kicks_leaves_requests_untaken(tmp_path):
    with driven(tmp_path, "ignore-kicks") as (_url, s, mon):
        d = BlkDriver(s, depth=8, timeout=SHORT)
        submit(d, 4)
        assert d.vq.kicks == 1  # the driver did kick (the device asks for kicks)
        with pytest.raises(TimeoutExpired):
            d.wait()
        st = mon.stats()
        assert st["kicks"] >= 1  # the kick arrived ...
        assert st["queues"][0]["next_avail"] == 0  # ... and nothing was taken
        assert st["queues"][0]["avail_idx"] == 4


def test_drop_irqs_completes_without_an_interrupt(tmp_path):
    with driven(tmp_path, "drop-irqs") as (_url, s, mon):
        d = BlkDriver(s, depth=8, timeout=SHORT)
        submit(d, 2)
        used = d.vq.views.used_idx
        assert wait_for(lambda: used[0] == 2)  # the completions are in the used ring
        assert not sleep_on(s.driver_irq, None, SHORT)  # but no interrupt comes
        q = q0(mon)
        assert (q["completed"], q["notified"], q["signalled_idx"]) == (2, 0, 0)
        assert mon.stats()["irqs_sent"] == 0


def test_without_drop_irqs_the_same_wait_is_interrupted(tmp_path):
    with driven(tmp_path) as (_url, s, _mon):
        d = BlkDriver(s, depth=8, timeout=SHORT)
        submit(d, 2)
        used = d.vq.views.used_idx
        assert wait_for(lambda: used[0] == 2)
        assert sleep_on(s.driver_irq, None, 2)


def test_drop_irqs_after_n_interrupts(tmp_path):
    with driven(tmp_path, "drop-irqs=1") as (_url, s, mon):
        d = BlkDriver(s, depth=8, timeout=SHORT)
        used = d.vq.views.used_idx
        submit(d, 1)
        assert wait_for(lambda: used[0] == 1)
        assert sleep_on(s.driver_irq, None, 2)  # the first interrupt is sent
        d.vq.reap()
        submit(d, 1)
        assert wait_for(lambda: used[0] == 2)
        assert not sleep_on(s.driver_irq, None, SHORT)  # the second is not
        q = q0(mon)
        assert (q["notified"], q["signalled_idx"], q["used_idx"]) == (1, 1, 2)


def test_suppress_kicks_tells_the_driver_not_to_kick(tmp_path):
    with driven(tmp_path, "suppress-kicks") as (_url, s, mon):
        d = BlkDriver(s, depth=8, timeout=SHORT)
        assert d.vq.views.used_flags[0] & cat.VRING_USED_F_NO_NOTIFY
        submit(d, 3)
        assert d.vq.kicks == 0  # the driver obeyed
        with pytest.raises(TimeoutExpired):
            d.wait()
        q = q0(mon)
        assert (q["avail_idx"], q["next_avail"], q["used_idx"]) == (3, 0, 0)
        assert mon.stats()["polling"] == 0
        d.vq.kick_irq.trigger()  # a driver that kicks anyway is served
        done = []
        while len(done) < 3:
            done += d.wait(5)
        assert q0(mon)["used_idx"] == 3


def test_suppress_kicks_with_event_idx_moves_avail_event_out_of_reach(tmp_path):
    with driven(tmp_path, "suppress-kicks", extra=("--feature", "event_idx")) as (_url, s, mon):
        assert cat.EVENT_IDX_BIT in s.negotiated
        d = BlkDriver(s, depth=8, timeout=SHORT)
        submit(d, 2)
        assert d.vq.kicks == 0
        q = q0(mon)
        assert q["used_flags"] == 0  # EVENT_IDX: the wish is in avail_event, not in the flags
        assert (q["avail_event"] - q["next_avail"]) & 0xFFFF > 0x7000
        with pytest.raises(TimeoutExpired):
            d.wait()


def test_needs_reset_at_the_nth_request_with_a_reason(tmp_path):
    with driven(tmp_path, "needs-reset-at=3") as (_url, s, mon):
        d = BlkDriver(s, depth=8, timeout=2)
        submit(d, 4)
        with pytest.raises(DeviceStateError, match="DEVICE_NEEDS_RESET"):
            while True:
                d.wait()
        st = mon.stats()
        assert st["status"] & cat.STATUS_DEVICE_NEEDS_RESET
        assert st["device_errors"] == 1
        assert "needs-reset-at" in st["reason"] and "avail slot 2" in st["reason"]


def test_needs_reset_at_counts_again_after_a_reset(tmp_path):
    with driven(tmp_path, "needs-reset-at=2") as (_url, s, mon):
        d = BlkDriver(s, depth=8, timeout=2)
        d.read(0, 512)  # the first request is served
        with pytest.raises(DeviceStateError):
            d.read(0, 512)
        s.handshake()  # a reset starts the count again
        assert mon.stats()["reason"] == ""
        d = BlkDriver(s, depth=8, timeout=2)
        d.read(0, 512)


def test_clear_features_ok(tmp_path):
    with driven(tmp_path, "clear-features-ok") as (_url, s, mon):
        assert s.status & cat.STATUS_DRIVER_OK
        assert not s.status & cat.STATUS_FEATURES_OK
        assert mon.stats()["status"] == s.status


def test_refused_features_are_counted(tmp_path):
    with emulator(tmp_path, "blk", "--inject", "refuse-features-ok") as (url, _proc):
        with Session(url, timeout=5) as s, Session(url, role=Role.MONITOR) as mon:
            with pytest.raises(Exception, match="refused FEATURES_OK"):
                s.handshake()
            assert mon.stats()["features_refused"] == 1


def test_faults_through_an_emu_url():
    with Session("emu:blk?inject=stop-completing=1,drop-irqs", timeout=5) as s:
        s.handshake()
        d = BlkDriver(s, depth=4, timeout=SHORT)
        submit(d, 2)
        used = d.vq.views.used_idx
        assert wait_for(lambda: used[0] == 1)
        assert not sleep_on(s.driver_irq, None, SHORT)
        time.sleep(0.1)
        assert used[0] == 1


# -- STATS version 2 and version 1 readers ------------------------------------------------------


def test_stats_v2_words_keep_the_v1_layout(tmp_path):
    """A version 1 reader (word 0 is 1, nine words per queue after nine global words) still reads the reply."""
    from l4vctl._session.stats import parse_stats
    from l4vctl.emulator.device import Device
    from l4vctl.emulator.models import parse_options
    from l4vctl.emulator.models.blk import BlkModel

    dev = Device(BlkModel(parse_options("blk", {"queues": "1"})))
    try:
        dev.last_error = "a reason ✓"
        words = dev.stats()
        assert words[0] == 1
        ng, nq = len(cat.STATS_GLOBAL), len(cat.STATS_QUEUE)
        v1 = words[: ng + nq * words[ng - 1]]
        old = parse_stats(v1)  # what a device of version 1 sends
        assert old["stats_version"] == 1 and "reason" not in old and "irq_bound" not in old
        assert "used_event" not in old["queues"][0]
        new = parse_stats(words)
        assert new["stats_version"] == 2
        assert new["reason"] == "a reason ✓"
        assert {k: new[k] for k in cat.STATS_GLOBAL if k != "stats_version"} == {
            k: old[k] for k in cat.STATS_GLOBAL if k != "stats_version"
        }
        assert set(cat.STATS_QUEUE_V2) <= set(new["queues"][0])
    finally:
        dev.close()


def test_stats_v2_truncated_is_a_protocol_error():
    from l4vctl._session.stats import parse_stats
    from l4vctl.errors import ProtocolError

    words = [1, 0, 0, 1, 0, 0, 0, 0, 1] + [0] * 9 + [2, 1, 0]
    with pytest.raises(ProtocolError, match="truncated"):
        parse_stats(words)
    no_queues = [1, 0, 0, 1, 0, 0, 0, 0, 0]
    bad_reason = [*no_queues, 2, 1, 0, 0, 400]  # a reason longer than STATS_REASON_MAX
    with pytest.raises(ProtocolError, match="reason"):
        parse_stats(bad_reason)


# -- property tests of the parsers ------------------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=(1 << 64) - 1), max_size=80))
def test_parse_stats_takes_any_words(words):
    from l4vctl._session.stats import parse_stats
    from l4vctl.errors import ProtocolError

    try:
        out = parse_stats(words)
    except ProtocolError:
        return
    assert out["stats_version"] in (1, 2)
    assert len(out["queues"]) == out["num_queues"]
    if out["stats_version"] == 2:
        assert isinstance(out["reason"], str) and len(out["reason"]) <= cat.STATS_REASON_MAX


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-=,0123456789xX ", max_size=60))
def test_parse_faults_takes_any_text(text):
    try:
        out = parse_faults(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert set(out) <= set(FAULTS)
