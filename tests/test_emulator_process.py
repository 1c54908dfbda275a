"""The emulator as a process: socket file, signals, drivers that come and go."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from l4vctl import catalog as cat
from l4vctl.errors import UnavailableError
from tests.emu import Session, emulator, reap, set_status, wait_for


def test_socket_is_private_and_removed_on_sigterm(tmp_path):
    with emulator(tmp_path) as (url, proc):
        path = url[5:]
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not os.path.exists(path)


def test_sigint_stops_cleanly_with_a_driver_attached(tmp_path):
    with emulator(tmp_path) as (url, proc):
        s = Session(url)
        s.open()
        s.handshake()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert not os.path.exists(url[5:])
        s.close()  # the device is gone: closing must not hang or raise


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path):
    path = tmp_path / "dev.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    with emulator(tmp_path) as (url, _proc):
        r = subprocess.run([sys.executable, "-m", "l4vctl", "emulate", "blk", "--socket", str(path)],
                           capture_output=True, text=True, timeout=20)  # fmt: skip
        assert r.returncode == 3 and "in use by a running emulator" in r.stderr
        with Session(url) as s:
            assert s.get("device") == 2


def test_refuses_to_replace_a_regular_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("precious")
    r = subprocess.run([sys.executable, "-m", "l4vctl", "emulate", "blk", "--socket", str(path)],
                       capture_output=True, text=True, timeout=20)  # fmt: skip
    assert r.returncode == 3 and "is not a socket" in r.stderr
    assert path.read_text() == "precious"


def test_driver_that_leaves_leaves_a_fresh_device(tmp_path):
    with emulator(tmp_path) as (url, _proc):
        with Session(url) as s:
            s.handshake()
            gen = s.get("generation")
        with Session(url, role="monitor") as mon:
            assert wait_for(lambda: mon.stats()["driver_attached"] == 0)
            st = mon.stats()
            assert st["regions"] == 0 and st["status"] == 0 and st["queues"][0]["enabled"] == 0
            assert mon.get("generation") > gen
        with Session(url) as s:
            s.handshake()
            assert s.status == 0x0F


def test_driver_killed_mid_handshake(tmp_path):
    with emulator(tmp_path) as (url, proc):
        code = (
            "import os, sys\n"
            "from l4vctl.session import Session\n"
            f"s = Session({url!r}); s.open(); s.reset(); s.write_status(1); s.write_status(3)\n"
            "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
            "os.kill(os.getpid(), 9)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
        assert r.stdout == "ready\n" and r.returncode == -9
        with Session(url) as s:  # the device noticed and is ready for the next driver
            s.handshake()
            assert s.status == 0x0F
        assert proc.poll() is None


def test_busy_device_error_in_cli(tmp_path):
    with emulator(tmp_path) as (url, _proc):
        with Session(url) as s:
            s.handshake()
            r = subprocess.run([sys.executable, "-m", "l4vctl", "negotiate", url], capture_output=True, text=True,
                               timeout=20)  # fmt: skip
            assert r.returncode == 3 and "device busy" in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1


def test_emulate_json_ready_line(tmp_path):
    path = tmp_path / "j.sock"
    proc = subprocess.Popen([sys.executable, "-m", "l4vctl", "emulate", "net", "--socket", str(path), "--json", "-q",
                             "--abi", "classic", "--cmd-mode"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        import json

        env = json.loads(proc.stdout.readline())  # one line, so scripts can wait for it
        assert env["ok"] and env["command"] == "emulate"
        r = env["result"]
        assert r["url"] == f"unix:{path}" and r["type"] == "net" and r["abi"] == "classic"
        assert cat.CMD_CONFIG_BIT["classic"] in r["offered"]
    finally:
        reap(proc)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["blk", "--mac", "00:11:22:33:44:55"], "--mac is not an option of blk devices"),
        (["blk", "--size", "lots"], "is not a size"),
        (["net", "--mac", "zz"], "is not a MAC address"),
        (["blk", "--feature", "warp_drive"], "unknown feature 'warp_drive'"),
        (["blk", "--inject", "explode"], "unknown fault 'explode'"),
        (["net", "--queues", "1"], "needs at least 2 queues"),
        (["blk", "--feature", "300"], "do not fit"),
        (["blk", "--ds-offset", "100"], "not a multiple of the page size"),
    ],
)
def test_emulate_bad_options(tmp_path, args, fragment):
    r = subprocess.run([sys.executable, "-m", "l4vctl", "emulate", *args, "--socket", str(tmp_path / "x.sock")],
                       capture_output=True, text=True, timeout=20)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.sock").exists()


def test_device_survives_dying_emulator_for_driver(tmp_path):
    with emulator(tmp_path) as (url, proc):
        s = Session(url, timeout=2)
        s.open()
        set_status(s, 0)
        proc.kill()
        proc.wait(10)
        with pytest.raises(UnavailableError, match="closed the connection"):
            set_status(s, 1)
        s.close()
