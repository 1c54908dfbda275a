"""The waiting policy: spin only while it pays, yield while spinning, never spin on one CPU.

The policy's clock and its yield are replaced here, so that nothing depends
on how fast this machine is; nothing asserts a timing.
"""

from __future__ import annotations

import os
import random
import socket
import threading

import pytest

from l4vctl import catalog as cat
from l4vctl import waiting, wire
from l4vctl.waiting import CLIP, FACTOR, PROBE, RECHECK, Spin, one_cpu, peer_pid

CAP = 200e-6


class Clock:
    """A clock that moves ``step`` seconds every time it is read."""

    def __init__(self, step: float = 1e-6):
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(waiting, "_clock", c)
    return c


@pytest.fixture
def yields(monkeypatch):
    """Every sched_yield the policy makes, counted (and not made)."""
    calls: list[int] = []
    monkeypatch.setattr(waiting, "_yield", lambda: calls.append(1))
    return calls


@pytest.fixture
def placement(monkeypatch):
    """Where processes may run: {pid: cpus}; pid 0 is this process, others unknown (ESRCH)."""
    table: dict[int, set[int]] = {0: {0, 1}}

    def getaffinity(pid):
        if pid not in table:
            raise ProcessLookupError(3, "No such process")
        return set(table[pid])

    monkeypatch.setattr(os, "sched_getaffinity", getaffinity)
    return table


def never():
    """A poll for something that does not come."""
    return None


def after(n: int):
    """A poll that succeeds at its ``n``-th call; counts its calls."""
    calls = []

    def poll():
        calls.append(1)
        return "it" if len(calls) >= n else None

    poll.calls = calls  # type: ignore[attr-defined]
    return poll


# -- one CPU ----------------------------------------------------------------------------------


def test_one_cpu_is_this_process_and_its_peer_on_one_and_the_same_cpu(placement):
    assert not one_cpu()
    placement[0] = {0}
    assert one_cpu()  # the peer is not known: it is assumed to run where this process does
    placement[4242] = {0}
    assert one_cpu(4242)
    placement[4242] = {1}
    assert not one_cpu(4242)  # the peer has a CPU of its own: waiting for it on this one can pay
    placement[4242] = {0, 1}
    assert not one_cpu(4242)
    assert one_cpu(999)  # a peer that is gone: as if unknown


def test_no_spin_at_all_on_one_cpu(placement, clock, yields):
    placement[0] = {3}
    spin = Spin(CAP)
    poll = after(2)
    assert spin.budget() == 0
    assert spin.run(poll) is None  # the caller sleeps instead
    assert len(poll.calls) == 1  # what was already there would have been taken
    assert yields == [] and spin.spins == 0


def test_no_spin_when_both_processes_share_one_cpu(placement, clock, yields):
    placement[0] = {1}
    placement[777] = {1}
    spin = Spin(CAP, peer=777)
    assert spin.run(never) is None and yields == []
    placement[778] = {0}
    spin.peer = 778  # a new peer is looked at at once
    assert spin.budget() > 0


def test_placement_is_looked_at_again_after_a_while(placement, clock, yields):
    spin = Spin(CAP)
    assert spin.budget() > 0
    placement[0] = {0}  # pinned while running (taskset -p)
    assert spin.budget() > 0  # not looked at again yet
    clock.now += RECHECK
    assert spin.budget() == 0


# -- spinning ---------------------------------------------------------------------------------


def test_spin_yields_before_every_poll_after_the_first(placement, clock, monkeypatch):
    order = []

    def poll():
        order.append("poll")
        return "it" if order.count("poll") == 4 else None

    monkeypatch.setattr(waiting, "_yield", lambda: order.append("yield"))
    spin = Spin(CAP)
    assert spin.run(poll) == "it"
    assert order == ["poll", "yield", "poll", "yield", "poll", "yield", "poll"]
    assert spin.spins == 1 and spin.caught == 1


def test_spin_ends_when_the_budget_is_spent(placement, clock, yields):
    spin = Spin(CAP, estimate=50e-6)
    start = clock()
    assert spin.budget(start) == pytest.approx(FACTOR * 50e-6)
    assert spin.run(never, start) is None
    spent = clock.now - start
    assert FACTOR * 50e-6 <= spent <= FACTOR * 50e-6 + 5 * clock.step
    assert len(yields) == pytest.approx(FACTOR * 50e-6 / clock.step, abs=2)  # one clock read a round


def test_budget_follows_the_measured_waits(placement, clock, yields):
    spin = Spin(CAP)
    assert spin.budget() == pytest.approx(CAP)  # before any wait: a whole cap
    for _ in range(100):
        spin.observe(10e-6)
    assert spin.estimate == pytest.approx(10e-6, rel=0.01)
    assert spin.budget() == pytest.approx(FACTOR * 10e-6, rel=0.01)  # quick answers: short spins
    for _ in range(100):
        spin.observe(1.0)  # answers that take far longer than any spin
    assert spin.estimate <= CLIP * CAP  # clipped: one stall cannot stop spinning for long
    assert spin.budget() == 0
    assert spin.run(never) is None and yields == []
    for _ in range(30):
        spin.observe(20e-6)
    assert 0 < spin.budget() <= CAP  # quick again: spinning again


def test_while_waits_are_long_one_in_probe_still_spins(placement, clock, yields):
    spin = Spin(CAP, estimate=CLIP * CAP)
    spun = []
    for _ in range(3 * PROBE):
        before = spin.spins
        assert spin.run(never) is None
        spun.append(spin.spins - before)
    assert spun == ([0] * (PROBE - 1) + [1]) * 3
    for _ in range(PROBE - 1):
        spin.run(never)
    assert spin.run(after(3)) == "it"  # the probe catches a quick answer: it counts
    assert spin.estimate < CLIP * CAP


