"""Start-up: what commands import, monitors of emu: served in this process, the fast exit.

No timing is asserted here (bench/startup.py measures); these tests pin the
behaviour the start-up work must keep.
"""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4vctl.backends.base import parse_qsl, parse_query
from l4vctl.errors import UsageError

# -- device URL options without urllib.parse ------------------------------------------------------

_QUERY_CHARS = st.sampled_from([*"ab=&%+;?2Ff0cC3A9 xg", "é", "©", "€", "\U0001f600", "%e2%82", "%C3%A9"])


@given(st.lists(_QUERY_CHARS, max_size=24).map("".join))
def test_query_parsing_matches_urllib(query):
    try:
        expected = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        with pytest.raises(ValueError):
            parse_qsl(query)
    else:
        assert parse_qsl(query) == expected


def test_parse_query_options_and_errors():
    assert parse_query("blk", "emu", "?size=1M") == ("blk", {})
    assert parse_query("blk?", "emu", "?size=1M") == ("blk", {})
    assert parse_query("blk?size=1M&image=/tmp/a%20b+c&ro=", "emu", "?size=1M") == (
        "blk",
        {"size": "1M", "image": "/tmp/a b c", "ro": ""},
    )
    with pytest.raises(UsageError, match="options must look like"):
        parse_query("blk?a&&b", "emu", "?size=1M")


# -- monitors of emu: devices, served in this process ----------------------------------------------

#: Device types with options: what the in-process page must reproduce byte for byte.
EMU_TARGETS = [
    "blk",
    "blk?size=1M&ro=1&serial=disk0",
    "blk?abi=classic",
    "blk?abi=classic&attach=iface",
    "blk?cmd_mode=1&queues=3&num_max=64",
    "blk?profile=l4re-ahci",
    "blk?profile=l4re-nvme&size=8M",
    "blk?ds_offset=0x2000&vendor=0x1234&max_regions=2",
    "blk?features=27,29&seg_max=0&size_max=0&blk_size=0",
    "blk?inject=bad-magic",
    "blk?inject=queues-offset-outside,never-clear-cmd",
    "net",
    "net?mac=02:00:00:00:00:01&mtu=9000&abi=classic",
    "net?profile=l4re-switch&mac=02:00:00:00:00:02",
    "net?mtu=0&queues=4&num_max=1024",
    "console",
    "console?cols=0&rows=0",
    "console?profile=l4re-cons",
    "console?cols=132&rows=50&cmd_mode=1&abi=classic",
    "rng",
    "rng?queues=2&num_max=32",
    "rng?abi=classic&cmd_mode=1&features=INDIRECT_DESC",
]


def _monitor_view(target: str, in_process: bool) -> dict:
    """Everything a monitor of ``emu:TARGET`` sees, served in this process or by a forked emulator."""
    from l4vctl import catalog as cat
    from l4vctl.backends.emu import EmuBackend, LocalChannel
    from l4vctl.session import Session

    backend = EmuBackend(f"emu:{target}", target)
    backend.in_process = in_process
    with Session(backend, role="monitor", check=False) as s:
        assert isinstance(s.channel, LocalChannel) is in_process
        assert (backend.pid is None) is in_process, "a forked emulator for a driver only"
        r = s.channel.call(cat.L4VIRTIO_PROTOCOL, cat.OP_DEVICE_CONFIG)
        config = (r.result, list(r.words), [(c.type, c.rights, c.handle, c.size) for c in r.caps], len(r.fds))
        r.close()
        refused = s.channel.call(cat.L4VIRTIO_PROTOCOL, cat.OP_SET_STATUS, [1])
        refused.close()
        info = s.channel.call(cat.L4_PROTO_IRQ, cat.ICU_OP_INFO)
        info.close()
        return {
            "page": s.page_bytes(),
            "writable": not s.page.readonly,
            "device_config": config,
            "set_status": refused.result,
            "icu_info": (info.result, list(info.words)),
            "stats": s.stats(),
            "decoded": s.decode().result,
        }


@pytest.mark.parametrize("target", EMU_TARGETS)
def test_in_process_monitor_sees_what_the_forked_emulator_serves(target):
    local = _monitor_view(target, in_process=True)
    forked = _monitor_view(target, in_process=False)
    assert local["page"] == forked["page"]  # byte for byte
    assert local == forked


def test_in_process_page_of_an_image_file(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(3 << 20))
    target = f"blk?image={image}&serial=img"
    assert _monitor_view(target, in_process=True) == _monitor_view(target, in_process=False)


def _json_of(monkeypatch, in_process: bool, *args: str) -> dict:
    from l4vctl.backends.emu import EmuBackend
    from tests.conftest import run_cli

    monkeypatch.setattr(EmuBackend, "in_process", in_process)
    r = run_cli(*args, "--json")
    assert r.code == 0, r.stderr
    env = r.json()
    env["result"].pop("time", None)  # queue-stats: when the sample was taken
    return env


