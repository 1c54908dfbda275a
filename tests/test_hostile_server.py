"""Hostile and careless clients against a real emulator process.

Each test attacks the emulator the way a misbehaving local process would
(signals at the worst moment, clients that vanish mid-HELLO, never read,
flood, hoard descriptors or connect in crowds, emulators racing for one
socket path) and then checks that well-behaved clients are still served.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.errors import TimeoutExpired, UnavailableError
from tests.emu import Session, emulator, hello, raw_connect, wait_for

EMULATE = [sys.executable, "-m", "l4vctl", "emulate"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def attach_ok(url: str, timeout: float = 5.0) -> None:
    """A well-behaved driver attaches, reads the device id and leaves."""
    with Session(url, timeout=timeout) as s:
        assert s.get("device") == 2


def _attaches(url: str) -> bool:
    try:
        attach_ok(url, 1.0)
        return True
    except (UnavailableError, TimeoutExpired):
        return False


@contextlib.contextmanager
def closing_all(socks):
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def processes(procs):
    """Popen objects that are killed and reaped however the test ends."""
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


# -- 1. signals right after the ready line ------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_right_after_ready_line_stops_the_emulator(tmp_path, sig):
    """The signal may arrive before the loop starts; it must still end the process."""
    for i in range(6):
        path = tmp_path / f"s{i}.sock"
        proc = subprocess.Popen([*EMULATE, "blk", "--socket", str(path), "-q"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        with processes([proc]):
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            assert ready, "no ready line"
            assert proc.stdout.readline().strip() == f"unix:{path}"
            proc.send_signal(sig)  # at once: the race window is right here
            assert proc.wait(5) == 0, proc.stderr.read()
            assert not path.exists()


def test_server_stopped_before_serve_returns_at_once():
    from l4vctl.backends.emu import build_device
    from l4vctl.emulator.server import Server

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = build_device("rng", {})
    server = Server(device, connection=a)
    try:
        server._on_signal(signal.SIGTERM, None)  # as if the signal came before the loop
        done = threading.Event()
        t = threading.Thread(target=lambda: (server.serve(), done.set()), daemon=True)
        t.start()
        assert done.wait(5), "serve() ignored a stop that came before it"
    finally:
        server.stop()
        server.close()
        device.close()
        b.close()


# -- 2. lock-out by a driver that vanishes during HELLO ---------------------------------------


def test_driver_that_closes_before_welcome_does_not_lock_out(tmp_path):
    with emulator(tmp_path) as (url, proc):
        for i in range(30):
            s = raw_connect(url)
            s.send(hello(seq=i + 1))
            if i % 3 == 1:
                s.shutdown(socket.SHUT_RDWR)
            s.close()  # gone before reading WELCOME
        attach_ok(url)
        assert proc.poll() is None


def test_driver_killed_while_connecting_does_not_lock_out(tmp_path):
    code = ("import os, socket, sys\n"
            "from tests.test_hostile_server import hello\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            "s.connect(sys.argv[1])\n"
            "s.send(hello())\n"
            "os.kill(os.getpid(), 9)\n")  # fmt: skip
    with emulator(tmp_path) as (url, _proc):
        for _ in range(3):
            r = subprocess.run([sys.executable, "-c", code, url[5:]], cwd=ROOT, capture_output=True, timeout=20)
            assert r.returncode == -9, r.stderr
        attach_ok(url)


def test_driver_interrupted_by_ctrl_c_while_connecting_does_not_lock_out(tmp_path):
    with emulator(tmp_path) as (url, _proc):
        for delay in (0.0, 0.05, 0.1):
            p = subprocess.Popen([sys.executable, "-m", "l4vctl", "negotiate", url],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            with processes([p]):
                time.sleep(delay)  # not a synchronisation: any moment of its life will do
                p.send_signal(signal.SIGINT)
                p.wait(20)
        assert wait_for(lambda: _attaches(url), 5)


# -- 5. clients that flood, never read, hoard descriptors, idle, or crowd ---------------------------


def test_client_that_never_reads_replies_does_not_block_others(tmp_path):
    with emulator(tmp_path, "blk", "--client-timeout", "1") as (url, proc):
        bad = raw_connect(url)
        with closing_all([bad]):
            bad.send(hello(role=cat.ROLE_MONITOR))
            bad.setblocking(False)
            req = wire.encode(cat.KIND_REQUEST, 7, cat.L4VIRTIO_PROTOCOL, cat.OP_DEVICE_CONFIG, [])
            sent = 0
            out = select.poll()
            out.register(bad, select.POLLOUT)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    bad.send(req)
                    sent += 1
                except BlockingIOError:
                    if not out.poll(300):
                        break  # the emulator stopped reading us: its replies to us are piling up
            assert sent > 300  # past what used to wedge the loop (about 280)
            t0 = time.monotonic()
            attach_ok(url, 2.0)
            assert time.monotonic() - t0 < 2.0
            # and the flooder is dropped once it has left its replies unread for --client-timeout
            # (seen as a hang-up on its socket; it still reads nothing)
            p = select.poll()
            p.register(bad, select.POLLHUP)

            def dropped():
                return any(ev & select.POLLHUP for _fd, ev in p.poll(0))

            assert wait_for(dropped, 10, 0.05)
        assert proc.poll() is None
        attach_ok(url)


def test_connection_without_hello_is_closed_after_client_timeout(tmp_path):
    with emulator(tmp_path, "blk", "--client-timeout", "0.3") as (url, _proc):
        s = raw_connect(url)
        with closing_all([s]):
            s.settimeout(5)
            t0 = time.monotonic()
            assert s.recv(100) == b""  # closed by the emulator
            assert 0.2 < time.monotonic() - t0 < 3


def test_idle_timeout_closes_attached_clients_when_asked(tmp_path):
    with emulator(tmp_path, "blk", "--idle-timeout", "0.3") as (url, _proc):
        s = Session(url, role="monitor")
        s.open()
        try:
            s.channel.sock.settimeout(5)
            assert s.channel.sock.recv(100) == b""
        finally:
            s.close()
        attach_ok(url)


def test_out_of_descriptors_keeps_the_emulator_serving(tmp_path):
    path = tmp_path / "dev.sock"
    url = f"unix:{path}"

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    proc = subprocess.Popen([*EMULATE, "blk", "--socket", str(path), "-q", "--client-timeout", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=low_limit)  # fmt: skip
    hoard: list[socket.socket] = []
    with processes([proc]), closing_all(hoard):
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout.readline().strip() == url
        for _ in range(80):  # more than the emulator has descriptors for
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            hoard.append(s)
            s.settimeout(2)
            s.connect(str(path))
        # a newcomer is refused with a clear error, quickly, and the emulator lives
        with pytest.raises((UnavailableError, TimeoutExpired)):
            attach_ok(url, 1.0)
        assert proc.poll() is None
        for s in hoard:
            s.close()
        assert wait_for(lambda: _attaches(url), 10)
        assert proc.poll() is None


def crowd(url: str, n: int, hold: float = 0.0) -> list[BaseException]:
    """``n`` monitors connecting at the same moment; the errors they met."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def one():
        try:
            start.wait(10)
            with Session(url, role="monitor", timeout=10) as s:
                assert s.get("device") == 2
                if hold:
                    time.sleep(hold)  # keep the slot a little, so that others are refused meanwhile
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return errors


