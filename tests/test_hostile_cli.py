"""The command line against hostile device data and a new user's mistakes.

* Terminal escape injection: device-supplied strings (a blk GET_ID serial, an
  input device's ID_NAME) reach text output with every control character
  escaped; JSON carries them exactly.
* One exit status per mistake: a device of another class is a missing device
  (exit 5) for every device-class command, as for ``probe --expect-device``.
* Ctrl-C with --json still prints the error envelope.
* Help, socket paths given as pages, ABI origin, too-long socket paths.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import select
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import quote

import pytest

from tests.conftest import run_cli
from tests.pages import device_page

#: OSC window title + BEL, clear screen, a C1 CSI, cursor home by CR, bidi override.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u009b2J"
DANGEROUS = ["\x1b", "\x07", "\u009b", "\r", "\u202e"]


def assert_inert(text: str) -> None:
    for ch in DANGEROUS:
        assert ch not in text, (ch, text)


# -- escaping ---------------------------------------------------------------------------------


def test_escape_leaves_no_control_character():
    from l4vctl.output import escape

    every = "".join(chr(c) for c in range(0xA0)) + "\u202e\u2066\u200f"
    out = escape(every)
    assert all(0x20 <= ord(c) < 0x7F for c in out), out
    assert escape("\x1b[2J") == "\\x1b[2J" and escape("\u202e") == "\\u202e"
    assert escape("plain text, é 日本 ✓") == "plain text, é 日本 ✓"  # printable text is untouched
    assert escape("a\nb\tc", keep="\n") == "a\nb\\x09c"


def test_blk_id_serial_with_escape_sequences():
    url = "emu:blk?serial=" + quote(HOSTILE)
    text = run_cli("blk", "id", url)
    assert text.code == 0, text.stderr
    assert_inert(text.stdout)
    assert text.stdout == "\\x1b]0;pwned\\x07\\x1b[2J\\x9b2J\n"
    as_json = run_cli("blk", "id", url, "--json")
    assert as_json.json()["result"]["id"] == HOSTILE  # JSON keeps the exact string (escaped by JSON itself)


@pytest.fixture
def hostile_input_page(tmp_path):
    name = (HOSTILE + "\u202eevil").encode()
    page = device_page("current", "input", features=[32], num_queues=2, num_max=64,
                       device_config={"select": 1, "size": len(name), "u": name + bytes(128 - len(name))})  # fmt: skip
    path = tmp_path / "input.bin"
    path.write_bytes(page)
    return path


@pytest.mark.parametrize("color", ["never", "always"])
def test_input_id_name_with_escape_sequences(hostile_input_page, color):
    r = run_cli("--color", color, "dump-config", str(hostile_input_page))
    assert r.code == 0, r.stderr
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in r.stdout and "\\u202eevil" in r.stdout
    if color == "never":
        assert_inert(r.stdout)
    else:  # rich colours the text with its own SGR sequences, and nothing else
        assert "\x1b]" not in r.stdout and "\x1b[2J" not in r.stdout and "\x07" not in r.stdout
        assert "\u009b" not in r.stdout and "\u202e" not in r.stdout
    j = run_cli("dump-config", str(hostile_input_page), "--json").json()["result"]
    assert j["device_config"]["fields"]["decoded"]["string"] == HOSTILE + "\u202eevil"


def test_messages_on_stderr_are_escaped(tmp_path):
    r = run_cli("probe", str(tmp_path / "page\x1b[2J\x1b]0;pwned\x07.bin"))
    assert r.code == 3
    assert_inert(r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "page\\x1b[2J" in r.stderr


# -- a device of the wrong class: one exit status everywhere ------------------------------------

WRONG_CLASS = [
    (["blk", "id"], [], "emu:rng", "a block device"),
    (["blk", "read"], ["--sector", "0", "--count", "1"], "emu:net", "a block device"),
    (["blk", "write"], ["--sector", "0", "--count", "1", "--pattern", "00"], "emu:console", "a block device"),
    (["blk", "flush"], [], "emu:rng", "a block device"),
    (["blk", "write-zeroes"], ["--sector", "0", "--count", "1"], "emu:rng", "a block device"),
    (["bench"], ["--time", "0.1s"], "emu:net", "a block device"),
    (["rng", "read"], ["--bytes", "4"], "emu:blk", "an entropy device"),
    (["console", "send"], ["x"], "emu:blk", "a console"),
    (["console", "recv"], ["--wait", "0.1"], "emu:rng", "a console"),
    (["net", "send"], ["--text", "x"], "emu:blk", "a network device"),
    (["net", "recv"], ["--wait", "0.1"], "emu:console", "a network device"),
    (["net", "ping"], ["emu:net"], "emu:blk", "a network device"),
]


@pytest.mark.parametrize("cmd,rest,url,noun", WRONG_CLASS, ids=[" ".join(c) for c, *_ in WRONG_CLASS])
def test_wrong_device_class_is_exit_5(cmd, rest, url, noun):
    r = run_cli(*cmd, url, *rest, "--timeout", "3")
    assert r.code == 5, (r.code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"is not {noun}" in lines[0], r.stderr
    j = run_cli(*cmd, url, *rest, "--timeout", "3", "--json")
    assert j.code == 5 and j.json()["error"] == {"type": "negotiation", "message": lines[0][len("l4vctl: error: "):],
                                                 "exit_code": 5}  # fmt: skip


def test_expect_device_agrees_with_the_commands():
    assert run_cli("probe", "emu:blk", "--expect-device", "rng").code == 5
    assert run_cli("rng", "read", "emu:blk", "--bytes", "4").code == 5
    assert run_cli("probe", "emu:rng", "--expect-device", "rng").code == 0


# -- Ctrl-C with --json ---------------------------------------------------------------------------


def test_json_envelope_on_ctrl_c(tmp_path):
    env = dict(os.environ, L4VCTL_EMU_LOG="INFO", PYTHONPATH=str(pathlib.Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4vctl", "console", "recv", "emu:console", "--wait", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
        # a test run started in the background inherits SIGINT ignored; Ctrl-C must reach the command
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        # wait until the command is receiving (the device reached DRIVER_OK), then Ctrl-C
        seen = b""
        deadline = time.monotonic() + 20
        while b"status 0x0f" not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, seen.decode(errors="replace")
            if select.select([proc.stderr], [], [], left)[0]:
                seen += os.read(proc.stderr.fileno(), 4096)

        # and until it sleeps in its receive loop (the handshake's last steps are behind it)
        def sleeping():
            with open(f"/proc/{proc.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "S"

        deadline = time.monotonic() + 10
        while not (sleeping() and time.sleep(0.02) is None and sleeping()):
            assert time.monotonic() < deadline, "the command never waited for input"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 130, (seen + err).decode(errors="replace")
    envelope = json.loads(out)
    assert envelope["ok"] is False and envelope["command"] == "console recv" and envelope["device"] == "emu:console"
    assert envelope["error"] == {"type": "interrupted", "message": "interrupted", "exit_code": 130}
    assert b"l4vctl: error: interrupted" in err and b"Traceback" not in err


# -- help, URLs and messages a new user meets --------------------------------------------------------


def test_no_arguments_prints_help_on_stdout():
    for args in ([], ["blk"], ["net"]):
        r = run_cli(*args)
        assert r.code == 0 and r.stdout.startswith("Usage: l4vctl") and r.stderr == "", (args, r.stderr)


def test_vhost_user_in_every_help():
    from l4vctl import manpage

    wide = {"COLUMNS": "300"}
    assert "vhost-user:PATH[?type=T]" in run_cli("--help", env=wide).stdout
    for args in (["probe"], ["negotiate"], ["queue-stats"], ["blk", "read"], ["bench"], ["rng", "read"],
                 ["console", "recv"], ["net", "send"], ["dump-config"]):  # fmt: skip
        r = run_cli(*args, "--help", env=wide)
        unwrapped = re.sub(r"-\n\s+", "-", r.stdout)  # click may break a line after "vhost-"
        assert r.code == 0 and "vhost-user:PATH" in unwrapped, args
    for name, text in manpage.pages().items():
        assert "vhost\\-user:" in text, name


def test_a_socket_given_as_a_page_suggests_unix(tmp_path):
    path = tmp_path / "blk.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.bind(str(path))
        s.listen(1)
        for cmd in ("probe", "dump-config"):
            r = run_cli(cmd, str(path))
            assert r.code == 2, r.stderr
            assert "is a socket" in r.stderr and f"unix:{path}" in r.stderr and f"vhost-user:{path}" in r.stderr
    finally:
        s.close()
    r = run_cli("probe", str(tmp_path / "gone.sock"))
    assert r.code == 3 and f"unix:{tmp_path / 'gone.sock'}" in r.stderr


def test_socket_path_too_long(tmp_path):
    long_path = str(tmp_path / ("x" * 120 + ".sock"))
    r = run_cli("emulate", "blk", "--socket", long_path)
    assert r.code == 2, r.stderr
    assert "None" not in r.stderr and "at most 107 bytes" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(long_path)


def test_abi_from_the_environment_is_named():
    r = run_cli("probe", "emu:blk", env={"L4VCTL_ABI": "classic"})
    assert r.code == 0 and "chosen with L4VCTL_ABI" in r.stdout and "--abi" not in r.stdout
    j = run_cli("probe", "emu:blk", "--json", env={"L4VCTL_ABI": "classic"}).json()["result"]
    assert j["abi_detection"]["reason"] == "chosen with L4VCTL_ABI" and j["abi"] == "classic"
    assert "chosen with --abi" in run_cli("probe", "emu:blk", "--abi", "classic").stdout
    assert "chosen with --abi" in run_cli("probe", "emu:blk", "--abi", "classic", env={"L4VCTL_ABI": "current"}).stdout
