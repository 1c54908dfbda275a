"""``l4vctl dump-config`` on offline pages: decoding, round trips, bad input."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4vctl import page as pg
from tests.conftest import run_cli
from tests.golden import check_golden
from tests.pages import CLASS_PAGES, device_page, independent_page

ABIS = ("classic", "current")


def write(tmp_path, data: bytes, name="page.bin"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def ok_json(*args, **kw):
    r = run_cli("dump-config", *args, "--json", **kw)
    assert r.code == 0, r.stderr
    env = r.json()
    assert env["ok"] is True and env["schema"] == 1 and env["command"] == "dump-config"
    return env


# -- decoding ----------------------------------------------------------------------


@pytest.mark.parametrize("abi", ABIS)
def test_independent_page_decodes_at_spec_offsets(tmp_path, abi):
    words = 8 if abi == "classic" else 6
    dev = [1 << 28 | 1 << 9, 1] + [0] * (words - 2)
    dev[-1 if abi == "classic" else 5] |= 1  # CMD_CONFIG: bit 224 classic, 160 current
    data = independent_page(
        abi, dev_words=dev, drv_words=[1 << 28, 1], cmd=0x01000003, cfg_drv=2, cfg_dev=5,
        queue=(256, 128, 1, 0, 0x200000, 0x200800, 0x200908, 3),
    )  # fmt: skip
    env = ok_json(write(tmp_path, data), "--abi", abi)
    r = env["result"]
    assert env["abi"] == abi and r["abi_detection"]["method"] == "explicit"
    h = r["header"]
    assert (h["magic"], h["version"], h["device"], h["vendor"]) == (0x74726976, 2, 2, 0x44)
    assert h["generation"] == 7 and h["cfg_driver_notify_index"] == 2 and h["cfg_device_notify_index"] == 5
    assert r["status"]["flags"] == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"]
    assert r["status"]["running"] is True
    assert r["cmd"]["command"] == "SET_STATUS" and r["cmd"]["argument"] == 3
    assert r["cmd"]["status"]["flags"] == ["ACKNOWLEDGE", "DRIVER"]
    cmd_bit = 224 if abi == "classic" else 160
    offered = r["features"]["offered"]
    assert offered["bits"] == [9, 28, 32, cmd_bit]
    assert offered["names"] == ["VIRTIO_BLK_F_FLUSH", "VIRTIO_F_INDIRECT_DESC", "VIRTIO_F_VERSION_1",
                                "L4VIRTIO_FEATURE_CMD_CONFIG"]  # fmt: skip
    assert r["features"]["accepted"]["bits"] == [28, 32]
    q = r["queues"][0]
    assert q["offset"] == 0x140
    assert (q["num_max"], q["num"], q["ready"], q["desc_addr"], q["avail_addr"], q["used_addr"]) == (
        256, 128, 1, 0x200000, 0x200800, 0x200908)  # fmt: skip
    assert q["device_notify_index"] == 3
    assert r["device_config"]["struct"] == "l4virtio_block_config_t"


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("cls", sorted(CLASS_PAGES))
def test_every_device_class_in_both_eras(tmp_path, abi, cls):
    data = device_page(abi, cls, **CLASS_PAGES[cls])
    env = ok_json(write(tmp_path, data))
    r = env["result"]
    assert env["abi"] == abi, r["abi_detection"]
    assert r["abi_detection"]["method"] == "auto" and not r["abi_detection"]["ambiguous"]
    assert r["device"]["class"] == cls
    assert r["problems"] == []
    assert len(r["queues"]) == CLASS_PAGES[cls].get("num_queues", 1)
    fields = r["device_config"]["fields"]
    if cls == "blk":
        assert fields["capacity"] == 131072 and fields["capacity_bytes"] == 64 << 20 and fields["seg_max"] == 126
        assert ("num_queues" in fields) == (abi == "current")
    elif cls == "net":
        assert fields["mac"] == "52:54:00:12:34:56" and fields["status_flags"] == ["LINK_UP"]
        assert fields["mtu"] == 1500
    elif cls == "console":
        assert (fields["cols"], fields["rows"]) == (80, 25)
    elif cls == "input":
        assert fields["decoded"] == {"select": "ID_NAME", "string": "mouse"}
    elif cls == "vsock":
        assert fields["guest_cid"] == 3
    elif cls == "rng":
        assert fields == {} and r["header"]["queues_offset"] == 0x110
    # text output decodes the same page without error
    t = run_cli("dump-config", write(tmp_path, data))
    assert t.code == 0 and t.stderr == ""
    assert f"{r['device']['name']}" in t.stdout


def test_queue_offsets_follow_l4re_placement():
    assert [pg.queues_offset_for(d, "current") for d in (2, 1, 3, 4, 18, 19)] == [
        0x140, 0x120, 0x110, 0x110, 0x190, 0x110]  # fmt: skip


def test_unknown_device_shows_raw_config(tmp_path):
    data = bytearray(independent_page("current", device=41, queues_offset=0x120, num_queues=1))
    data[0x100:0x104] = b"\x01\x02\x03\x04"
    r = ok_json(write(tmp_path, bytes(data)))["result"]
    assert r["device"] == {"id": 41, "name": "GPIO", "class": None}
    assert r["device_config"]["struct"] is None
    assert r["device_config"]["raw"].startswith("01020304") and r["device_config"]["size"] == 0x20


def test_unknown_feature_bits_are_kept(tmp_path):
    data = independent_page("current", dev_words=[1 << 28 | 1 << 3, 1 | 1 << 20, 0, 0, 0, 1 << 7])
    r = ok_json(write(tmp_path, data))["result"]
    offered = r["features"]["offered"]
    assert offered["unknown_bits"] == [3, 52, 167]
    assert offered["unknown_mask"] == (1 << 3) | (1 << 52) | (1 << 167)
    t = run_cli("dump-config", write(tmp_path, data))
    assert "unknown offered bits: 3, 52, 167" in t.stdout


def test_accepted_but_not_offered_is_noted(tmp_path):
    data = independent_page("current", drv_words=[1 << 5, 1])
    r = ok_json(write(tmp_path, data))["result"]
    assert any("does not offer: 5" in n for n in r["notes"])


def test_nonzero_reserved_words_are_noted(tmp_path):
    data = bytearray(independent_page("current"))
    struct.pack_into("<I", data, 0x58, 0xABC)  # _res5[1]
    r = ok_json(write(tmp_path, bytes(data)))["result"]
    assert "reserved _res5 is not zero: 0x0 0xabc 0x0" in r["notes"]
    assert r["header"]["_res5"] == [0, 0xABC, 0]


def test_classic_page_with_new_era_cmd_is_noted(tmp_path):
    data = independent_page("classic", cmd=0x08000001)
    r = ok_json(write(tmp_path, data), "--abi", "classic")["result"]
    assert r["cmd"]["command"] == "NOTIFY_QUEUE"
    assert any("does not exist in the classic era" in n for n in r["notes"])


def test_auto_ambiguous_page_says_so(tmp_path):
    # A classic console without multiport: VERSION_1 at 0xAC, CMD_CONFIG (224)
    # offered puts bit 0 at 0xC4 too, and no low feature bits decide.
    data = independent_page("classic", device=3, dev_words=[0, 1, 0, 0, 0, 0, 0, 1], queues_offset=0x110)
    env = ok_json(write(tmp_path, data))
    det = env["result"]["abi_detection"]
    assert env["abi"] == "current" and det["ambiguous"] is True and "ambiguous" in det["reason"]
    t = run_cli("dump-config", write(tmp_path, data))
    assert "abi:    current (auto: ambiguous" in t.stdout


def test_auto_resolves_double_bit_with_feature_word_0(tmp_path):
    data = independent_page("classic", device=2, dev_words=[1 << 28, 1, 0, 0, 0, 0, 0, 1])
    env = ok_json(write(tmp_path, data))
    assert env["abi"] == "classic" and "0xA8" in env["result"]["abi_detection"]["reason"]


def test_i386_queue_stride(tmp_path):
    data = bytearray(independent_page("current", num_queues=2, queue=(256, 64, 1, 0, 0x1000, 0x1400, 0x1600, 0)))
    struct.pack_into("<HHHHQQQH", data, 0x140 + 36, 128, 32, 1, 0, 0x2000, 0x2200, 0x2400, 1)
    r = ok_json(write(tmp_path, bytes(data)), "--queue-stride", "36")["result"]
    assert [q["offset"] for q in r["queues"]] == [0x140, 0x164]
    assert r["queues"][1]["num"] == 32 and r["queues"][1]["device_notify_index"] == 1


def test_offset_picks_page_in_larger_dump(tmp_path):
    blob = bytes(4096) + device_page("current", "blk", **CLASS_PAGES["blk"]) + bytes(100)
    r = ok_json(write(tmp_path, blob), "--offset", "0x1000")["result"]
    assert r["device"]["name"] == "BLOCK" and r["source"]["offset"] == 0x1000


def test_stdin_source():
    data = device_page("current", "rng", **CLASS_PAGES["rng"])
    r = run_cli("dump-config", "-", "--json", input=data)
    assert r.code == 0 and r.json()["result"]["device"]["name"] == "RNG"


def test_dump_url_prefix(tmp_path):
    p = write(tmp_path, device_page("current", "rng"))
    assert ok_json(f"dump:{p}")["device"] == f"dump:{p}"


# -- hex dumps and raw output --------------------------------------------------------


@pytest.mark.parametrize("abi", ABIS)
def test_hex_round_trip_through_file(tmp_path, abi):
    data = device_page(abi, "net", **CLASS_PAGES["net"])
    src = write(tmp_path, data)
    hexfile = tmp_path / "page.hex"
    r = run_cli("dump-config", src, "--hex", "-o", hexfile)
    assert r.code == 0 and r.stdout == "" and "wrote 4096-byte page" in r.stderr
    text = hexfile.read_text()
    assert text.startswith("# l4vctl config page from") and f"# abi: {abi}\n" in text
    a = ok_json(src)["result"]
    b = ok_json(hexfile)["result"]
    assert b["source"]["format"] == "hex"
    a.pop("source"), b.pop("source")
    a.pop("abi_detection"), b.pop("abi_detection")
    assert a == b
    # the raw form comes back byte for byte
    raw = tmp_path / "back.bin"
    assert run_cli("dump-config", hexfile, "--raw", "-o", raw).code == 0
    assert raw.read_bytes() == data


def test_hex_to_stdout_and_json(tmp_path):
    src = write(tmp_path, device_page("current", "blk"))
    r = run_cli("dump-config", src, "--hex")
    assert r.code == 0 and r.stdout.splitlines()[-1] == "00001000"
    j = run_cli("dump-config", src, "--hex", "--json").json()
    assert j["result"]["format"] == "hex" and j["result"]["text"] == r.stdout


def test_raw_to_stdout(tmp_path):
    data = device_page("current", "blk")
    r = run_cli("dump-config", write(tmp_path, data), "--raw")
    assert r.code == 0 and r.stdout_bytes == data


def test_hex_dump_header_abi_is_used(tmp_path):
    # Ambiguous page saved with an explicit --abi keeps that choice on reload.
    data = independent_page("classic", device=3, dev_words=[0, 1, 0, 0, 0, 0, 0, 1], queues_offset=0x110)
    src = write(tmp_path, data)
    hexfile = tmp_path / "p.hex"
    assert run_cli("dump-config", src, "--abi", "classic", "--hex", "-o", hexfile).code == 0
    env = ok_json(hexfile)
    assert env["abi"] == "classic" and env["result"]["abi_detection"]["method"] == "dump-header"


@pytest.mark.parametrize("tool,args", [("hexdump", ["-C"]), ("xxd", []), ("od", ["-A", "x", "-t", "x1z", "-v"])])
def test_reads_dumps_of_standard_tools(tmp_path, tool, args):
    exe = shutil.which(tool)
    assert exe, f"{tool} is required (.ci/run installs bsdextrautils and xxd)"
    data = device_page("current", "blk", **CLASS_PAGES["blk"])
    src = write(tmp_path, data)
    dump = subprocess.run([exe, *args, str(src)], capture_output=True, check=True).stdout
    if tool == "od":
        # od -z puts its ASCII column in >...<; present it the way the reader accepts
        dump = dump.replace(b">", b"|").replace(b"<", b"|")
    hexfile = write(tmp_path, dump, f"page.{tool}")
    r = run_cli("dump-config", hexfile, "--raw", "-o", tmp_path / "back.bin")
    assert r.code == 0, r.stderr
    assert (tmp_path / "back.bin").read_bytes() == data


# -- bad input -------------------------------------------------------------------------


def bad(tmp_path, data_or_args, code, fragment, *extra):
    if isinstance(data_or_args, bytes | str):
        src = tmp_path / "bad.bin"
        src.write_bytes(data_or_args if isinstance(data_or_args, bytes) else data_or_args.encode())
        args = [src, *extra]
    else:
        args = list(data_or_args)
    r = run_cli("dump-config", *args)
    assert r.code == code, (r.code, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l4vctl: error: "), r.stderr
    assert fragment in lines[0]
    j = run_cli("dump-config", *args, "--json")
    assert j.code == code
    env = j.json()
    assert env["ok"] is False and env["error"]["exit_code"] == code and fragment in env["error"]["message"]
    return lines[0]


def page_with(abi="current", **fields) -> bytes:
    p = bytearray(device_page(abi, "blk", **CLASS_PAGES["blk"]))
    hc = pg.header_codec(abi)
    for name, value in fields.items():
        off, _size, fmt, _count = hc.fields[name]
        struct.pack_into("<" + fmt, p, off, value)
    return bytes(p)


def set_queue(data: bytes, **fields) -> bytes:
    p = bytearray(data)
    qc = pg.queue_codec()
    for name, value in fields.items():
        off, _size, fmt, _count = qc.fields[name]
        struct.pack_into("<" + fmt, p, pg.queues_offset_for(2, "current") + off, value)
    return bytes(p)


def test_empty_file(tmp_path):
    bad(tmp_path, b"", 4, "empty input")


def test_short_file(tmp_path):
    bad(tmp_path, b"virt" + bytes(100), 4, "too short: 104 bytes")


def test_too_long_file(tmp_path):
    bad(tmp_path, bytes(5000), 4, "too long: 5000 bytes")


def test_wrong_magic(tmp_path):
    bad(tmp_path, b"VIRT" + device_page("current", "blk")[4:], 4, "bad magic")


def test_wrong_version(tmp_path):
    bad(tmp_path, page_with(version=1), 4, "unsupported version 1")


def test_queue_array_outside_page(tmp_path):
    bad(tmp_path, page_with(queues_offset=0xFF0), 4, "queue array runs past the end of the page")


def test_absurd_num_queues(tmp_path):
    bad(tmp_path, page_with(num_queues=0xFFFFFFFF), 4, "queue array runs past the end")


def test_queues_offset_in_header(tmp_path):
    bad(tmp_path, page_with(queues_offset=0x40), 4, "overlaps the 256-byte header")


def test_queues_offset_zero(tmp_path):
    bad(tmp_path, page_with(queues_offset=0), 4, "queues_offset is 0")


def test_device_config_shorter_than_ours_is_decoded_up_to_the_queues(tmp_path):
    # a device whose config ends at 0x120: the fields after it are named, not refused
    r = run_cli("dump-config", write(tmp_path, page_with(queues_offset=0x120)), "--json")
    assert r.code == 0, r.stderr
    dc = json.loads(r.stdout)["result"]["device_config"]
    assert dc["fields"]["capacity"] == 131072 and dc["fields"]["blk_size"] == 512
    assert dc["present"] == 0x20 and "writeback" not in dc["fields"]
    assert dc["truncated_fields"][0] == "writeback"
    assert dc["truncated_fields"][-1] == "secure_erase_sector_alignment"


def test_absurd_queue_sizes(tmp_path):
    base = device_page("current", "blk", **CLASS_PAGES["blk"])
    bad(tmp_path, set_queue(base, num_max=40000), 4, "num_max 40000 exceeds")
    bad(tmp_path, set_queue(base, num=100), 4, "num 100 is not a power of two")
    bad(tmp_path, set_queue(base, num=3), 4, "num 3 is not a power of two")


def test_several_problems_are_counted(tmp_path):
    line = bad(tmp_path, page_with(version=3, queues_offset=0x40), 4, "unsupported version 3")
    assert "and 1 more problem" in line


def test_force_decodes_anyway(tmp_path):
    src = write(tmp_path, page_with(version=3))
    r = run_cli("dump-config", src, "--force")
    assert r.code == 0
    assert "warning: unsupported version 3" in r.stderr
    assert "problem: unsupported version 3" in r.stdout
    j = run_cli("dump-config", src, "--force", "--json")
    assert j.code == 0 and j.json()["result"]["problems"] == ["unsupported version 3 (expected 2)"]


def test_garbage_hex_line(tmp_path):
    text = "00000000  76 69 72 74\nthis is not hex\n"
    bad(tmp_path, text, 4, "hex dump line 2")


def test_hex_with_gap(tmp_path):
    text = "00000000  76 69 72 74\n00000010  00 00\n"
    bad(tmp_path, text, 4, "offset 0x10, expected 0x4")


def test_hex_repeat_without_end(tmp_path):
    text = "00000000  76 69 72 74 00 00 00 00 00 00 00 00 00 00 00 00\n*\n"
    bad(tmp_path, text, 4, "ends with '*'")


def test_text_that_is_not_a_dump(tmp_path):
    bad(tmp_path, "hello world\n", 4, "expected an offset")


def test_unknown_abi(tmp_path):
    src = write(tmp_path, device_page("current", "blk"))
    bad(tmp_path, [src, "--abi", "modern"], 2, "Invalid value for '--abi'")


def test_missing_file(tmp_path):
    bad(tmp_path, [tmp_path / "nope.bin"], 3, "no such file")


def test_directory(tmp_path):
    bad(tmp_path, [tmp_path], 3, "is a directory")


def test_bad_offset(tmp_path):
    src = write(tmp_path, device_page("current", "blk"))
    bad(tmp_path, [src, "--offset", "lots"], 2, "not a number")
    bad(tmp_path, [src, "--offset", "0x2000"], 4, "beyond the end of the input")


def test_conflicting_output_options(tmp_path):
    src = write(tmp_path, device_page("current", "blk"))
    bad(tmp_path, [src, "--hex", "--raw"], 2, "exclude each other")
    bad(tmp_path, [src, "-o", tmp_path / "x"], 2, "needs --hex or --raw")


def test_raw_refuses_json(tmp_path):
    src = write(tmp_path, device_page("current", "blk"))
    r = run_cli("dump-config", src, "--raw", "--json")
    assert r.code == 2 and r.json()["error"]["type"] == "usage"


# -- property: random pages decode or fail cleanly ----------------------------------------

_PAGE_PREFIX = b"virt" + struct.pack("<I", 2)


@given(
    body=st.binary(min_size=0, max_size=4096),
    prefix=st.sampled_from([b"", _PAGE_PREFIX]),
    abi=st.sampled_from(["auto", "classic", "current"]),
    force=st.booleans(),
)
def test_random_pages_decode_or_fail_cleanly(body, prefix, abi, force):
    data = (prefix + body)[:4096]
    args = ["dump-config", "-", "--abi", abi, "--json"] + (["--force"] if force else [])
    r = run_cli(*args, input=data)
    assert r.code in (0, 4), r.stderr
    env = json.loads(r.stdout)
    assert env["ok"] is (r.code == 0)
    assert "Traceback" not in r.stderr
    if r.code == 4:
        assert len(r.stderr.strip().splitlines()) == 1


@given(st.lists(st.tuples(st.integers(0, 32768 * 2), st.integers(0, 65535), st.integers(0, 3)), max_size=8))
def test_random_queue_entries(entries):
    data = bytearray(independent_page("current", num_queues=max(len(entries), 1)))
    for i, (num_max, num, ready) in enumerate(entries):
        struct.pack_into("<HHH", data, 0x140 + 40 * i, num_max & 0xFFFF, num, ready)
    r = run_cli("dump-config", "-", input=bytes(data))
    assert r.code in (0, 4) and "Traceback" not in r.stderr


# -- golden text ---------------------------------------------------------------------------


def test_golden_text_blk_current(tmp_path):
    data = device_page(
        "current", "blk", status=0x0F, generation=1, accepted=[9, 28, 32], **CLASS_PAGES["blk"],
        queues=[{"num": 128, "ready": 1, "desc_addr": 0x200000, "avail_addr": 0x200800, "used_addr": 0x200908}],
    )  # fmt: skip
    r = run_cli("dump-config", write(tmp_path, data, "blk.bin"))
    assert r.code == 0
    check_golden("dump-config-blk-current.txt", r.stdout.replace(str(tmp_path), "TMP"))


def test_golden_text_net_classic(tmp_path):
    data = device_page("classic", "net", status=0x4B, cmd=0x02000001, **CLASS_PAGES["net"])
    r = run_cli("dump-config", write(tmp_path, data, "net.bin"))
    assert r.code == 0
    check_golden("dump-config-net-classic.txt", r.stdout.replace(str(tmp_path), "TMP"))


def test_colour_output_uses_rich(tmp_path):
    data = device_page("current", "blk", **CLASS_PAGES["blk"])
    r = run_cli("--color", "always", "dump-config", write(tmp_path, data))
    assert r.code == 0 and "\x1b[" in r.stdout and "VIRTIO_BLK_F_FLUSH" in r.stdout
    plain = run_cli("dump-config", write(tmp_path, data))
    assert "\x1b[" not in plain.stdout
