"""Every command against a device server that turns hostile on cue.

The device is a real emulator (tests/hostile_device.py) that misbehaves at
one chosen moment: garbage or missing replies, wrong frames, capabilities
that are not what they claim (pipes, directories, unsealed or short
memory), floods, a hang-up, a vanished process.  Each command must end with
a documented exit status and exactly one ``l4vctl:`` line on stderr, in
about its --timeout, with no traceback; with --json the envelope says the
same.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import threading
import time

import pytest

from l4vctl.backends.emu import build_device
from tests.conftest import run_cli
from tests.emu import reap
from tests.hostile_device import OPS, HostileServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = "0.5"

#: exit statuses an attack may end a command with (0 where the attack can be harmless)
EXPECT = {
    "garbage": {4},
    "wrong-kind": {4},
    "wrong-seq": {4, 7},  # a stray reply is skipped and the real one never comes; a stray WELCOME is refused
    "close": {3},
    "silent": {7},
    "eio": {3, 4, 5, 6},
    "einval": {3, 4, 5, 6},
    "no-caps": {4},
    "bad-cap-index": {4},
    "pipe": {4},
    "directory": {4},
    "unsealed": {4},
    "short": {4},
    "huge-words": {0, 4},
    "flood": {0, 3, 4, 7},  # skipped, or the device drops us for not keeping up
    "stop-reading": {7},
}

COMMANDS = {
    "probe": ("blk", ["probe"]),
    "dump-config": ("blk", ["dump-config"]),
    "negotiate": ("blk", ["negotiate"]),
    "queue-stats": ("blk", ["queue-stats"]),
    "blk-read": ("blk", ["blk", "read", "--sector", "0", "--count", "8", "-o", os.devnull]),
    "blk-write": ("blk", ["blk", "write", "--sector", "0", "--count", "8", "--pattern", "a5"]),
    "bench": ("blk", ["bench", "--time", "200ms", "--qd", "4"]),
    "rng-read": ("rng", ["rng", "read", "--bytes", "16", "-o", os.devnull]),
    "console-recv": ("console", ["console", "recv", "--bytes", "1", "--wait", "0.2"]),
    "net-send": ("net", ["net", "send", "--text", "x"]),
}

#: (attack, opcode name or None for HELLO) -> commands it is tried with
PLAN: list[tuple[str, str | None, tuple[str, ...]]] = []
for _attack in ("garbage", "wrong-kind", "wrong-seq", "close", "silent", "einval", "huge-words", "flood",
                "stop-reading"):  # fmt: skip
    PLAN.append((_attack, None, ("probe", "negotiate")))
for _attack in EXPECT:
    PLAN.append((_attack, "DEVICE_CONFIG", ("probe", "dump-config", "negotiate", "queue-stats")))
for _attack in ("garbage", "close", "silent", "eio", "no-caps", "bad-cap-index", "pipe", "directory", "unsealed",
                "short"):  # fmt: skip
    PLAN.append((_attack, "GET_DEVICE_IRQ", ("negotiate", "blk-read", "rng-read")))
for _op, _cmds in (("SET_STATUS", ("negotiate", "bench", "console-recv")),
                   ("CONFIG_QUEUE", ("blk-write", "rng-read", "net-send")),
                   ("REGISTER_DS", ("blk-read", "bench", "console-recv"))):  # fmt: skip
    for _attack in ("garbage", "wrong-kind", "wrong-seq", "close", "silent", "eio", "einval", "huge-words", "flood"):
        PLAN.append((_attack, _op, _cmds))

CASES = [(a, op, c) for a, op, cmds in PLAN for c in cmds]


@contextlib.contextmanager
def hostile(tmp_path, attack: str, op: str | None, kind: str):
    """A hostile device served from a thread of this process; yields its URL."""
    from l4vctl.emulator.server import listen

    path = str(tmp_path / "h.sock")
    device = build_device(kind, {"abi": "current"})
    try:
        listener, ident = listen(path)
        server = HostileServer(device, attack, OPS[op] if op else None, listener=listener, path=path,
                               socket_id=ident)  # fmt: skip
        t = threading.Thread(target=server.serve, daemon=True)
        t.start()
        try:
            yield f"unix:{path}"
        finally:
            server.stop()
            t.join(10)
            assert not t.is_alive(), "the hostile server did not stop"
            server.close()
    finally:
        device.close()


def check(r, attack: str, started: float) -> None:
    elapsed = time.monotonic() - started
    assert "Traceback" not in r.stderr, r.stderr
    assert r.code in EXPECT[attack], (r.code, r.stderr)
    if r.code:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("l4vctl: "), r.stderr
    assert elapsed < float(TIMEOUT) * 3 + 4, f"took {elapsed:.1f} s"


@pytest.mark.parametrize("attack,op,command", CASES, ids=[f"{a}@{op or 'HELLO'}-{c}" for a, op, c in CASES])
def test_command_meets_hostile_device(tmp_path, attack, op, command):
    kind, args = COMMANDS[command]
    with hostile(tmp_path, attack, op, kind) as url:
        t0 = time.monotonic()
        r = run_cli(*args, url, "--timeout", TIMEOUT, "--json")
        check(r, attack, t0)
        env = r.json()
        assert env["ok"] is (r.code == 0)
        if r.code:
            assert env["error"]["exit_code"] == r.code


@pytest.mark.parametrize("command", ["negotiate", "blk-read", "rng-read"])
def test_device_process_that_vanishes_mid_call(tmp_path, command):
    """A real process that exits at a call: the command says the device went away (exit 3)."""
    kind, args = COMMANDS[command]
    for op in ("SET_STATUS", "GET_DEVICE_IRQ", "REGISTER_DS"):
        path = tmp_path / f"{op}.sock"
        proc = subprocess.Popen([sys.executable, "-m", "tests.hostile_device", f"exit@{op}", kind, str(path)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert select.select([proc.stdout], [], [], 20)[0]
            assert proc.stdout.readline().strip() == f"unix:{path}"
            t0 = time.monotonic()
            r = run_cli(*args, f"unix:{path}", "--timeout", "10")
            assert r.code == 3, (op, r.code, r.stderr)
            assert time.monotonic() - t0 < 5
            assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        finally:
            reap(proc)


def test_plan_size():
    """The figure quoted in the docs: how many hostile inputs the commands meet."""
    assert len(CASES) >= 150, len(CASES)
