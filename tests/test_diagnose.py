"""``l4vctl diagnose``: every finding, produced by a real fault in a real emulator process or by a
real driver bug made on purpose, while the driver holds its session.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4vctl import catalog as cat
from l4vctl import diagnosis as dg
from l4vctl.catalog import Role
from l4vctl.drivers.blk import BlkDriver
from l4vctl.errors import NegotiationError, TimeoutExpired
from l4vctl.session import Session
from tests.emu import emulator, wait_for

INTERVAL = "0.3"


@contextlib.contextmanager
def driven(tmp_path, *inject: str, kind: str = "blk", extra: tuple[str, ...] = (), handshake: bool = True,
           timeout: float = 5):  # fmt: skip
    """An emulator process with faults and a driver Session (through the handshake unless told not to)."""
    args = [a for f in inject for a in ("--inject", f)] + list(extra)
    with emulator(tmp_path, kind, *args) as (url, _proc):
        with Session(url, timeout=timeout) as s:
            if handshake:
                s.handshake()
            yield url, s


def submit(d: BlkDriver, count: int) -> None:
    time.sleep(0.05)  # the device's poll after the handshake's last request has ended
    for i in range(count):
        d.submit(d.free.pop(), cat.BLK_T_IN, i, 512)
    d.kick()


def diagnose(cli, url: str, *more: str):
    r = cli("diagnose", url, "--interval", INTERVAL, "--json", *more)
    assert "Traceback" not in r.stderr
    env = r.json()
    assert env["ok"] is True and env["command"] == "diagnose"
    return r.code, env["result"]


def kinds(result: dict) -> list[tuple[str, int | None]]:
    return [(f["kind"], f["queue"]) for f in result["findings"]]


def one(result: dict, kind: str) -> dict:
    found = [f for f in result["findings"] if f["kind"] == kind]
    assert len(found) == 1, result["findings"]
    return found[0]


def problem_kinds(result: dict) -> set[str]:
    return {f["kind"] for f in result["findings"] if f["severity"] != "ok"}


# -- healthy ------------------------------------------------------------------------------------------


def test_an_emulated_device_nobody_drives_is_idle(cli):
    r = cli("diagnose", "emu:blk", "--interval", "0.05")
    assert r.code == 0, r.stderr
    assert "device: idle" in r.stdout and "no driver has started the device" in r.stdout
    assert "healthy" in r.stdout.splitlines()[0]


def test_a_driver_at_rest_is_idle(tmp_path, cli):
    with driven(tmp_path) as (url, s):
        d = BlkDriver(s, depth=8, timeout=5)
        d.read(0, 4096)
        code, res = diagnose(cli, url)
        assert code == 0
        assert res["healthy"] and res["looks"] == 2 and res["interval"] == float(INTERVAL)
        assert res["device_class"] == "blk" and res["status"] == cat.STATUS_RUNNING
        assert res["status_flags"] == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"]
        assert kinds(res) == [("idle", None), ("idle", 0)]
        ev = res["findings"][1]["evidence"]
        assert ev["avail_idx"] == ev["used_idx"] and ev["avail_idx"][0] == ev["avail_idx"][1] > 0


def test_a_busy_driver_is_working(tmp_path, cli):
    with driven(tmp_path) as (url, s):
        d = BlkDriver(s, depth=8, timeout=5)
        stop = threading.Event()
        errors: list[BaseException] = []

        def load():
            try:
                while not stop.is_set():
                    d.read(0, 64 * 1024)
            except BaseException as exc:  # reported below
                errors.append(exc)

        t = threading.Thread(target=load)
        t.start()
        try:
            code, res = diagnose(cli, url)
        finally:
            stop.set()
            t.join(10)
        assert not errors
        assert code == 0, res["findings"]
        q = next(f for f in res["findings"] if f["queue"] == 0)
        assert q["kind"] == "working" and q["severity"] == "ok"
        assert q["evidence"]["used_idx"][1] != q["evidence"]["used_idx"][0]
        assert res["findings"][0]["kind"] == "working"


def test_a_console_with_receive_buffers_posted_is_healthy(tmp_path, cli):
    from l4vctl.drivers.console import ConsoleDriver

    with driven(tmp_path, kind="console", extra=("--io", "null")) as (url, s):
        ConsoleDriver(s, rx_buffers=8)
        code, res = diagnose(cli, url)
        assert code == 0, res["findings"]
        rx = next(f for f in res["findings"] if f["queue"] == 0)
        assert rx["kind"] == "idle" and "8 buffers posted" in rx["message"]


# -- one test per finding -------------------------------------------------------------------------


def test_device_stalled_taken_not_completed(tmp_path, cli):
    with driven(tmp_path, "stop-completing=2") as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        submit(d, 6)
        with contextlib.suppress(TimeoutExpired):
            while True:
                d.wait()
        code, res = diagnose(cli, url)
        assert code == 6 and not res["healthy"]
        f = one(res, "device-stalled")
        assert f["queue"] == 0 and f["severity"] == "error"
        assert "4 requests taken (last_avail_idx 6) and not completed" in f["message"]
        assert f["evidence"]["avail_idx"] == [6, 6] and f["evidence"]["used_idx"] == [2, 2]
        assert f["evidence"]["in_flight"] == 4 and f["evidence"]["pending"] == 0
        r = cli("diagnose", url, "--interval", INTERVAL)
        assert r.code == 6
        line = next(x for x in r.stdout.splitlines() if "device-stalled" in x)
        assert line.startswith("! queue 0: device-stalled — avail.idx 6 → 6, used.idx 2 → 2, 4 requests taken")


def test_device_stalled_not_taken(tmp_path, cli):
    with driven(tmp_path, "ignore-kicks") as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        submit(d, 3)
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "device-stalled")
        assert "3 requests offered and not taken by the device (last_avail_idx 0" in f["message"]
        assert f["evidence"]["pending"] == 3 and f["evidence"]["in_flight"] == 0
        assert f["evidence"]["kicks"][1] >= 1
        assert "kick-suppressed" not in problem_kinds(res)  # the device asks for kicks


def test_device_stalled_a_kick_the_driver_left_out(tmp_path, cli):
    """A driver bug: requests published without the kick the device asked for."""
    with driven(tmp_path) as (url, s):
        vq = s.virtqueue(0)
        _mem, addr = s.alloc(4096)
        time.sleep(0.05)
        vq.add([(addr, 16, False), (addr + 512, 512, True), (addr + 16, 1, True)], 0)
        vq.views.avail_idx[0] = vq.avail_idx  # published, never kicked
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "device-stalled")
        assert "1 requests offered and not taken" in f["message"]
        assert "never kicked" in f["message"] and f["evidence"]["kicks"] == [0, 0]
        assert f["evidence"]["used_flags"] == [0, 0]  # the device did ask for kicks


def test_kick_suppressed(tmp_path, cli):
    with driven(tmp_path, "suppress-kicks") as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        submit(d, 2)
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "kick-suppressed")
        assert f["queue"] == 0
        assert "2 requests wait" in f["message"] and "NO_NOTIFY" in f["message"]
        assert f["evidence"]["used_flags"] == [1, 1] and f["evidence"]["polling"] == 0
        assert "device-stalled" not in problem_kinds(res)


def test_kick_suppressed_by_avail_event(tmp_path, cli):
    with driven(tmp_path, "suppress-kicks", extra=("--feature", "event_idx")) as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        submit(d, 2)
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "kick-suppressed")
        assert "avail_event" in f["message"] and f["evidence"]["used_flags"] == [0, 0]


def test_completion_unsignalled_by_the_device(tmp_path, cli):
    with driven(tmp_path, "drop-irqs") as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        submit(d, 3)
        assert wait_for(lambda: d.vq.views.used_idx[0] == 3)
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "completion-unsignalled")
        assert f["severity"] == "error" and "the device did not interrupt" in f["message"]
        assert f["evidence"]["signalled_idx"] == 0 and f["evidence"]["notified"] == [0, 0]


def test_completion_unsignalled_driver_set_no_interrupt(tmp_path, cli):
    """A driver bug: NO_INTERRUPT set, then it waits for an interrupt that it told the device not to send."""
    with driven(tmp_path) as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        d.vq.interrupts(False)
        submit(d, 2)
        assert wait_for(lambda: d.vq.views.used_idx[0] == 2)
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "completion-unsignalled")
        assert f["severity"] == "warning" and "NO_INTERRUPT" in f["message"]
        assert f["evidence"]["avail_flags"] == cat.VRING_AVAIL_F_NO_INTERRUPT


def test_completion_unsignalled_used_event_behind(tmp_path, cli):
    """A driver bug with EVENT_IDX: used_event set back behind completions the device already signalled."""
    with driven(tmp_path, extra=("--feature", "event_idx")) as (url, s):
        assert cat.EVENT_IDX_BIT in s.negotiated
        d = BlkDriver(s, depth=8, timeout=0.3)
        vq = d.vq
        submit(d, 2)
        assert wait_for(lambda: vq.views.used_idx[0] == 2)
        vq.views.used_event[0] = 1  # stale: the driver "forgot" it saw 2 already
        submit(d, 2)
        assert wait_for(lambda: vq.views.used_idx[0] == 4)
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "completion-unsignalled")
        assert f["severity"] == "error" and "used_event 1 is behind used.idx 4" in f["message"]


def test_completion_unsignalled_no_irq_bound(tmp_path, cli, monkeypatch):
    """A driver bug: it takes the device IRQ but never binds its own (no ICU bind)."""
    from l4vctl._session.attachment import Attachment

    def attach_without_bind(self, index):
        r = self.call(cat.L4VIRTIO_PROTOCOL, cat.OP_GET_DEVICE_IRQ, [index])
        try:
            self.device_irq = self._adopt_irq(r, 0, "device IRQ")
        finally:
            r.close()
        self.driver_irq, _cap, _fds = self._new_irq()  # made, never sent to the device

    monkeypatch.setattr(Attachment, "_attach_irqs", attach_without_bind)
    with driven(tmp_path) as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        submit(d, 2)
        assert wait_for(lambda: d.vq.views.used_idx[0] == 2)
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "completion-unsignalled")
        assert f["severity"] == "error" and "no driver IRQ is bound" in f["message"]
        assert f["evidence"]["irq_bound"] == 0


def test_driver_starved_console_without_receive_buffers(tmp_path, cli):
    with driven(tmp_path, kind="console", extra=("--io", "null")) as (url, _s):
        code, res = diagnose(cli, url)  # queues set up, no receive buffer posted
        assert code == 6
        f = one(res, "driver-starved")
        assert f["queue"] == 0 and f["severity"] == "warning"
        assert [f["queue"] for f in res["findings"] if f["kind"] == "idle"] == [1]  # the transmit queue


def test_driver_starved_net_until_the_driver_posts_receive_buffers(tmp_path, cli):
    from l4vctl.drivers.net import NetDriver

    with driven(tmp_path, kind="net") as (url, s):
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "driver-starved")
        assert f["queue"] == 0 and "no buffers posted" in f["message"]
        NetDriver(s, buffers=16)  # posts its receive buffers
        code, res = diagnose(cli, url)
        assert code == 0, res["findings"]
        assert kinds(res) == [("idle", None), ("idle", 0), ("idle", 1)]
        assert "16 buffers posted" in res["findings"][1]["message"]


def test_cmd_stuck(tmp_path, cli):
    with driven(tmp_path, "never-clear-cmd", extra=("--cmd-mode",), handshake=False, timeout=0.3) as (url, s):
        with pytest.raises(TimeoutExpired):
            s.handshake()
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "cmd-stuck")
        assert f["queue"] is None and f["evidence"]["command"] == "SET_STATUS"
        assert f["evidence"]["cmd"][0] == f["evidence"]["cmd"][1] != 0


def test_device_needs_reset_with_its_reason(tmp_path, cli):
    with driven(tmp_path, "needs-reset-at=2") as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        submit(d, 3)
        assert wait_for(lambda: s.status & cat.STATUS_DEVICE_NEEDS_RESET)
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "device-needs-reset")
        assert "needs-reset-at" in f["evidence"]["reason"] and "avail slot 1" in f["message"]


def test_device_failed(tmp_path, cli):
    with driven(tmp_path) as (url, s):
        s.write_status(s.status | cat.STATUS_FAILED)  # the driver gives up
        code, res = diagnose(cli, url)
        assert code == 6
        assert one(res, "device-failed")["evidence"]["status"] & cat.STATUS_FAILED


def test_features_not_accepted_refused(tmp_path, cli):
    with driven(tmp_path, "refuse-features-ok", handshake=False) as (url, s):
        s.reset()
        s.write_status(cat.STATUS_ACKNOWLEDGE)
        s.write_status(cat.STATUS_ACKNOWLEDGE | cat.STATUS_DRIVER)
        with pytest.raises(NegotiationError):
            s.negotiate(None, (), (), s.get("device"))
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "features-not-accepted")
        assert f["severity"] == "error" and f["evidence"]["features_refused"] == 1
        assert "VIRTIO_F_VERSION_1" in f["evidence"]["accepted_names"]


def test_features_not_accepted_cleared(tmp_path, cli):
    with driven(tmp_path, "clear-features-ok") as (url, _s):
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "features-not-accepted")
        assert "cleared FEATURES_OK" in f["message"]


def test_index_corruption_avail_far_ahead(tmp_path, cli):
    with driven(tmp_path) as (url, s):
        vq = s.virtqueue(0)
        vq.views.avail_idx[0] = 1000  # a driver bug: avail.idx far beyond the 256 entries, no kick
        code, res = diagnose(cli, url)
        assert code == 6
        f = one(res, "index-corruption")
        assert "avail.idx 1000 is 1000 ahead of used.idx 0, more than the queue size 256" in f["message"]


def test_index_corruption_used_ahead_of_avail(tmp_path, cli):
    with driven(tmp_path) as (url, s):
        vq = s.virtqueue(0)
        vq.views.used_idx[0] = 5  # scribbled over the device's index
        code, res = diagnose(cli, url)
        assert code == 6
        assert "used.idx 5 is 5 ahead of avail.idx 0" in one(res, "index-corruption")["message"]


def test_index_corruption_kills_the_device_and_is_still_seen(tmp_path, cli):
    with driven(tmp_path) as (url, s):
        vq = s.virtqueue(0)
        vq.views.avail_idx[0] = 1000
        vq.kick_irq.trigger()
        assert wait_for(lambda: s.status & cat.STATUS_DEVICE_NEEDS_RESET)
        code, res = diagnose(cli, url)
        assert code == 6
        assert {"device-needs-reset", "index-corruption"} <= problem_kinds(res)
        assert "ahead of the device" in one(res, "device-needs-reset")["evidence"]["reason"]


# -- where diagnose looks from -----------------------------------------------------------------------


def test_diagnose_takes_no_driver_slot(tmp_path, cli):
    with driven(tmp_path) as (url, s):
        d = BlkDriver(s, depth=8, timeout=5)
        code, _res = diagnose(cli, url)
        assert code == 0
        d.read(0, 512)  # the driver goes on as before
        with Session(url, role=Role.MONITOR) as mon:
            assert mon.stats()["driver_attached"] == 1


def test_a_saved_page_gives_page_findings_and_says_what_it_cannot_see(tmp_path, cli):
    page = tmp_path / "page.hex"
    with driven(tmp_path, "needs-reset-at=1") as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        submit(d, 1)
        assert wait_for(lambda: s.status & cat.STATUS_DEVICE_NEEDS_RESET)
        r = cli("dump-config", url, "--hex", "-o", str(page))
        assert r.code == 0, r.stderr
    code, res = diagnose(cli, f"dump:{page}")
    assert code == 6
    assert res["looks"] == 1 and res["interval"] is None
    f = one(res, "device-needs-reset")
    assert f["evidence"]["reason"] is None
    assert any("one look" in n for n in res["notes"])
    assert any("ring indices not visible" in n for n in res["notes"])


def test_a_saved_archive_with_memory_offline(tmp_path, cli):
    archive = tmp_path / "state.l4vm"
    with driven(tmp_path, "stop-completing=1") as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        submit(d, 3)
        assert wait_for(lambda: d.vq.views.used_idx[0] == 1)
        r = cli("dump-config", url, "--with-memory", "-o", str(archive))
        assert r.code == 0, r.stderr
    code, res = diagnose(cli, f"dump:{archive}")  # the emulator is gone
    assert res["looks"] == 1
    q = next(f for f in res["findings"] if f["queue"] == 0)
    assert q["kind"] == "working" and "2 requests outstanding at the capture" in q["message"]
    assert q["evidence"]["avail_idx"] == 3 and q["evidence"]["used_idx"] == 1
    assert code == 0  # one look cannot tell a stall
    assert any("device-stalled" in n for n in res["notes"])


def test_vhost_user_gives_page_findings_and_says_what_it_cannot_see(tmp_path, cli):
    from tests.test_vhost_user import QSD, StorageDaemon

    if not QSD and os.environ.get("CI") != "true":
        pytest.skip("qemu-storage-daemon is not installed (Debian package qemu-system-common)")
    qsd = StorageDaemon(tmp_path)
    try:
        code, res = diagnose(cli, qsd.url)
    finally:
        qsd.stop()
    assert code == 0
    assert kinds(res) == [("idle", None)]
    assert any("monitor STATS" in n for n in res["notes"])
    assert any(n.startswith("ring memory: vhost-user") for n in res["notes"])


def test_a_saved_archive_keeps_the_reason_and_the_rings_of_a_dead_queue(tmp_path, cli):
    archive = tmp_path / "dead.l4vm"
    with driven(tmp_path) as (url, s):
        vq = s.virtqueue(0)
        vq.views.avail_idx[0] = 1000
        vq.kick_irq.trigger()
        assert wait_for(lambda: s.status & cat.STATUS_DEVICE_NEEDS_RESET)
        r = cli("dump-config", url, "--with-memory", "-o", str(archive))
        assert r.code == 0, r.stderr
    code, res = diagnose(cli, f"dump:{archive}")
    assert code == 6 and res["looks"] == 1
    assert "ahead of the device" in one(res, "device-needs-reset")["evidence"]["reason"]
    assert "avail.idx 1000 is 1000 ahead of used.idx 0" in one(res, "index-corruption")["message"]


def test_a_queue_the_device_rejected_is_named(tmp_path, cli):
    """A driver bug: queue 0 configured with rings outside its registered memory, DRIVER_OK anyway."""
    from tests.emu import config_queue, write_queue

    with driven(tmp_path, extra=("--queues", "2")) as (url, s):
        write_queue(s, 1, num=8, desc_addr=0x7F000000, avail_addr=0x7F001000, used_addr=0x7F002000, ready=1)
        assert config_queue(s, 1) == -cat.L4_EINVAL
        code, res = diagnose(cli, url)
        assert code == 0
        assert "queue 1: its rings lie outside the memory the driver registered" in res["notes"]
        assert any(n.startswith("queue 1: ready in the page, but the device did not enable it") for n in res["notes"])


def test_text_output_names_each_finding_on_one_line(tmp_path, cli):
    with driven(tmp_path, "drop-irqs") as (url, s):
        d = BlkDriver(s, depth=8, timeout=0.3)
        submit(d, 1)
        assert wait_for(lambda: d.vq.views.used_idx[0] == 1)
        r = cli("diagnose", url, "--interval", INTERVAL)
        assert r.code == 6
        lines = r.stdout.splitlines()
        assert lines[0].endswith("PROBLEM") and "2 looks 0.3 s apart" in lines[0]
        assert any(x.startswith("! queue 0: completion-unsignalled — 1 completions (used.idx 1 → 1)") for x in lines)
        assert r.stderr == ""


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--interval", "0"], 2, "--interval"),
        (["--interval", "soon"], 2, "--interval"),
        (["unix:/nonexistent/dev.sock", "--timeout", "0.5"], 3, "nonexistent"),
        (["dump:/nonexistent/page.bin"], 3, "nonexistent"),
    ],
)
def test_bad_input(cli, tmp_path, args, code, text):
    r = cli("diagnose", *args)
    assert r.code == code, (r.stdout, r.stderr)
    assert text in r.stderr and "Traceback" not in r.stderr


def test_a_device_that_dies_while_diagnose_looks(tmp_path):
    """Killed during the interval (or, on a slow machine, before the first look): exit 3, one line."""
    import subprocess
    import sys

    with emulator(tmp_path, "blk") as (url, proc):
        p = subprocess.Popen([sys.executable, "-m", "l4vctl", "diagnose", url, "--interval", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            time.sleep(1.0)
            proc.kill()
            out, err = p.communicate(timeout=20)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert p.returncode == 3, (out, err)
    assert err.startswith("l4vctl: error:") and "Traceback" not in err and out == ""


def test_bad_input_json_envelope(cli):
    r = cli("diagnose", "unix:/nonexistent/dev.sock", "--json", "--timeout", "0.5")
    assert r.code == 3
    env = r.json()
    assert env["ok"] is False and env["error"]["exit_code"] == 3


# -- the analysis alone --------------------------------------------------------------------------------


def test_help_lists_every_kind(cli):
    from l4vctl.commands.diagnose import _KINDS

    assert [k for k, _ in _KINDS] == list(dg.KINDS)
    r = cli("diagnose", "--help")
    for kind in dg.KINDS:
        assert kind in r.stdout


def _state(avail, used, *, num=8, status=cat.STATUS_RUNNING, cmd=0, device=None, qdev=None):
    ring = {"avail_flags": 0, "avail_idx": avail, "used_flags": 0, "used_idx": used, "used_event": 0,
            "avail_event": 0}  # fmt: skip
    q = dg.QueueLook(0, num, True, ring, qdev)
    return dg.State(status, cmd, "blk", {32}, {32}, [q], device)


def test_index_wraparound_is_not_corruption():
    a = _state(0xFFFE, 0xFFFC)
    b = _state(0x0003, 0x0001)
    found = dg.diagnose(a, b, 0.5)
    assert [f["kind"] for f in found] == ["working", "working"]
    assert found[1]["message"].startswith("queue 0: working — 5 offered, 5 completed")


def test_a_busy_queue_moves_far_between_looks_without_corruption():
    dev_a = {"enabled": 1, "num": 8, "next_avail": 10, "completed": 10}
    dev_b = {"enabled": 1, "num": 8, "next_avail": 5010, "completed": 5008}
    found = dg.diagnose(_state(10, 10, qdev=dev_a), _state(5012, 5008, qdev=dev_b), 0.5)
    assert [f["kind"] for f in found] == ["working", "working"]


def test_used_moved_by_more_than_the_device_completed():
    dev_a = {"enabled": 1, "num": 8, "next_avail": 10, "completed": 10}
    dev_b = {"enabled": 1, "num": 8, "next_avail": 40, "completed": 12}
    found = dg.diagnose(_state(40, 10, qdev=dev_a), _state(40, 38, qdev=dev_b), 0.5)
    assert "used.idx moved by 28 (10 → 38) in 0.5 s while the device completed 2" in " ".join(
        f["message"] for f in found if f["kind"] == "index-corruption"
    )


def test_avail_jumped_beyond_what_the_device_took():
    dev_a = {"enabled": 1, "num": 8, "next_avail": 10, "completed": 10}
    dev_b = {"enabled": 1, "num": 8, "next_avail": 12, "completed": 12}
    found = dg.diagnose(_state(10, 10, qdev=dev_a), _state(40, 12, qdev=dev_b), 0.5)
    msgs = [f["message"] for f in found if f["kind"] == "index-corruption"]
    assert any("avail.idx jumped by 30 (10 → 40) in 0.5 s while the device took 2" in m for m in msgs)


# -- property test of the analysis ---------------------------------------------------------------------


_u16 = st.integers(min_value=0, max_value=0xFFFF)
_ring = st.fixed_dictionaries({k: _u16 for k in ("avail_flags", "avail_idx", "used_flags", "used_idx", "used_event",
                                                 "avail_event")})  # fmt: skip
_qdev = st.none() | st.fixed_dictionaries({
    "enabled": st.integers(0, 1), "num": st.sampled_from([0, 1, 8, 256]), "next_avail": _u16,
    "avail_idx": _u16, "used_idx": _u16, "completed": st.integers(0, 1 << 40), "notified": st.integers(0, 99),
    "signalled_idx": _u16,
})  # fmt: skip


@st.composite
def _states(draw):
    def one():
        count = draw(st.integers(0, 3))
        queues = [dg.QueueLook(i, draw(st.sampled_from([0, 8, 256, 32768])), draw(st.booleans()),
                               draw(st.none() | _ring), draw(_qdev)) for i in range(count)]  # fmt: skip
        device = draw(st.none() | st.fixed_dictionaries({
            "kicks": st.integers(0, 99), "irqs_sent": st.integers(0, 99), "irq_bound": st.integers(0, 1),
            "polling": st.integers(0, 1), "features_refused": st.integers(0, 3), "reason": st.text(max_size=20),
        }))  # fmt: skip
        bits = draw(st.sets(st.sampled_from([0, 1, 17, 28, 29, 32])))
        return dg.State(draw(st.integers(0, 255)), draw(st.integers(0, 0xFFFFFFFF)),
                        draw(st.sampled_from(["blk", "net", "console", "rng", None])), bits, bits | {32},
                        queues, device)  # fmt: skip

    first = one()
    return first, draw(st.none() | st.just(one()))


@given(_states())
def test_diagnose_takes_any_state(states):
    first, second = states
    if second is not None:
        second.queues = second.queues[: len(first.queues)]
    found = dg.diagnose(first, second, 0.5)
    assert found
    for f in found:
        assert f["kind"] in dg.KINDS and f["severity"] in ("ok", "warning", "error")
        assert isinstance(f["message"], str) and isinstance(f["evidence"], dict)
        assert f["queue"] is None or isinstance(f["queue"], int)
    dg.notes(first, second)


# -- a real L4Re system behind the bridge ------------------------------------------------------------------
