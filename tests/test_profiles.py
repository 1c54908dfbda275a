"""Emulator profiles: the config pages of real L4Re device servers, byte for byte.

The golden pages in tests/golden/l4re/ were read from the real servers (cons,
l4vio_switch, ahci-drv and nvme-drv on a 4 MiB disk) through the l4re: bridge,
fresh and after one driver session (``Session.handshake()``, then close).
Each profile is started for real (embedded ``emu:`` or an ``l4vctl emulate``
process), its page is read with ``dump-config --hex``, and every byte is
compared, except the switch's MAC, which the real switch draws at random.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from l4vctl import catalog as cat
from l4vctl.emulator.models import MODELS, model_class
from l4vctl.hexdump import parse_hexdump
from l4vctl.session import Session
from tests.conftest import run_cli
from tests.emu import emulator

GOLDEN = Path(__file__).resolve().parent / "golden" / "l4re"
MAC = range(0x100, 0x106)
#: type, profile, extra emulate options, golden page name (without -fresh / -after-session), bytes not compared
PROFILES = [
    ("console", "l4re-cons", ["--io", "null"], "con0", ()),
    ("net", "l4re-switch", [], "net0", MAC),
    ("blk", "l4re-ahci", ["--size", "4M"], "blk0", ()),
    ("blk", "l4re-nvme", ["--size", "4M"], "blk0-nvme", ()),
]
IDS = [p[1] for p in PROFILES]


def golden(name: str) -> bytes:
    data, _hints = parse_hexdump((GOLDEN / f"{name}.hex").read_text())
    assert len(data) == cat.PAGE_SIZE
    return data


def page(url: str) -> bytes:
    r = run_cli("dump-config", url, "--hex")
    assert r.code == 0, r.stderr
    data, _hints = parse_hexdump(r.stdout)
    return data


def differences(got: bytes, want: bytes, skip=()) -> list[str]:
    """The offsets where two pages differ, with both bytes (empty when they are equal)."""
    assert len(got) == len(want) == cat.PAGE_SIZE
    return [f"{i:#05x}: {got[i]:02x} not {want[i]:02x}" for i in range(len(got)) if got[i] != want[i] and i not in skip]


def url_of(kind: str, profile: str, extra: list[str]) -> str:
    query = [f"profile={profile}"] + [f"{extra[i].lstrip('-')}={extra[i + 1]}" for i in range(0, len(extra), 2)]
    return f"emu:{kind}?" + "&".join(query)


@pytest.mark.parametrize("kind,profile,extra,name,skip", PROFILES, ids=IDS)
def test_fresh_page_is_the_real_servers(kind, profile, extra, name, skip):
    assert differences(page(url_of(kind, profile, extra)), golden(f"{name}-fresh"), skip) == []


@pytest.mark.parametrize("kind,profile,extra,name,skip", PROFILES, ids=IDS)
def test_page_after_a_driver_session_is_the_real_servers(tmp_path, kind, profile, extra, name, skip):
    """Generation, published features, the driver's leftovers the device keeps: as on L4Re."""
    with emulator(tmp_path, kind, "--profile", profile, *extra) as (url, _proc):
        assert differences(page(url), golden(f"{name}-fresh"), skip) == []
        with Session(url) as s:
            s.handshake()
            assert s.status == cat.STATUS_RUNNING
        assert differences(page(url), golden(f"{name}-after-session"), skip) == []


def test_goldens_differ_where_the_profiles_must_act():
    """The comparisons above are not vacuous: the default models and the fresh pages differ."""
    for kind, _profile, extra, name, skip in PROFILES:
        default = page(f"emu:{kind}?" + "&".join(f"{extra[i].lstrip('-')}={extra[i + 1]}"
                                                 for i in range(0, len(extra), 2)))  # fmt: skip
        assert differences(default, golden(f"{name}-fresh"), skip), kind
    assert golden("blk0-fresh") != golden("blk0-after-session")
    assert golden("con0-after-session")[0x124] == 1  # cons leaves ready as the driver set it