def test_64_simultaneous_clients_all_get_served(tmp_path):
    with emulator(tmp_path) as (url, proc):
        assert crowd(url, 64) == []
        assert proc.poll() is None


def test_clients_past_the_cap_wait_their_turn(tmp_path):
    with emulator(tmp_path, "blk", "--max-clients", "3") as (url, proc):
        assert crowd(url, 12, hold=0.05) == []
        # a client that cannot get in within its timeout says why
        holders = [Session(url, role="monitor", timeout=5) for _ in range(3)]
        try:
            for h in holders:
                h.open()
            with pytest.raises(UnavailableError, match="as many connections as it allows"):
                Session(url, role="monitor", timeout=0.3).open()
        finally:
            for h in holders:
                h.close()
        assert proc.poll() is None


def test_a_crowd_from_several_processes_all_get_served(tmp_path):
    """4 processes x 16 clients at once: backlog and retries let all of them through."""
    code = (
        "import sys, threading\n"
        "from l4vctl.session import Session\n"
        "url = sys.argv[1]\n"
        "res = []\n"
        "def one():\n"
        "    try:\n"
        "        with Session(url, role='monitor', timeout=10) as s:\n"
        "            res.append(s.get('device'))\n"
        "    except Exception as e:\n"
        "        res.append(repr(e))\n"
        "ts = [threading.Thread(target=one) for _ in range(16)]\n"
        "[t.start() for t in ts]; [t.join(30) for t in ts]\n"
        "print(res)\n"
        "sys.exit(0 if res == [2] * 16 else 1)\n"
    )
    with emulator(tmp_path) as (url, _proc):
        procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  cwd=ROOT) for _ in range(4)]  # fmt: skip
        with processes(procs):
            for p in procs:
                out, err = p.communicate(timeout=60)
                assert p.returncode == 0, (out, err)


# -- 7. the socket file belongs to the emulator that made it ------------------------------------------


def test_stopping_leaves_a_newer_emulators_socket_alone(tmp_path):
    with emulator(tmp_path, name="a.sock") as (url, first):
        path = url[5:]
        os.unlink(path)  # somebody removed it
        with emulator(tmp_path, name="a.sock") as (url2, second):
            first.send_signal(signal.SIGTERM)
            assert first.wait(10) == 0
            assert os.path.exists(path)
            attach_ok(url2)
            assert second.poll() is None


