"""Trace and replay: trace+URL and --trace record real sessions; trace show and trace replay read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from l4vctl import catalog as cat
from l4vctl.trace.read import load
from tests.conftest import run_cli
from tests.emu import emulator, reap, wait_for


def ok(*args, **kw):
    r = run_cli(*args, "--json", **kw)
    assert r.code == 0, (r.code, r.stdout, r.stderr)
    return r.json()["result"]


def events(path, kind=None, **match):
    out = []
    for ev in load(str(path)).events:
        if kind is not None and ev["kind"] != kind:
            continue
        if all(ev.get(k) == v for k, v in match.items()):
            out.append(ev)
    return out


def statuses(path):
    return [ev["status"] for ev in events(path, "status")]


ACK, DRV, FOK, DOK = cat.STATUS_ACKNOWLEDGE, cat.STATUS_DRIVER, cat.STATUS_FEATURES_OK, cat.STATUS_DRIVER_OK


# -- recording ---------------------------------------------------------------------------------------


def test_negotiate_records_the_handshake_in_order(tmp_path):
    path = tmp_path / "neg.jsonl"
    ok("negotiate", f"trace+emu:blk?size=1M&trace={path}")
    tr = load(str(path))
    assert tr.header["kind"] == "trace" and tr.header["format"] == 1 and tr.truncated is None
    kinds = [e["kind"] for e in tr.events]
    assert kinds[0] == "session" and kinds[-1] == "end"
    assert tr.events[0]["url"] == "emu:blk?size=1M" and tr.events[0]["role"] == "driver"
    ops = [e["op"] for e in tr.events if e["kind"] == "ipc"]
    assert ops[:6] == ["DEVICE_CONFIG", "GET_DEVICE_IRQ", "ICU BIND", "SET_STATUS", "SET_STATUS", "SET_STATUS"]
    assert ops[6:] == ["SET_STATUS", "REGISTER_DS", "CONFIG_QUEUE", "SET_STATUS", "SET_STATUS"]
    sets = [e["words"][0] for e in tr.events if e["kind"] == "ipc" and e["op"] == "SET_STATUS"]
    assert sets == [0, ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK, 0]
    assert all(e["result"] == 0 and e["result_name"] == "L4_EOK" for e in tr.events if e["kind"] == "ipc")
    assert statuses(path) == [ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK, 0]
    # the page is mapped before the first status write; its identity names the device
    mapped = events(path, "page", op="map")[0]
    assert mapped["abi"] == "current" and mapped["identity"]["device"] == cat.DEVICE_ID_BLK
    assert mapped["identity"]["config"]["capacity"] == 2048
    # every page write names its field; the features are written before FEATURES_OK is set
    writes = events(path, "page", op="write")
    fields = [w["field"] for w in writes]
    assert fields[0] == "driver_features_map[0]" and "queue[0].desc_addr" in fields and fields[-1] == "queue[0].ready"
    fok = next(e for e in tr.events if e["kind"] == "ipc" and e["op"] == "SET_STATUS" and e["words"][0] & FOK)
    assert all(w["line"] < fok["line"] for w in writes if w["field"].startswith("driver_features_map"))
    ready = next(w for w in writes if w["field"] == "queue[0].ready")
    assert ready["old"] == 0 and ready["new"] == 1
    cq = next(e for e in tr.events if e["kind"] == "ipc" and e["op"] == "CONFIG_QUEUE")
    assert ready["line"] < cq["line"] and cq["words"] == [0]
    ds = next(e for e in tr.events if e["kind"] == "ipc" and e["op"] == "REGISTER_DS")
    assert ds["lend"] == "l4vctl-rings" and ds["caps"] == [{"type": "dataspace", "rights": 5, "size": ds["words"][2]}]
    times = [e["t"] for e in tr.events]
    assert times == sorted(times) and times[0] >= 0


def test_cmd_mode_records_cmd_words_kicks_and_clears(tmp_path):
    path = tmp_path / "cmd.jsonl"
    r = ok("negotiate", f"trace+emu:blk?abi=classic&cmd-mode=1&trace={path}", "--mode", "cmd")
    assert r["mode"] == "cmd"
    assert events(path, "page", op="map")[0]["abi"] == "classic"
    evs = [e for e in load(str(path)).events if e["kind"] in ("cmd", "kick", "status")]
    writes = [e for e in evs if e["kind"] == "cmd" and e["op"] == "write"]
    assert [(w["cmd"], w["arg"]) for w in writes[:5]] == [
        ("SET_STATUS", 0), ("SET_STATUS", ACK), ("SET_STATUS", ACK | DRV), ("SET_STATUS", ACK | DRV | FOK),
        ("CFG_QUEUE", 0),
    ]  # fmt: skip
    # each cmd word: written, the device kicked, then cleared by the device
    for w in writes:
        i = evs.index(w)
        assert evs[i + 1]["kind"] == "kick" and evs[i + 1]["cause"] == "cmd"
        assert evs[i + 2]["kind"] == "cmd" and evs[i + 2]["op"] == "cleared" and evs[i + 2]["word"] == w["word"]
    assert not [e for e in events(path, "ipc") if e["op"] == "SET_STATUS"]
    assert statuses(path)[:4] == [ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK]


def test_blk_write_and_read_on_an_emulator_process_with_the_root_option(tmp_path):
    data = bytes(range(256)) * 4
    (tmp_path / "in.bin").write_bytes(data)
    with emulator(tmp_path, "blk", "--size", "1M") as (url, _proc):
        w, r = tmp_path / "w.jsonl", tmp_path / "r.jsonl"
        ok("--trace", str(w), "blk", "write", url, "--sector", "8", "-i", str(tmp_path / "in.bin"))
        ok("--trace", str(r), "blk", "read", url, "--sector", "8", "--count", "2", "-o", str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == data
    for path, rtype in ((w, cat.BLK_T_OUT), (r, cat.BLK_T_IN)):
        assert load(str(path)).sessions()[1]["url"] == url
        queue = events(path, "queue")[0]
        assert queue["queue"] == 0 and queue["num"] >= 2
        posted = events(path, "request", phase="posted")
        done = events(path, "request", phase="completed")
        assert len(posted) == len(done) == 1
        assert posted[0]["queue"] == 0 and posted[0]["head"] == done[0]["head"]
        kick = events(path, "kick", queue=0)
        assert kick and posted[0]["line"] < kick[0]["line"] < done[0]["line"]
        s = done[0]["summary"]
        assert s["class"] == "blk" and s["type"] == rtype and s["sector"] == 8 and s["status_name"] == "OK"
        assert done[0]["last_byte"] == cat.BLK_S_OK
    import base64
    import hashlib

    out = base64.b64decode(events(w, "request", phase="posted")[0]["out_b64"])
    assert out[16:] == data  # the header, then the data the driver gave the device
    done = events(r, "request", phase="completed")[0]
    assert done["used"] == len(data) + 1
    assert done["in_sha256"] == hashlib.sha256(data + b"\0").hexdigest()


def test_net_ping_between_two_devices_records_both_sessions(tmp_path):
    path = tmp_path / "ping.jsonl"
    link = f"t-trace-ping-{os.getpid()}"
    r = ok("--trace", str(path), "net", "ping", f"emu:net?link={link}", f"emu:net?link={link}", "--count", "3")
    assert r["received"] == 3
    tr = load(str(path))
    assert sorted(tr.sessions()) == [1, 2]
    for sid in (1, 2):
        mine = [e for e in tr.events if e["s"] == sid]
        assert mine[0]["kind"] == "session" and mine[-1]["kind"] == "end"
        tx = [e for e in mine if e["kind"] == "request" and e["queue"] == 1 and e["phase"] == "posted"]
        rx = [e for e in mine if e["kind"] == "request" and e["queue"] == 0 and e["phase"] == "completed"]
        assert len(tx) == 3 and len(rx) == 3
        assert all(e["summary"]["direction"] == "rx" and e["summary"]["frame_len"] == 74 for e in rx)
        assert [k["queue"] for k in mine if k["kind"] == "kick"][:1] == [0]  # receive buffers go first
    a_rx = [
        e for e in tr.events if e["s"] == 1 and e["kind"] == "request" and e["queue"] == 0 and e["phase"] == "completed"
    ]
    assert a_rx[0]["summary"]["src"] == "52:54:00:12:34:57" and a_rx[0]["summary"]["dst"] == "52:54:00:12:34:56"
    # B's receive buffer completes after A's frame was posted and kicked
    first_tx = next(e for e in tr.events if e["s"] == 1 and e["kind"] == "request" and e["queue"] == 1)
    first_rx_b = next(e for e in tr.events if e["s"] == 2 and e["kind"] == "request" and e["queue"] == 0
                      and e["phase"] == "completed")  # fmt: skip
    assert first_tx["line"] < first_rx_b["line"]


def test_a_receiver_that_sleeps_records_the_interrupt(tmp_path):
    link = f"t-trace-irq-{os.getpid()}"
    path = tmp_path / "recv.jsonl"
    with emulator(tmp_path, "net", "--link", link, name="a.sock") as (a, _pa), \
         emulator(tmp_path, "net", "--link", link, name="b.sock") as (b, _pb):  # fmt: skip
        recv = subprocess.Popen([sys.executable, "-m", "l4vctl", "--trace", str(path), "net", "recv", b, "--count", "1",
                                 "--wait", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            assert wait_for(lambda: path.exists() and b'"queue":0,"avail_idx"' in path.read_bytes(), 20, 0.05)
            ok("net", "send", a, "--text", "wake up")
            recv.communicate(timeout=20)
            assert recv.returncode == 0
        finally:
            reap(recv)
    tr = load(str(path))
    done = next(e for e in tr.events if e["kind"] == "request" and e["phase"] == "completed")
    irqs = [e for e in tr.events if e["kind"] == "irq"]
    assert irqs and irqs[0]["index"] == 0 and irqs[0]["count"] >= 1
    assert irqs[0]["line"] < done["line"]  # the driver slept until the device interrupted it


def test_trace_plus_on_several_commands(tmp_path):
    cases = [
        (["probe"], "emu:blk", "monitor"),
        (["rng", "read", "--bytes", "16"], "emu:rng", "driver"),
        (["blk", "id"], "emu:blk", "driver"),
        (["console", "send", "hi"], "emu:console", "driver"),
        (["queue-stats"], "emu:net", "monitor"),
    ]
    for i, (args, url, role) in enumerate(cases):
        path = tmp_path / f"{i}.jsonl"
        words = 1 if args[0] in ("probe", "queue-stats") else 2  # the command's name, then the device
        r = run_cli(*args[:words], f"trace+{url}?trace={path}", *args[words:])
        assert r.code == 0, (args, r.stderr)
        tr = load(str(path))
        assert tr.sessions()[1]["role"] == role and tr.events[-1]["kind"] == "end", args
        assert tr.events[1]["op"] == "DEVICE_CONFIG"


def test_default_trace_place(tmp_path):
    r = run_cli("probe", "trace+emu:blk", env={"L4VCTL_TRACE_DIR": str(tmp_path)})
    assert r.code == 0
    made = list(tmp_path.glob("l4vctl-trace-*.jsonl"))
    assert len(made) == 1 and str(made[0]) in r.stderr
    assert load(str(made[0])).events[0]["kind"] == "session"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("trace+dump:/etc/hostname", "needs a live device"),
        ("trace+trace+emu:blk", "cannot be traced again"),
        ("trace+emu:blk?trace=", "needs a file name"),
        ("trace+nope:x", "unknown device scheme"),
    ],
)
def test_bad_trace_urls(url, message):
    r = run_cli("negotiate", url)
    assert r.code == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_trace_file_that_cannot_be_written(tmp_path):
    r = run_cli("--trace", str(tmp_path / "no" / "such" / "dir.jsonl"), "probe", "emu:blk")
    assert r.code == 3 and "cannot write the trace" in r.stderr


def test_killed_recorder_leaves_a_valid_prefix(tmp_path):
    path = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "l4vctl", "--trace", str(path), "bench", "emu:blk", "--time", "20"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_for(lambda: path.exists() and path.stat().st_size > 200_000, 20, 0.02)
        proc.kill()
        proc.wait(10)
    finally:
        reap(proc)
    tr = load(str(path))  # whole lines only: each record is one write
    assert tr.truncated is None and len(tr.events) > 100
    assert any(e["kind"] == "request" for e in tr.events)


# -- show ------------------------------------------------------------------------------------------


def test_show_text_names_flags_features_and_errors(tmp_path):
    path = tmp_path / "iface.jsonl"
    # a classic device from before DEVICE_CONFIG: -L4_ENOSYS, then REGISTER_IFACE
    ok("negotiate", f"trace+emu:blk?abi=classic&attach=iface&trace={path}")
    r = run_cli("trace", "show", str(path))
    assert r.code == 0, r.stderr
    text = r.stdout
    assert "DEVICE_CONFIG() -> -L4_ENOSYS" in text
    assert "REGISTER_IFACE() +irq -> L4_EOK" in text
    assert "status reads 0x0b ACKNOWLEDGE+DRIVER+FEATURES_OK" in text
    assert "driver_features_map[1] = 0x1 (was 0x0): VIRTIO_F_VERSION_1" in text
    assert "VIRTIO_BLK_F_FLUSH" in text
    first = text.splitlines()[0]
    assert first.split()[1] == "ms" and "session 1 on emu:blk?abi=classic&attach=iface as driver" in first


def test_show_json_and_filters(tmp_path):
    path = tmp_path / "w.jsonl"
    ok("blk", "write", f"trace+emu:blk?size=1M&trace={path}", "--sector", "0", "--count", "16", "--pattern", "5a")
    r = ok("trace", "show", str(path))
    assert r["format"] == 1 and r["truncated"] is None and r["file"] == str(path)
    assert all({"t", "s", "kind", "line", "text"} <= set(e) for e in r["events"])
    only = ok("trace", "show", str(path), "--kind", "request", "--queue", "0")["events"]
    assert only and {e["kind"] for e in only} == {"request"} and {e["queue"] for e in only} == {0}
    assert any("blk OUT sector 0 8192 bytes" in e["text"] for e in only if e["phase"] == "posted")
    assert any(e["text"].endswith("-> OK") for e in only if e["phase"] == "completed")
    st = ok("trace", "show", str(path), "--kind", "status", "--kind", "kick")["events"]
    assert {e["kind"] for e in st} == {"status", "kick"}
    assert {e["s"] for e in ok("trace", "show", str(path), "--session", "1")["events"]} == {1}
    assert ok("trace", "show", str(path), "--session", "2")["events"] == []
    none = run_cli("trace", "show", str(path), "--queue", "5")
    assert none.code == 0 and none.stdout == "no steps match\n"


def _write_trace(path, lines):
    path.write_bytes(
        b"".join(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode() for line in lines)
    )


HEADER = {"t": 0, "kind": "trace", "format": 1}


@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        ([], None, "no complete first line"),
        ([b'{"t": 0, "kind": "tra'], None, "no complete first line"),
        ([{"kind": "session"}], 1, "not a trace file"),
        ([{**HEADER, "format": 99}], 1, "format 99 is not supported"),
        ([HEADER, b"{not json\n", {"t": 1, "s": 1, "kind": "end"}], 2, "not a JSON line"),
        ([HEADER, [1, 2]], 2, "a JSON object is expected"),
        ([HEADER, {"t": 1, "s": 1, "kind": "nonsense"}], 2, "unknown record kind"),
        ([HEADER, {"t": "soon", "s": 1, "kind": "end"}], 2, "valid time"),
        ([HEADER, {"t": 1, "s": 0, "kind": "end"}], 2, "session number"),
        ([HEADER, {"t": 1, "s": 1, "kind": "ipc", "label": 0, "opcode": "x", "words": []}], 2, "'opcode' is not"),
        ([HEADER, {"t": 1, "s": 1, "kind": "request", "phase": "posted", "queue": 0}], 2, "without 'head'"),
        ([HEADER, b"\xff\xfe\x00garbage\n"], 2, "not a JSON line"),
    ],
)
def test_show_refuses_malformed_traces(tmp_path, lines, line, message):
    path = tmp_path / "bad.jsonl"
    _write_trace(path, lines)
    for command in (["trace", "show", str(path)], ["trace", "replay", str(path)]):
        r = run_cli(*command)
        assert r.code == 4, (command, r.stdout, r.stderr)
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
        if line is not None:
            assert f"{path}:{line}:" in err


@pytest.mark.parametrize(
    "record",
    [
        {"t": 1, "s": 1, "kind": "ipc", "label": 0, "opcode": 0, "words": [], "caps": 5, "result": 0},
        {"t": 1, "s": 1, "kind": "cmd", "op": "cleared", "word": 1, "after": "later"},
        {"t": 1, "s": 1, "kind": "page", "op": "write", "field": 7, "new": 1},
        {"t": 1, "s": 1, "kind": "request", "phase": "posted", "queue": 0, "head": 0, "out_b64": 3},
    ],
)
def test_show_and_replay_refuse_records_of_the_wrong_shape(tmp_path, record):
    path = tmp_path / "shape.jsonl"
    _write_trace(path, [HEADER, {"t": 0, "s": 1, "kind": "session", "url": "emu:blk"}, record])
    for command in (["trace", "show", str(path)], ["trace", "replay", str(path)]):
        r = run_cli(*command)
        assert r.code == 4, (command, r.stdout, r.stderr)
        assert f"{path}:3: malformed" in r.stderr or f"{path}:3:" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_truncated_last_line_is_a_warning(tmp_path):
    src = tmp_path / "full.jsonl"
    ok("negotiate", f"trace+emu:blk?trace={src}")
    data = src.read_bytes()
    cut = data[: data.rindex(b"\n", 0, len(data) - 1) + 1] + data.splitlines()[-1][:9]  # half of the last line
    path = tmp_path / "cut.jsonl"
    path.write_bytes(cut)
    n = len(cut.splitlines())
    r = run_cli("trace", "show", str(path), "--json")
    assert r.code == 0 and f"{path}:{n}: the last line is cut short" in r.stderr
    assert r.json()["result"]["truncated"] == n and len(r.json()["result"]["events"]) == n - 2
    rep = run_cli("trace", "replay", str(path))
    assert rep.code == 0 and "cut short" in rep.stderr


def test_missing_trace_file(tmp_path):
    r = run_cli("trace", "show", str(tmp_path / "nothing.jsonl"))
    assert r.code == 3 and "nothing.jsonl: no such file" in r.stderr


# -- replay ---------------------------------------------------------------------------------------------


def _record_blk(tmp_path, url_options="size=1M", *args):
    path = tmp_path / "blk.jsonl"
    ok("blk", "write", f"trace+emu:blk?{url_options}&trace={path}", "--sector", "4", "--count", "8", "--pattern",
       "c3", *args)  # fmt: skip
    return path


def test_replay_on_the_recorded_device_is_the_same(tmp_path):
    path = _record_blk(tmp_path)
    r = ok("trace", "replay", str(path))
    n = len(load(str(path)).events)
    assert r["same"] is True and r["divergence"] is None and r["steps"] == n
    assert r["sessions"] == [{"session": 1, "device": "emu:blk?size=1M"}]


def test_replay_on_an_emulator_process_of_the_same_type(tmp_path):
    path = _record_blk(tmp_path)
    with emulator(tmp_path, "blk", "--size", "1M") as (url, _proc):
        r = ok("trace", "replay", str(path), url)
    assert r["same"] is True and r["sessions"][0]["device"] == url


@pytest.mark.parametrize("mode", ["ipc", "cmd"])
@pytest.mark.parametrize("abi", ["classic", "current"])
def test_replay_both_abis_and_modes(tmp_path, abi, mode):
    path = tmp_path / "x.jsonl"
    ok("blk", "read", f"trace+emu:blk?size=1M&abi={abi}&cmd-mode=1&trace={path}", "--sector", "0", "--count", "1",
       "--mode", mode, "-o", str(tmp_path / "o.bin"))  # fmt: skip
    assert bool(events(path, "cmd")) == (mode == "cmd")
    assert ok("trace", "replay", str(path))["same"] is True


def test_replay_reports_refused_features_ok(tmp_path):
    path = _record_blk(tmp_path)
    with emulator(tmp_path, "blk", "--size", "1M", "--inject", "refuse-features-ok") as (url, _proc):
        r = run_cli("trace", "replay", str(path), url, "--json")
    assert r.code == 6, r.stderr
    env = r.json()
    assert env["ok"] is False and env["error"]["type"] == "diverged" and env["error"]["exit_code"] == 6
    d = env["result"]["divergence"]
    fok = next(e for e in events(path, "status") if e["status"] & FOK)
    assert d["kind"] == "status" and d["line"] == fok["line"] and d["what"] == "the device refused FEATURES_OK"
    assert d["expected"] == "0x0b ACKNOWLEDGE+DRIVER+FEATURES_OK" and d["got"] == "0x03 ACKNOWLEDGE+DRIVER"
    assert env["result"]["same"] is False and env["result"]["steps"] == fok["line"] - 2
    assert f"{path}:{fok['line']}: the device answered differently" in r.stderr


def test_replay_reports_a_device_of_another_size(tmp_path):
    path = _record_blk(tmp_path)
    r = run_cli("trace", "replay", str(path), "emu:blk?size=2M", "--json")
    assert r.code == 6
    d = r.json()["result"]["divergence"]
    assert d["kind"] == "page" and d["line"] == events(path, "page", op="map")[0]["line"]
    assert d["expected"] == {
        "config": {"capacity": 2048, "max_discard_sectors": 2048, "max_write_zeroes_sectors": 2048}
    }
    assert d["got"]["config"]["capacity"] == 4096 and "config" in d["what"]


def test_replay_reports_a_read_only_device(tmp_path):
    path = _record_blk(tmp_path)
    r = run_cli("trace", "replay", str(path), "emu:blk?size=1M&ro=1")
    assert r.code == 6
    assert "diverged at line" in r.stdout and "dev_features_map" in r.stdout


def test_replay_reports_other_data(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(1 << 20))
    b.write_bytes(b"\x01" * (1 << 20))
    path = tmp_path / "read.jsonl"
    ok("blk", "read", f"trace+emu:blk?image={a}&serial=x&trace={path}", "--sector", "0", "--count", "1",
       "-o", str(tmp_path / "o.bin"))  # fmt: skip
    assert ok("trace", "replay", str(path), f"emu:blk?image={a}&serial=x")["same"] is True
    r = run_cli("trace", "replay", str(path), f"emu:blk?image={b}&serial=x", "--json")
    assert r.code == 6
    d = r.json()["result"]["divergence"]
    done = events(path, "request", phase="completed")[0]
    assert d["kind"] == "request" and d["line"] == done["line"] and d["what"] == "queue 0: the device wrote other data"
    assert d["expected"]["used"] == d["got"]["used"] == 513 and d["expected"]["last_byte"] == d["got"]["last_byte"] == 0


def test_replay_reports_a_device_that_does_not_reply(tmp_path):
    path = _record_blk(tmp_path)
    with emulator(tmp_path, "blk", "--size", "1M", "--inject", "no-reply=CONFIG_QUEUE") as (url, _proc):
        r = run_cli("trace", "replay", str(path), url, "--timeout", "0.5", "--json")
    assert r.code == 6
    d = r.json()["result"]["divergence"]
    assert d["kind"] == "ipc" and d["step"]["op"] == "CONFIG_QUEUE" and d["what"] == "CONFIG_QUEUE failed"
    assert d["expected"] == {"result": 0, "result_name": "L4_EOK"} and d["got"]["error"] == "timeout"


def test_replay_of_a_ping_between_two_sessions(tmp_path):
    path = tmp_path / "ping.jsonl"
    link = f"t-trace-rp-{os.getpid()}"
    ok("--trace", str(path), "net", "ping", f"emu:net?link={link}", f"emu:net?link={link}", "--count", "2")
    r = ok("trace", "replay", str(path))
    assert r["same"] is True and [s["session"] for s in r["sessions"]] == [1, 2]
    # the second device on no cable: its receive buffer never completes
    bad = run_cli("trace", "replay", str(path), f"emu:net?link={link}", "emu:net?mac=52:54:00:12:34:57",
                  "--timeout", "0.5", "--json")  # fmt: skip
    assert bad.code == 6
    d = bad.json()["result"]["divergence"]
    assert d["session"] == 2 and d["kind"] == "request" and "did not complete" in d["what"]


def test_replay_with_too_many_devices(tmp_path):
    path = _record_blk(tmp_path)
    r = run_cli("trace", "replay", str(path), "emu:blk", "emu:blk")
    assert r.code == 2 and "2 devices given for a trace of 1 session" in r.stderr


def test_replay_of_hostile_records(tmp_path):
    src = _record_blk(tmp_path)
    lines = src.read_bytes().splitlines(keepends=True)

    def variant(name, change):
        out = []
        for raw in lines:
            rec = json.loads(raw)
            rec = change(rec)
            out.append((json.dumps(rec) + "\n").encode())
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b"".join(out))
        return path

    def huge_lend(rec):
        if rec.get("op") == "REGISTER_DS":
            rec["caps"][0]["size"] = 1 << 50
        return rec

    def bad_base64(rec):
        if rec.get("phase") == "posted":
            rec["out_b64"] = "***"
        return rec

    def page_outside(rec):
        if rec.get("kind") == "page" and rec.get("op") == "write":
            rec["offset"] = 1 << 20
        return rec

    def buffers_elsewhere(rec):
        if rec.get("phase") == "posted":
            rec["bufs"][0][0] = 0x10
        return rec

    def wrong_words(rec):
        if rec.get("op") == "SET_STATUS":
            rec["words"] = [1 << 70]
        return rec

    def not_a_power_of_two(rec):
        if rec.get("kind") == "queue":
            rec["num"] = 100
        return rec

    changes = (huge_lend, bad_base64, page_outside, buffers_elsewhere, wrong_words, not_a_power_of_two)
    for change in changes:
        path = variant(change.__name__, change)
        r = run_cli("trace", "replay", str(path), "--timeout", "1")
        assert r.code == 4, (change.__name__, r.code, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and f"{path}:" in r.stderr and "Traceback" not in r.stderr


def test_trace_and_replay_on_qemu_storage_daemon(tmp_path):
    from tests.test_vhost_user import StorageDaemon

    qsd = StorageDaemon(tmp_path)
    try:
        path = tmp_path / "qsd.jsonl"
        ok("blk", "write", f"trace+{qsd.url}&trace={path}", "--sector", "2", "--count", "8", "--pattern", "5a")
        assert qsd.image_bytes(2, 4096) == b"\x5a" * 4096
        done = events(path, "request", phase="completed")
        assert done and done[0]["summary"]["status_name"] == "OK"
        assert events(path, "queue")[0]["event_idx"] is True  # negotiated with this device
        # a real, independent device answers the replay the same (it takes one front-end at a time)
        assert ok("trace", "replay", str(path))["same"] is True
        # our emulator is another device: its config page differs from qemu-storage-daemon's
        r = run_cli("trace", "replay", str(path), "emu:blk?size=16M", "--json")
        assert r.code == 6 and r.json()["result"]["divergence"]["kind"] == "page"
    finally:
        qsd.stop()


def test_an_untraced_session_runs_the_code_it_always_ran(tmp_path):
    from l4vctl.session import Session
    from l4vctl.virtqueue import Virtqueue

    ok("--trace", str(tmp_path / "before.jsonl"), "probe", "emu:blk")  # --trace ends with its command

    with Session("emu:blk") as s:
        s.handshake()
        assert type(s.virtqueue(0)) is Virtqueue  # not the recording subclass
        assert s.page is not None  # the page is a local mapping, stored to directly
        assert type(s.channel).__name__ == "SocketChannel"
        assert type(s.device_irq).__name__ == "Irq"


def test_a_library_session_on_a_trace_url(tmp_path):
    from l4vctl.drivers.blk import BlkDriver
    from l4vctl.session import Session
    from l4vctl.trace.record import TracedVirtqueue

    path = tmp_path / "lib.jsonl"
    with Session(f"trace+emu:blk?size=1M&trace={path}", mode="ipc") as s:
        s.handshake()
        assert s.page is None  # every page access goes through the recorder
        drv = BlkDriver(s)
        assert isinstance(drv.vq, TracedVirtqueue)
        drv.write(0, b"\x11" * 512)
        assert bytes(drv.read(0, 512)) == b"\x11" * 512
    done = events(path, "request", phase="completed")
    assert [d["summary"]["type_name"] for d in done] == ["OUT", "IN"]
    assert [d["out_len"] for d in done] == [16 + 512, 16] and [d["in_len"] for d in done] == [1, 513]


def test_replay_reports_a_cmd_word_left_in_place(tmp_path):
    path = tmp_path / "cmd.jsonl"
    ok("negotiate", f"trace+emu:blk?cmd-mode=1&trace={path}", "--mode", "cmd")
    r = run_cli("trace", "replay", str(path), "emu:blk?cmd-mode=1&inject=never-clear-cmd", "--timeout", "0.3", "--json")
    assert r.code == 6
    d = r.json()["result"]["divergence"]
    first_clear = events(path, "cmd", op="cleared")[0]
    assert d["kind"] == "cmd" and d["line"] == first_clear["line"]
    assert d["what"] == f"the device did not clear cmd {first_clear['word']:#010x}" and d["expected"] == "cleared"


def test_replay_reports_a_device_that_needs_a_reset(tmp_path):
    path = _record_blk(tmp_path)
    r = run_cli("trace", "replay", str(path), "emu:blk?size=1M&inject=needs-reset-on-driver-ok", "--json")
    assert r.code == 6
    d = r.json()["result"]["divergence"]
    assert d["kind"] == "status" and d["what"] == "the status read back differs"
    assert d["expected"] == "0x0f ACKNOWLEDGE+DRIVER+FEATURES_OK+DRIVER_OK"
    assert "DEVICE_NEEDS_RESET" in d["got"]


def test_a_failing_session_is_recorded_up_to_its_failure(tmp_path):
    path = tmp_path / "refused.jsonl"
    r = run_cli("negotiate", f"trace+emu:blk?inject=refuse-features-ok&trace={path}")
    assert r.code == 5
    tr = load(str(path))
    assert tr.events[-1]["kind"] == "end"
    # FEATURES_OK did not stick (no new status to record), then the driver gave up
    assert statuses(path)[:3] == [ACK, ACK | DRV, ACK | DRV | cat.STATUS_FAILED]
    assert not [st for st in statuses(path) if st & FOK]
    failed = [e for e in events(path, "ipc") if e["op"] == "SET_STATUS" and e["words"][0] & cat.STATUS_FAILED]
    assert failed, "the driver told the device it gave up"
    # replaying that trace on a device that refuses the same is the same
    assert ok("trace", "replay", str(path))["same"] is True


def test_a_session_whose_memory_is_not_mapped_here(tmp_path):
    """Memory reached only through ranges (as over the L4Re bridge): requests are recorded from the shadows."""
    from l4vctl.drivers.blk import BlkDriver
    from l4vctl.session import Session
    from tests.test_remote_memory import FarMemory

    path = tmp_path / "far.jsonl"
    s = Session(f"trace+emu:blk?size=1M&trace={path}", mode="ipc")
    inner = s.backend.inner
    real_connect = inner.connect

    def connect(role="driver", timeout=5.0):
        ch = real_connect(role, timeout)
        real_map, real_lend = ch.map_config, ch.lend

        def lend(size, name):
            lent = real_lend(size, name)
            lent.memory = FarMemory(lent.memory)
            return lent

        ch.map_config = lambda fd, size, offset, writable: FarMemory(real_map(fd, size, offset, writable))
        ch.lend = lend
        return ch

    inner.connect = connect
    data = bytes(range(256)) * 8
    with s:
        s.handshake(want=["flush", "indirect_desc", "event_idx"])
        drv = BlkDriver(s)
        drv.write(2, data)
        assert drv.read(2, len(data)) == data
    import base64
    import hashlib

    posted = events(path, "request", phase="posted")
    assert base64.b64decode(posted[0]["out_b64"])[16:] == data  # the bytes pushed at the kick, not stale ones
    done = events(path, "request", phase="completed")
    assert done[1]["in_sha256"] == hashlib.sha256(data + b"\0").hexdigest()
    assert ok("trace", "replay", str(path))["same"] is True


def test_replay_refuses_too_many_sessions_at_once(tmp_path):
    path = tmp_path / "many.jsonl"
    records = [HEADER] + [
        {"t": 0, "s": i, "kind": "session", "url": "emu:rng", "role": "monitor"} for i in range(1, 20)
    ]
    _write_trace(path, records)
    r = run_cli("trace", "replay", str(path))
    assert r.code == 4 and f"{path}:18: more than 16 sessions open at once" in r.stderr
    _write_trace(path, [HEADER, *records[1:2], *records[1:2]])
    r = run_cli("trace", "replay", str(path))
    assert r.code == 4 and "session 1 starts twice" in r.stderr
