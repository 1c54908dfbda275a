"""``l4vctl layout``: offsets of the spec, selection, JSON shape, bad options."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.golden import check_golden
from tests.test_formats_spec import CLASSIC, CURRENT, QUEUE


def layout_json(*args):
    r = run_cli("layout", *args, "--json")
    assert r.code == 0, r.stderr
    env = r.json()
    assert env["ok"] is True and env["command"] == "layout"
    return env


@pytest.mark.parametrize("abi,table", [("classic", CLASSIC), ("current", CURRENT)])
def test_header_offsets_are_the_spec(abi, table):
    env = layout_json("--abi", abi)
    assert env["abi"] == abi and env["result"]["abi"] == abi
    hdr = env["result"]["structs"]["l4virtio_config_hdr_t"]
    assert hdr["size"] == 256
    assert [(f["offset"], f["size"], f["name"]) for f in hdr["fields"]] == table
    q = env["result"]["structs"]["l4virtio_config_queue_t"]
    assert q["size"] == 40
    named = [(f["offset"], f["size"], f["name"]) for f in q["fields"] if not f.get("padding")]
    assert named == QUEUE
    assert q["fields"][-1] == {"name": "(padding)", "offset": 34, "size": 6, "type": "u8", "count": 6,
                               "padding": True, "meaning": "padding"}  # fmt: skip


def test_arrays_are_one_field_with_total_size():
    hdr = layout_json("--abi", "classic", "l4virtio_config_hdr_t")["result"]["structs"]["l4virtio_config_hdr_t"]
    maps = {f["name"]: f for f in hdr["fields"]}
    assert maps["dev_features_map"] == {"name": "dev_features_map", "offset": 0xA8, "size": 32, "type": "u32",
                                        "count": 8, "meaning": "R: device-offered features, bits 0..255"}  # fmt: skip
    assert maps["_res7"]["size"] == 12


def test_all_structs_listed_with_sizes():
    structs = layout_json()["result"]["structs"]
    sizes = {name: s["size"] for name, s in structs.items()}
    assert sizes["vring_desc"] == 16 and sizes["vring_avail"] == 2 * 256 + 6 and sizes["vring_used"] == 8 * 256 + 6
    assert sizes["l4virtio_block_config_t"] == 72 and sizes["l4virtio_net_config_t"] == 24
    assert sizes["virtio_console_config"] == 12 and sizes["l4virtio_input_config_t"] == 136
    assert sizes["virtio_vsock_config"] == 8 and sizes["l4virtio_rng_config_t"] == 0
    assert sizes["cmd_word"] == 4
    for s in structs.values():  # fields tile each struct exactly
        pos = 0
        for f in s["fields"]:
            assert f["offset"] == pos
            pos += f["size"]
        assert pos == s["size"]


def test_nested_struct_members_are_listed():
    blk = layout_json("l4virtio_block_config_t")["result"]["structs"]["l4virtio_block_config_t"]
    geometry = next(f for f in blk["fields"] if f["name"] == "geometry")
    assert [(m["name"], m["offset"]) for m in geometry["fields"]] == [("cylinders", 16), ("heads", 18), ("sectors", 19)]


def test_selection_by_glob_and_num():
    r = layout_json("vring_*", "--num", "8")["result"]
    assert list(r["structs"]) == ["vring_desc", "vring_avail", "vring_used_elem", "vring_used"]
    assert r["structs"]["vring_used"]["size"] == 8 * 8 + 6 and r["num"] == 8


def test_i386_stride():
    q = layout_json("--queue-stride", "36", "l4virtio_config_queue_t")["result"]["structs"]["l4virtio_config_queue_t"]
    assert q["size"] == 36 and q["fields"][-1]["size"] == 2


def test_unknown_struct_is_a_usage_error():
    r = run_cli("layout", "no_such_struct")
    assert r.code == 2 and r.stdout == ""
    assert r.stderr.startswith("l4vctl: error: no struct matches 'no_such_struct'")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--num", "3"], ["--num", "0"], ["--num", "65536"], ["--num", "x"],
                                  ["--abi", "modern"], ["--queue-stride", "32"]])  # fmt: skip
def test_bad_options(args):
    r = run_cli("layout", *args)
    assert r.code == 2 and "Traceback" not in r.stderr
    j = run_cli("layout", *args, "--json")
    assert j.code == 2 and j.json()["error"]["type"] == "usage"


def test_golden_text_current_header():
    r = run_cli("layout", "l4virtio_config_hdr_t", "l4virtio_config_queue_t")
    assert r.code == 0
    check_golden("layout-current-header.txt", r.stdout)


def test_abi_from_environment():
    r = run_cli("layout", "--json", env={"L4VCTL_ABI": "classic"})
    assert r.json()["abi"] == "classic"


def test_abi_auto_means_current():
    assert layout_json("--abi", "auto")["abi"] == "current"
    assert run_cli("layout", "--json", env={"L4VCTL_ABI": "auto"}).json()["abi"] == "current"