@pytest.mark.parametrize(
    "args",
    [
        ["probe", "emu:blk"],
        ["probe", "emu:net?abi=classic", "--expect-device", "net"],
        ["dump-config", "emu:console?profile=l4re-cons"],
        ["dump-config", "emu:rng?cmd_mode=1"],
        ["queue-stats", "emu:blk?queues=2"],
        ["queue-stats", "emu:net"],
    ],
)
def test_read_only_commands_say_the_same_either_way(monkeypatch, args):
    assert _json_of(monkeypatch, True, *args) == _json_of(monkeypatch, False, *args)


def test_a_driver_still_gets_a_forked_emulator():
    from l4vctl.backends.emu import EmuBackend
    from l4vctl.backends.unix import SocketChannel
    from l4vctl.session import Session

    backend = EmuBackend("emu:blk", "blk")
    with Session(backend) as s:
        assert isinstance(s.channel, SocketChannel) and backend.pid is not None
        s.handshake()
    assert backend.pid is None and backend.exit_status == 0


def test_a_fault_in_request_handling_is_served_by_a_forked_emulator(cli):
    r = cli("probe", "emu:blk?inject=no-reply=DEVICE_CONFIG", "--timeout", "0.3")
    assert r.code == 7 and "no reply to DEVICE_CONFIG" in r.stderr, r.stderr


def test_in_process_monitor_page_is_read_only_and_closes_with_the_session():
    from l4vctl.session import Session

    s = Session("emu:blk", role="monitor")
    with s:
        with pytest.raises(TypeError):
            s.page[0] = 0
        device = s.channel.device
        assert device is not None
    assert s.page is None and s.backend._local is None
    with pytest.raises(ValueError):
        device.page[0]  # released with the session


# -- what start-up imports ------------------------------------------------------------------------


