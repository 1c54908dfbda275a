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
