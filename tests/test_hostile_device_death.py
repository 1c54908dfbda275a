"""A device that dies or stalls while the driver waits on it.

A device process killed during I/O must show as "device went away" (exit 3)
within moments, not as a timeout after --timeout; a device that never
consumes a cmd word must cost no more than the timeout and must not flood
its log; fault injection takes opcode names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from l4vctl.errors import UnavailableError
from l4vctl.session import Session
from tests.conftest import run_cli
from tests.emu import emulator

#: The --timeout given to every command whose device is killed: far longer than the bound asserted.
LONG = 30.0
#: How soon after the kill the command must have ended (generous for a loaded, shared CPU).
PROMPT = 3.0
#: Bytes the device must have moved before it is killed: well past the handshake (about 20 KB).
IO_BYTES = 1 << 20


def _l4vctl(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "l4vctl", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "L4VCTL_EMU_LOG": "ERROR", **(env or {})},
    )


def _child_of(pid: int) -> int | None:
    """The emulator process an ``emu:`` command forked (its only child)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def _io_bytes(pid: int) -> int:
    """Bytes the process has moved through read/write calls (the blk and rng models use them)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return 0
    return int(fields["rchar"]) + int(fields["wchar"])


def _until(what: str, cond, proc: subprocess.Popen, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        assert proc.poll() is None, f"the command ended before {what}: {proc.returncode} {proc.stderr.read()!r}"
        time.sleep(0.005)
    raise AssertionError(f"no {what} within {timeout} s")


def _finish(proc: subprocess.Popen, killed_at: float) -> tuple[int, float, str]:
    try:
        code = proc.wait(LONG + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    took = time.monotonic() - killed_at
    err = proc.stderr.read()
    proc.stderr.close()
    return code, took, err


def _assert_went_away(code: int, took: float, err: str) -> None:
    lines = err.strip().splitlines()
    assert code == 3, (code, err)
    assert took < PROMPT, f"the command noticed the dead device only after {took:.2f} s"
    assert len(lines) == 1 and lines[0].startswith("l4vctl: error: "), err
    assert "went away" in lines[0] and "killed by SIGKILL" in lines[0], err


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "emu:blk", "--time", "20", "--json"],
        ["blk", "read", "emu:blk?size=1G", "--sector", "0", "--count", str(2 << 20), "-o", "{out}"],
        ["rng", "read", "emu:rng", "--bytes", "2000M", "-o", "{out}"],
    ],
    ids=["bench", "blk-read", "rng-read"],
)
def test_emu_device_killed_during_io_is_unavailable(args, tmp_path):
    out = str(tmp_path / "out.bin")
    proc = _l4vctl(*[a.replace("{out}", out) for a in args], "--timeout", str(LONG))
    try:
        child = _until("emulator process", lambda: _child_of(proc.pid), proc)
        _until("I/O", lambda: _io_bytes(child) > IO_BYTES, proc)
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
    finally:
        if proc.poll() is None and "killed" not in locals():
            proc.kill()
    _assert_went_away(*_finish(proc, killed))
    assert not os.path.exists(out)


def _completed(url: str) -> int:
    with Session(url, role="monitor", timeout=5) as mon:
        stats = mon.stats()
    return stats["queues"][0]["completed"] if stats and stats["queues"] else 0


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "{url}", "--time", "20", "--workload", "randwrite", "--json"],
        ["blk", "write", "{url}", "--sector", "0", "--count", str(128 << 10), "--pattern", "0x5a", "--depth", "1"],
    ],
    ids=["bench", "blk-write"],
)
def test_emulator_process_killed_during_io_is_unavailable(args, tmp_path):
    with emulator(tmp_path, "blk") as (url, emu):
        proc = _l4vctl(*[a.replace("{url}", url) for a in args], "--timeout", str(LONG))
        try:
            _until("completed requests", lambda: _completed(url) >= 16, proc)
            emu.kill()
            killed = time.monotonic()
        finally:
            if proc.poll() is None and "killed" not in locals():
                proc.kill()
        code, took, err = _finish(proc, killed)
        emu.wait(10)
    assert code == 3, (code, err)
    assert took < PROMPT, f"the command noticed the dead device only after {took:.2f} s"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "went away during I/O" in lines[0], err


def _kill_emu(s: Session) -> None:
    os.kill(s.backend.pid, signal.SIGKILL)


def test_virtqueue_wait_ends_when_the_device_dies():
    from l4vctl.drivers.blk import BlkDriver

    with Session("emu:blk", timeout=LONG) as s:
        s.handshake()
        drv = BlkDriver(s, depth=4)
        os.kill(s.backend.pid, signal.SIGSTOP)  # the request below stays in flight
        slot = drv.free.pop()
        drv.submit(slot, 0, 0, 4096)
        drv.kick()
        _kill_emu(s)
        t = time.monotonic()
        with pytest.raises(UnavailableError, match="went away during I/O .*killed by SIGKILL"):
            drv.wait()
        assert time.monotonic() - t < PROMPT


@pytest.mark.parametrize("kind", ["net", "console"])
def test_receive_ends_when_the_device_dies(kind):
    from l4vctl.drivers.console import ConsoleDriver
    from l4vctl.drivers.net import NetDriver

    url = "emu:console?io=null" if kind == "console" else "emu:net"
    with Session(url, timeout=LONG) as s:
        s.handshake()
        drv = ConsoleDriver(s) if kind == "console" else NetDriver(s)
        _kill_emu(s)
        t = time.monotonic()
        with pytest.raises(UnavailableError, match="went away"):
            drv.receive(LONG)
        assert time.monotonic() - t < PROMPT


def test_cmd_wait_ends_when_the_device_dies():
    with Session("emu:blk?cmd_mode=1&inject=never-clear-cmd", timeout=LONG) as s:
        before = s.get("generation")
        stop = threading.Event()

        def killer():  # the reset asked for by cmd has run and the word is left: the device dies
            while not stop.is_set() and s.page is not None:
                if s.get("generation") != before:
                    _kill_emu(s)
                    return
                time.sleep(0.002)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        t = time.monotonic()
        try:
            with pytest.raises(UnavailableError, match="went away before it consumed cmd"):
                s.handshake()
        finally:
            stop.set()
            thread.join(5)
        assert time.monotonic() - t < PROMPT


def test_never_cleared_cmd_ends_on_time_without_flooding_the_log():
    t = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "l4vctl", "negotiate", "emu:blk?cmd_mode=1&inject=never-clear-cmd", "--timeout", "0.2"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "L4VCTL_EMU_LOG": "INFO"},
    )  # fmt: skip
    took = time.monotonic() - t
    assert r.returncode == 7, r.stderr[-2000:]
    assert took < 1.5, f"took {took:.2f} s"
    lines = r.stderr.splitlines()
    assert len(lines) < 50, f"{len(lines)} lines: {lines[:5]} ..."
    errors = [line for line in lines if line.startswith("l4vctl: ")]
    assert len(errors) == 1 and "did not consume cmd 0x01000000 within 0.2 s" in errors[0], r.stderr


@pytest.mark.parametrize("op", ["SET_STATUS", "set_status", "OP_SET_STATUS", "0"])
def test_no_reply_takes_opcode_names(op):
    t = time.monotonic()
    r = run_cli("negotiate", f"emu:blk?inject=no-reply={op}", "--timeout", "0.5")
    assert r.code == 7, r.stderr
    assert "no reply to SET_STATUS within 0.5 s" in r.stderr
    assert time.monotonic() - t < 1.5


def test_no_reply_names_other_opcodes():
    r = run_cli("negotiate", "emu:blk?inject=no-reply=Config_Queue", "--timeout", "0.3")
    assert r.code == 7 and "no reply to CONFIG_QUEUE" in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["no-reply=bogus", "no-reply=-1", "no-reply"])
def test_bad_no_reply_is_a_usage_error_naming_the_opcodes(value):
    r = run_cli("negotiate", f"emu:blk?inject={value}")
    assert r.code == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l4vctl: error: "), r.stderr
    assert "SET_STATUS" in lines[0]
    if value != "no-reply":
        assert all(name in lines[0] for name in ("CONFIG_QUEUE", "REGISTER_DS", "DEVICE_CONFIG", "GET_DEVICE_IRQ"))


def test_emulate_takes_opcode_names(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "l4vctl", "emulate", "blk", "--socket", str(tmp_path / "x.sock"),
         "--inject", "no-reply=bogus"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "not an L4-VIRTIO opcode" in r.stderr and "SET_STATUS" in r.stderr, r.stderr
    assert not (tmp_path / "x.sock").exists()
    with emulator(tmp_path, "blk", "--inject", "no-reply=set_status") as (url, _proc):
        r = run_cli("negotiate", url, "--timeout", "0.3")
    assert r.code == 7 and "no reply to SET_STATUS" in r.stderr, r.stderr