@pytest.mark.parametrize("profile,offered", [("l4re-ahci", 0x10000A06), ("l4re-nvme", 0x10004A06)])
def test_block_profiles_publish_their_features_at_the_first_reset(profile, offered):
    with Session(f"emu:blk?profile={profile}&size=4M") as s:
        assert s.words("dev_features_map")[:2] == [0, 1]  # VERSION_1 only, as the real servers
        assert s.get("generation") == 0
        s.reset()
        assert s.words("dev_features_map")[:2] == [offered, 1]
        assert s.get("generation") == 1
        s.handshake()
        assert s.negotiated >= {cat.BLK_F_SIZE_MAX, cat.BLK_F_SEG_MAX, cat.BLK_F_FLUSH, cat.VERSION_1_BIT}
        s.reset()
        assert s.words("dev_features_map")[:2] == [offered, 1]
        assert s.get("generation") == 3


def test_a_driver_that_does_not_reset_sees_only_version_1():
    with Session("emu:blk?profile=l4re-ahci&size=4M") as s:
        assert s.offered() == {cat.VERSION_1_BIT}


@pytest.mark.parametrize("profile,code", [("l4re-ahci", 6), ("l4re-nvme", 0)])
def test_write_zeroes_only_where_offered(profile, code):
    """ahci-drv answers UNSUPP to WRITE_ZEROES (it does not offer it); nvme-drv zeroes."""
    r = run_cli("blk", "write-zeroes", f"emu:blk?profile={profile}&size=4M", "--sector", "0", "--count", "8")
    assert r.code == code, r.stderr
    assert ("UNSUPP" in r.stderr) == (code != 0)


def test_switch_mac_is_random_locally_administered_unless_given():
    macs = {page("emu:net?profile=l4re-switch")[0x100:0x106] for _ in range(3)}
    assert len(macs) == 3
    for mac in macs:
        assert mac[0] & 0x02 and not mac[0] & 0x01  # locally administered, unicast
    given = page("emu:net?profile=l4re-switch&mac=02:11:22:33:44:55")
    assert given[0x100:0x106] == bytes.fromhex("021122334455")
    assert differences(given, golden("net0-fresh"), MAC) == []


def test_explicit_options_win_over_the_profile():
    data = page("emu:blk?profile=l4re-ahci&size=8M&seg_max=8")
    capacity, _size_max, seg_max = struct.unpack_from("<QII", data, 0x100)
    assert (capacity, seg_max) == (16384, 8)
    assert differences(data, golden("blk0-fresh"), range(0x100, 0x110)) == []
    cons = page("emu:console?profile=l4re-cons&cols=100&rows=30&num_max=64")
    assert struct.unpack_from("<HH", cons, 0x100) == (100, 30)
    assert struct.unpack_from("<I", cons, 0xC0)[0] == 1 << cat.CONSOLE_F_SIZE
    assert struct.unpack_from("<H", cons, 0x120)[0] == 64


def test_a_config_field_the_server_has_no_room_for_is_refused():
    r = run_cli("dump-config", "emu:net?profile=l4re-switch&mtu=1500")
    assert r.code == 2
    assert "mtu" in r.stderr and "10 bytes" in r.stderr


def test_unknown_profile_is_a_one_line_usage_error():
    r = run_cli("dump-config", "emu:console?profile=l4re-ahci")
    assert r.code == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "console: unknown profile 'l4re-ahci'" in r.stderr
    for name in IDS:
        assert name in r.stderr


def test_unknown_profile_from_emulate(tmp_path):
    sock = tmp_path / "x.sock"
    r = subprocess.run([sys.executable, "-m", "l4vctl", "emulate", "rng", "--socket", str(sock), "--profile", "qemu"],
                       capture_output=True, text=True, timeout=20)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "rng: unknown profile 'qemu'" in r.stderr
    assert all(name in r.stderr for name in IDS)
    assert not sock.exists()


def test_help_teaches_every_profile():
    r = run_cli("emulate", "--help")
    assert r.code == 0
    text = " ".join(r.stdout.split())
    assert "--profile NAME" in text
    for kind in MODELS:
        for name in model_class(kind).PROFILES:
            assert f"{kind}: {name}" in text
    assert {name for kind in MODELS for name in model_class(kind).PROFILES} == set(IDS)