def test_one_long_stall_does_not_stop_spinning(placement):
    spin = Spin(CAP, estimate=20e-6)
    spin.observe(5.0)
    assert spin.estimate < CAP and 0 < spin.budget() <= CAP


def test_a_wait_caught_spinning_is_measured_one_already_there_is_not(placement, clock, yields):
    spin = Spin(CAP, estimate=100e-6)
    assert spin.run(after(1)) == "it"
    assert spin.estimate == 100e-6 and yields == []  # nothing was waited for
    clock.step = 10e-6
    assert spin.run(after(3)) == "it"
    assert spin.estimate < 100e-6  # caught after a few tens of microseconds


def test_rest_yields_on_one_cpu_and_sleeps_elsewhere(placement, yields, monkeypatch):
    slept = []
    monkeypatch.setattr(waiting.time, "sleep", slept.append)
    spin = Spin(CAP)
    spin.rest(50e-6)
    assert slept == [50e-6] and yields == []
    placement[0] = {0}
    spin = Spin(CAP)
    spin.rest(50e-6)
    assert slept == [50e-6] and yields == [1]


# -- the peer's process ---------------------------------------------------------------------------


def test_peer_pid_of_a_connected_socket(tmp_path):
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        try:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.connect(path)
            c.recv(1)  # until the test closes its end
        finally:
            os._exit(0)
    try:
        conn, _ = listener.accept()
        assert peer_pid(conn) == pid
        conn.close()
    finally:
        listener.close()
        os.waitpid(pid, 0)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert peer_pid(a) is None  # a pair made here: its peer is this process, as far as the kernel knows
    a.close()
    b.close()


# -- the waits that use it ----------------------------------------------------------------------


def test_recv_spins_for_a_late_frame_and_learns_how_late(placement):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        spin = Spin(1.0, estimate=0.5)  # spins up to a second: the frame comes while it spins
        frame = wire.encode(cat.KIND_REPLY, 7, 0, 0, [1])
        t = threading.Timer(0.01, wire.send, (b, frame))
        t.start()
        got = wire.recv(a, 5.0, spin=spin)
        t.join()
        assert got.seq == 7 and spin.spins == 1 and spin.caught == 1
        assert spin.estimate < 0.5
    finally:
        a.close()
        b.close()


def test_recv_on_one_cpu_sleeps_at_once(placement, yields):
    placement[0] = {0}
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        spin = Spin(1.0)
        t = threading.Timer(0.01, wire.send, (b, wire.encode(cat.KIND_REPLY, 8, 0, 0)))
        t.start()
        assert wire.recv(a, 5.0, spin=spin).seq == 8
        t.join()
        assert yields == [] and spin.spins == 0
        assert spin.estimate != 0.5  # the wait that ended sleeping is measured too
        with pytest.raises(TimeoutError):
            wire.recv(a, 0, spin=spin)
    finally:
        a.close()
        b.close()


def test_server_poll_does_not_spin_on_one_cpu(placement, yields):
    from l4vctl.backends.emu import build_device
    from l4vctl.emulator.server import Server

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = build_device("rng", {})
    server = Server(device, connection=a)
    try:
        placement[0] = {0}
        server._poll()  # nothing to do: one look, then back to sleep
        assert yields == []
        server._spin = None
        placement[0] = {0, 1}
        server._poll()  # two CPUs: polls for a while, yielding, then gives up
        assert yields
    finally:
        server.close()
        device.close()
        b.close()


def one_cpu_only():
    cpus = sorted(os.sched_getaffinity(0))
    return {cpus[0]}, set(cpus)


@pytest.mark.parametrize("mode", ["ipc", "cmd"])
@pytest.mark.parametrize("event_idx", [False, True])
def test_io_on_one_cpu_sleeps_every_wait_and_loses_no_notification(tmp_path, mode, event_idx):
    """Both processes on one CPU: no side spins, every wait sleeps, kicks and interrupts still arrive."""
    from l4vctl.drivers.blk import BlkDriver
    from l4vctl.session import Session

    one, every = one_cpu_only()
    img = tmp_path / "disk.img"
    url = (
        f"emu:blk?image={img}&size=1M"
        + ("&features=event_idx" if event_idx else "")
        + ("&cmd_mode=1" if mode == "cmd" else "")
    )
    rnd = random.Random(f"{mode}{event_idx}")
    os.sched_setaffinity(0, one)  # the emulator, forked from here, runs there too
    try:
        with Session(url, mode=mode) as s:
            s.handshake(want="all" if event_idx else None)
            assert (cat.EVENT_IDX_BIT in s.negotiated) == event_idx
            drv = BlkDriver(s, depth=8, max_io=16 * 1024, segments=2)
            model = bytearray(1 << 20)
            for _ in range(20):
                count = rnd.randrange(1, 64)
                sector = rnd.randrange(0, 2048 - count)
                data = rnd.randbytes(count * 512)
                drv.write(sector, data)
                model[sector * 512 : sector * 512 + len(data)] = data
                assert drv.read(sector, len(data)) == data
            assert img.read_bytes() == bytes(model)
            spins = [s._link.channel._reply_spin, drv.vq.spin]  # type: ignore[union-attr]
            if s._neg is not None:
                spins.append(s._neg.spin)
            assert [sp.spins for sp in spins] == [0] * len(spins)
    finally:
        os.sched_setaffinity(0, every)
