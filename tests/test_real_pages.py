"""Config pages shaped like those of real L4Re devices.

A device config is as long as the device makes it.  The l4vio_switch's net
port publishes only mac, status and max_virtqueue_pairs (10 bytes, padded to
16), so its queue array starts at 0x110, before the end of the 24-byte
virtio_net_config.  Such pages must decode (exit 0): the fields before the
queue array are shown and the others are named as cut off.

The pages are written with plain ``struct`` at the offsets of the protocol
notes, not with l4vctl's schemas.
"""

from __future__ import annotations

import json
import struct

import pytest

from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl.session import Session
from tests.conftest import run_cli
from tests.pages import CLASS_PAGES, device_page, independent_page

MAC = bytes.fromhex("02080f2a0001")
SWITCH_CUT = ["duplex", "rss_max_key_size", "rss_max_indirection_table_length", "supported_hash_types"]


def switch_page(abi: str) -> bytes:
    """A net port of l4vio_switch: 10-byte config padded to 16, two queues at 0x110."""
    features = [(1 << 5) | (1 << 16), 1]  # MAC, STATUS; VERSION_1
    p = bytearray(independent_page(abi, device=1, status=0x0F, dev_words=features, drv_words=features,
                                   num_queues=2, queues_offset=0x110,
                                   queue=(256, 256, 1, 0, 0x10000, 0x11000, 0x12000, 0)))  # fmt: skip
    struct.pack_into("<6sHH", p, 0x100, MAC, 1, 1)  # mac, status LINK_UP, max_virtqueue_pairs
    struct.pack_into("<HHHHQQQH", p, 0x110 + 40, 256, 256, 1, 1, 0x20000, 0x21000, 0x22000, 1)
    return bytes(p)


@pytest.fixture(params=["current", "classic"])
def switch_file(request, tmp_path):
    path = tmp_path / f"switch-{request.param}.bin"
    path.write_bytes(switch_page(request.param))
    return request.param, path


def test_switch_page_decodes_with_json(switch_file):
    abi, path = switch_file
    r = run_cli("dump-config", str(path), "--json")
    assert r.code == 0, r.stderr
    res = json.loads(r.stdout)["result"]
    assert res["abi"] == abi and res["problems"] == []
    dc = res["device_config"]
    assert dc["struct"] == "l4virtio_net_config_t" and dc["present"] == 16 and dc["size"] == 24
    f = dc["fields"]
    assert f["mac"] == "02:08:0f:2a:00:01"
    assert f["status"] == 1 and f["status_flags"] == ["LINK_UP"]
    assert f["max_virtqueue_pairs"] == 1
    assert dc["truncated_fields"] == SWITCH_CUT
    assert not set(SWITCH_CUT) & set(f)
    assert [q["num_max"] for q in res["queues"]] == [256, 256]
    assert [q["desc_addr"] for q in res["queues"]] == [0x10000, 0x20000]
    assert any("fields not present: " + ", ".join(SWITCH_CUT) in n for n in res["notes"])


def test_switch_page_decodes_as_text(switch_file):
    _abi, path = switch_file
    r = run_cli("dump-config", str(path))
    assert r.code == 0, r.stderr
    assert r.stderr == ""
    out = r.stdout
    assert "Device config (l4virtio_net_config_t at 0x100, 16 of 24 bytes)" in out
    assert "mac:                 02:08:0f:2a:00:01" in out
    assert "status:              0x1 LINK_UP+ ANNOUNCE-" in out
    assert "max_virtqueue_pairs: 1" in out
    assert "duplex:" not in out
    assert "lie before the queue array at 0x110; fields not present: " + ", ".join(SWITCH_CUT) in out
    assert "Queues (2 at 0x110, stride 40)" in out


def test_switch_page_through_probe(switch_file):
    _abi, path = switch_file
    r = run_cli("probe", str(path), "--json")
    assert r.code == 0, r.stderr


def test_switch_page_through_session(switch_file):
    _abi, path = switch_file
    with Session(f"dump:{path}") as s:
        cfg = s.device_config()
    assert bytes(cfg["mac"]) == MAC and cfg["status"] == 1 and cfg["max_virtqueue_pairs"] == 1
    assert not set(SWITCH_CUT) & set(cfg)


@pytest.mark.parametrize("cls", sorted(CLASS_PAGES))
@pytest.mark.parametrize("abi", cat.ABIS)
def test_every_queues_offset_before_the_config_end_decodes(cls, abi):
    """Any queue array start from 0x100 to the end of our struct: no problem, cut fields named."""
    base = bytearray(device_page(abi, cls, **CLASS_PAGES[cls]))
    hc = pg.header_codec(abi)
    dc = pg.device_config_codec(cat.DEVICE_CLASSES[cls], abi)
    qoff_field = hc.fields["queues_offset"][0]
    full = pg.queues_offset_for(cat.DEVICE_CLASSES[cls], abi)
    entry = bytes(base[full : full + 40])
    for qoff in range(0x100, 0x100 + dc.size + 8, 8):
        data = bytearray(base)
        struct.pack_into("<I", data, hc.fields["num_queues"][0], 1)
        struct.pack_into("<I", data, qoff_field, qoff)
        data[qoff : qoff + 40] = entry
        d = pg.decode_page(data, pg.AbiChoice(abi, "explicit", "test"))
        assert d.problems == [], (qoff, d.problems)
        cfg = d.result["device_config"]
        present = min(dc.size, qoff - 0x100)
        assert cfg["present"] == present
        top = [n for n in dc.fields if "." not in n]
        for name in cfg["truncated_fields"]:
            off, size, _f, _c = dc.fields[name]
            assert off + size > present
        kept = [n for n in top if n not in cfg["truncated_fields"]]
        for name in kept:
            off, size, _f, _c = dc.fields[name]
            assert off + size <= present
        assert (present < dc.size) == bool(cfg["truncated_fields"]) or not top
        with_notes = any("fields not present" in n for n in d.result["notes"])
        assert with_notes == bool(cfg["truncated_fields"])
