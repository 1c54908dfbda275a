"""The root command: version, help, error mapping, start-up cost, entry points."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import l4vctl
from l4vctl.errors import EXIT_CODES
from tests.conftest import CLEAN_ENV, run_cli

ENV = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV} | {"NO_COLOR": "1", "COLUMNS": "80"}


def test_version():
    r = run_cli("--version")
    assert r.code == 0 and r.stdout.strip() == f"l4vctl, version {l4vctl.__version__}"


def test_help_lists_commands_and_exit_codes():
    r = run_cli("--help")
    assert r.code == 0
    for name in (
        "layout",
        "dump-config",
        "probe",
        "negotiate",
        "queue-stats",
        "emulate",
        "backends",
        "blk",
        "rng",
        "console",
        "net",
        "bench",
    ):
        assert name in r.stdout
    for code, _text in EXIT_CODES:
        assert f"{code:>3}  " in r.stdout


@pytest.mark.parametrize(
    "command", ["layout", "dump-config", "probe", "negotiate", "queue-stats", "emulate", "backends"]
)
def test_every_command_has_json_and_examples(command):
    r = run_cli(command, "--help")
    assert r.code == 0 and "--json" in r.stdout and "Examples:" in r.stdout


def test_unknown_command():
    r = run_cli("frobnicate")
    assert r.code == 2 and "No such command 'frobnicate'" in r.stderr
    j = run_cli("frobnicate", "--json")
    assert j.code == 2 and j.json()["ok"] is False


def test_missing_argument_json_envelope():
    r = run_cli("dump-config", "--json")
    assert r.code == 2
    env = r.json()
    assert env["command"] == "dump-config" and env["error"]["type"] == "usage"
    assert "Missing argument 'SOURCE'" in env["error"]["message"]


def test_internal_error_is_one_line_without_debug(monkeypatch, tmp_path):
    import l4vctl.page

    def boom(*a, **k):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(l4vctl.page, "decode_page", boom)
    src = tmp_path / "p.bin"
    src.write_bytes(bytes(l4vctl.page.build_page("current", 2)))
    r = run_cli("dump-config", src)
    assert r.code == 1
    assert "internal error: RuntimeError: synthetic failure" in r.stderr and "Traceback" not in r.stderr
    d = run_cli("--debug", "dump-config", src)
    assert d.code == 1 and "Traceback" in d.stderr
    j = run_cli("dump-config", src, "--json")
    assert j.json()["error"] == {"type": "internal", "message": "internal error: RuntimeError: synthetic failure",
                                 "exit_code": 1}  # fmt: skip


def test_keyboard_interrupt_is_130(monkeypatch, tmp_path):
    import l4vctl.page

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(l4vctl.page, "decode_page", interrupted)
    src = tmp_path / "p.bin"
    src.write_bytes(bytes(l4vctl.page.build_page("current", 2)))
    r = run_cli("dump-config", src)
    assert r.code == 130 and r.stderr.strip() == "l4vctl: error: interrupted"


def test_python_dash_m_and_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "l4vctl", "--version"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and l4vctl.__version__ in r.stdout
    exe = os.path.join(os.path.dirname(sys.executable), "l4vctl")
    assert os.path.exists(exe), "the console script is installed with the package"
    r = subprocess.run([exe, "layout", "vring_desc"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and "vring_desc" in r.stdout


def test_broken_pipe_is_quiet():
    code = "import sys; sys.stdin.close()"
    p1 = subprocess.Popen(
        [sys.executable, "-m", "l4vctl", "layout"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    p2 = subprocess.run([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=p1.stdout, env=ENV)
    p1.stdout.close()
    _out, err = p1.communicate(timeout=30)
    assert p2.returncode == 0 and p1.returncode == 0
    assert b"Traceback" not in err and b"Exception ignored" not in err, err
    del code


def _modules_after(*args: str) -> set[str]:
    code = (
        "import sys\n"
        "from l4vctl.cli import main\n"
        "try:\n"
        f"    main({list(args)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "sys.stderr.write(' '.join(sorted(sys.modules)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    return set(r.stderr.split())


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["layout", "--help"],
        ["dump-config", "--help"],
        ["--version"],
        ["probe", "--help"],
        ["negotiate", "--help"],
        ["emulate", "--help"],
    ],
)
def test_help_imports_neither_rich_nor_construct(args):
    mods = _modules_after(*args)
    assert "click" in mods
    assert "rich" not in mods and "construct" not in mods


def test_dump_config_text_without_tty_does_not_import_rich_or_construct(tmp_path):
    import l4vctl.page

    src = tmp_path / "p.bin"
    src.write_bytes(bytes(l4vctl.page.build_page("current", 2)))
    mods = _modules_after("dump-config", str(src))
    assert "l4vctl.page" in mods
    assert "rich" not in mods and "construct" not in mods


def test_probe_emu_imports_neither_rich_nor_construct():
    mods = _modules_after("probe", "emu:blk")
    assert "l4vctl.session" in mods
    assert "rich" not in mods and "construct" not in mods and "logging" not in mods