def _imported_by(*args: str) -> set[str]:
    """Modules ``main(args)`` imports beyond what ``import click`` does, in a fresh interpreter.

    Without site (its .pth files may import anything) but with its directories on the path.
    """
    import os
    import site
    import subprocess
    import sys

    import l4vctl

    code = (
        "import sys\n"
        "import click\n"
        "before = set(sys.modules)\n"
        "from l4vctl.cli import main\n"
        f"main({list(args)!r})\n"
        "sys.stderr.write(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    root = os.path.dirname(os.path.dirname(l4vctl.__file__))
    path = os.pathsep.join([root, *site.getsitepackages()])
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": path, "NO_COLOR": "1", "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return set(r.stderr.split())


NOT_NEEDED = {"socket", "selectors", "urllib.parse", "ipaddress", "locale", "signal"}


@pytest.mark.parametrize(
    "args",
    [
        ["probe", "emu:blk"],
        ["probe", "emu:blk?size=1M&abi=classic", "--json"],
        ["dump-config", "emu:rng"],
        ["queue-stats", "emu:console"],
        ["--version"],
    ],
)
def test_read_only_commands_import_no_sockets_urllib_or_locale(args):
    mods = _imported_by(*args)
    assert "l4vctl.cli" in mods
    assert not mods & NOT_NEEDED, sorted(mods & NOT_NEEDED)


def test_dump_config_of_a_file_imports_no_sockets_urllib_or_locale(tmp_path):
    from l4vctl import page

    src = tmp_path / "p.bin"
    src.write_bytes(bytes(page.build_page("current", 2)))
    mods = _imported_by("dump-config", str(src))
    assert "l4vctl.page" in mods and not mods & NOT_NEEDED, sorted(mods & NOT_NEEDED)


def test_help_imports_no_sockets_or_urllib():
    mods = _imported_by("--help")
    assert not mods & (NOT_NEEDED - {"locale"})  # help text goes through gettext, which needs locale


@pytest.mark.parametrize(
    "args", [["-h"], ["probe", "-h"], ["blk", "read", "--help"], ["console", "send", "-h"], ["rng", "--help"]]
)
def test_help_options_made_without_gettext_still_show_help(cli, args):
    r = cli(*args)
    assert r.code == 0 and r.stdout.startswith("Usage: l4vctl")
    assert "-h, --help" in r.stdout and "Show this message and exit." in r.stdout


def test_dump_config_output_file_is_checked_as_before(cli, tmp_path):
    r = cli("dump-config", "emu:blk", "--hex", "-o", str(tmp_path))
    assert r.code == 2 and f"Invalid value for '-o' / '--output': File '{tmp_path}' is a directory." in r.stderr
    r = cli("dump-config", "emu:blk", "--hex", "-o", str(tmp_path / "page.hex"))
    assert r.code == 0 and (tmp_path / "page.hex").read_text().startswith("#")


# -- the fast exit ---------------------------------------------------------------------------------

#: Loaded at start-up from PYTHONPATH: says on stderr whether atexit handlers ran, whether the
#: interpreter's teardown ran (a module global's __del__), and whether children were left unreaped.
_SITECUSTOMIZE = """\
import atexit
import os


def _at_exit():
    try:
        os.waitpid(-1, os.WNOHANG)
        left = "children left"
    except ChildProcessError:
        left = "no children"
    os.write(2, f"[atexit: {left}]\\n".encode())


atexit.register(_at_exit)


class _Teardown:
    def __init__(self):
        self.write = os.write

    def __del__(self):
        self.write(2, b"[teardown]\\n")


_probe = _Teardown()
"""

#: What the console script pip writes for the l4vctl entry point does.
_CONSOLE_SCRIPT = """\
#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from l4vctl.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


@pytest.fixture
def program(tmp_path):
    """Run l4vctl as a program: ``program("script", *args)`` (a console script) or
    ``program("-m", *args)`` (python -m l4vctl); returns the CompletedProcess (bytes)."""
    import os
    import subprocess
    import sys

    import l4vctl

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    script = tmp_path / "bin" / "l4vctl"
    script.parent.mkdir()
    script.write_text(_CONSOLE_SCRIPT.format(python=sys.executable))
    script.chmod(0o755)
    root = os.path.dirname(os.path.dirname(l4vctl.__file__))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "L4VCTL_"))}
    env.update(PYTHONPATH=f"{hooks}{os.pathsep}{root}", NO_COLOR="1", COLUMNS="80")  # stdout block-buffered

    def run(how: str, *args: str, stdout=subprocess.PIPE):
        argv = [str(script)] if how == "script" else [sys.executable, "-m", "l4vctl"]
        return subprocess.run([*argv, *args], stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=60)

    return run


@pytest.mark.parametrize("how", ["script", "-m"])
def test_a_command_run_as_the_program_skips_the_teardown_and_keeps_its_output(program, how, cli):
    r = program(how, "probe", "emu:blk")
    assert r.returncode == 0
    assert r.stdout.decode() == cli("probe", "emu:blk").stdout  # flushed: nothing lost
    assert b"[atexit: no children]" in r.stderr and b"[teardown]" not in r.stderr


@pytest.mark.parametrize("how", ["script", "-m"])
def test_exit_codes_and_error_envelopes_survive_the_fast_exit(program, how):
    import json

    r = program(how, "probe", "emu:nope")
    assert r.returncode == 2 and b"unknown device type 'nope'" in r.stderr
    r = program(how, "dump-config", "/nonexistent/page.bin", "--json")
    env = json.loads(r.stdout)
    assert r.returncode == env["error"]["exit_code"] != 0 and env["ok"] is False
    r = program(how, "probe", "emu:blk?inject=no-reply=DEVICE_CONFIG", "--timeout", "0.2")
    assert r.returncode == 7, r.stderr
    assert b"[atexit: no children]" in r.stderr and b"[teardown]" not in r.stderr


def test_output_larger_than_a_pipe_is_all_delivered(program, cli):
    r = program("script", "layout")
    expected = cli("layout").stdout_bytes
    assert r.returncode == 0 and len(expected) > 16384 and r.stdout == expected


def test_the_forked_emulator_of_a_driver_is_reaped_before_the_fast_exit(program):
    r = program("script", "negotiate", "emu:blk", "--json")
    assert r.returncode == 0, r.stderr
    assert b"[atexit: no children]" in r.stderr and b"[teardown]" not in r.stderr


_FAILING_FLUSH = """\
import errno, io, sys
from l4vctl import cli


class Failing(io.StringIO):
    def flush(self):
        raise {error}


sys.stdout = Failing()
code = cli._flush_output({code})
sys.stdout = sys.__stdout__
sys.stderr.write(f"[code {{code}}]")
"""


@pytest.mark.parametrize(
    ("error", "code", "expected", "message"),
    [
        ("BrokenPipeError(errno.EPIPE, 'Broken pipe')", 0, 0, False),  # the reader went away: not ours
        ("OSError(errno.ENOSPC, 'No space left on device')", 0, 1, True),
        ("OSError(errno.ENOSPC, 'No space left on device')", 4, 4, False),  # the failure was reported already
        ("ValueError('I/O operation on closed file')", 3, 3, False),
    ],
)
def test_a_failed_final_flush(error, code, expected, message):
    import os
    import subprocess
    import sys

    import l4vctl

    root = os.path.dirname(os.path.dirname(l4vctl.__file__))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"PYTHONPATH": root}
    script = _FAILING_FLUSH.format(error=error, code=code)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stderr.endswith(f"[code {expected}]"), r.stderr
    assert ("l4vctl: error: cannot write the output: No space left on device" in r.stderr) is message
    assert "Traceback" not in r.stderr


def test_main_called_by_other_code_returns(monkeypatch):
    import sys

    from l4vctl import cli

    monkeypatch.setattr(sys, "argv", ["l4vctl", "--version"])
    assert cli.main() == 0  # from a function, not the top of __main__: no exit
    assert not cli._called_as_program(sys._getframe())


def test_exit_now_reaps_an_emulator_left_running(tmp_path):
    import os
    import subprocess
    import sys

    import l4vctl

    (tmp_path / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    code = (
        "from l4vctl import cli\n"
        "from l4vctl.session import Session\n"
        "s = Session('emu:blk')\n"
        "s.open()\n"
        "assert s.backend.pid\n"
        "cli._exit_now(5)\n"
    )
    root = os.path.dirname(os.path.dirname(l4vctl.__file__))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{root}"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    assert r.returncode == 5, r.stderr
    assert b"[atexit: no children]" in r.stderr and b"[teardown]" not in r.stderr