def test_emulators_racing_for_a_stale_path_leave_exactly_one_listening(tmp_path):
    path = tmp_path / "race.sock"
    for _round in range(2):
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stale.bind(str(path))
        stale.close()
        procs = [subprocess.Popen([*EMULATE, "rng", "--socket", str(path), "-q"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]  # fmt: skip
        with processes(procs):
            ready = []
            deadline = time.monotonic() + 30
            pending = list(procs)
            while pending and time.monotonic() < deadline:
                for p in list(pending):
                    if select.select([p.stdout], [], [], 0.01)[0]:
                        if p.stdout.readline().strip():
                            ready.append(p)
                        pending.remove(p)
                    elif p.poll() is not None:
                        pending.remove(p)
            assert not pending, "an emulator neither became ready nor exited"
            assert len(ready) == 1, [p.stderr.read() for p in procs if p.poll() is not None]
            for p in procs:
                if p not in ready:
                    assert p.wait(10) == 3
                    assert "in use by a running emulator" in p.stderr.read()
            with Session(f"unix:{path}", role="monitor", timeout=5) as s:
                assert s.get("device") == 4
        assert not path.exists()


def test_too_long_socket_path_is_a_usage_error(tmp_path):
    path = tmp_path / ("x" * 120)
    r = subprocess.run([*EMULATE, "blk", "--socket", str(path)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2
    assert "None" not in r.stderr and "107" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_embedded_emulator_does_not_hold_the_parents_other_connections(tmp_path):
    """A forked emu: child must not keep a unix: driver connection of its parent alive."""
    with emulator(tmp_path) as (url, _proc):
        first = Session(url)
        first.open()
        with Session("emu:rng") as embedded:  # forked while `first` is open
            first.close()  # the emulator must see this driver leave now, not when the child ends
            assert wait_for(lambda: _attaches(url), 3)
            assert embedded.get("device") == 4


def test_busy_driver_does_not_starve_other_clients(tmp_path):
    """A driver that keeps its rings busy still leaves the event loop to everyone else."""
    with emulator(tmp_path) as (url, _proc):
        bench = subprocess.Popen([sys.executable, "-m", "l4vctl", "bench", url, "--time", "20s", "--qd", "32"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        with processes([bench]):

            def busy():
                with Session(url, role="monitor", timeout=5) as m:
                    return m.stats()["kicks"] > 0 or m.status & cat.STATUS_DRIVER_OK

            assert wait_for(busy, 20, 0.05)
            worst = 0.0
            for _ in range(5):
                t0 = time.monotonic()
                with Session(url, role="monitor", timeout=5) as m:
                    assert m.get("device") == 2
                worst = max(worst, time.monotonic() - t0)
            assert worst < 1.0, worst
            assert bench.poll() is None


def test_idle_timeout_spares_a_driver_doing_ring_io(tmp_path):
    """Ring I/O sends kicks, not frames: the driver is busy, not idle."""
    from l4vctl.drivers.blk import BlkDriver

    with emulator(tmp_path, "blk", "--idle-timeout", "0.4") as (url, _proc):
        with Session(url, timeout=5) as s:
            s.handshake()
            drv = BlkDriver(s, depth=1)
            end = time.monotonic() + 1.5
            n = 0
            while time.monotonic() < end:
                drv.read(0, 4096)
                n += 1
            assert n > 10


def test_a_crowd_past_the_cap_waits_instead_of_being_reset(tmp_path):
    with emulator(tmp_path, "blk", "--max-clients", "1") as (url, _proc):
        holder = Session(url, role="monitor", timeout=5)
        holder.open()
        errors: list[BaseException] = []
        done: list[int] = []

        def one():
            try:
                # one slot for 80 clients: on one busy CPU the last may need a few seconds
                with Session(url, role="monitor", timeout=30) as s:
                    done.append(s.get("device"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(80)]
        try:
            for t in threads:
                t.start()
            time.sleep(0.3)  # not a synchronisation: the crowd only has to be refused for a while
        finally:
            holder.close()
        for t in threads:
            t.join(60)
        assert errors == [] and done == [2] * 80


def test_close_while_accepting_is_paused_removes_the_socket(tmp_path):
    from l4vctl.backends.emu import build_device
    from l4vctl.emulator.server import Server, listen

    path = str(tmp_path / "p.sock")
    device = build_device("rng", {})
    listener, ident = listen(path)
    server = Server(device, listener=listener, path=path, socket_id=ident)
    try:
        server._pause_accept(10)  # as when no descriptor was left for a newcomer
        server.close()
        assert not os.path.exists(path)
    finally:
        device.close()
