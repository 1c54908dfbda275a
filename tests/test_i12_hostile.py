"""Hostile inputs against the diagnostics of issue 12: archives, monitor requests, traces, options."""

from __future__ import annotations

import json
import struct

import pytest

from tests.conftest import run_cli
from tests.test_queue_show import post_blk, stalled


@pytest.fixture(scope="module")
def saved_archive(tmp_path_factory) -> bytes:
    """A memory archive of a blk device with three requests in flight, written by dump-config."""
    tmp_path = tmp_path_factory.mktemp("archive")
    path = tmp_path / "a.l4vm"
    with stalled(tmp_path, "blk", "current", "--size", "1M") as (url, s):
        post_blk(s)
        r = run_cli("dump-config", url, "--with-memory", "-o", str(path))
        assert r.code == 0, r.stderr
    return path.read_bytes()


def with_manifest(raw: bytes, edit) -> bytes:
    """The archive with its manifest changed by ``edit(manifest)`` (size field fixed up)."""
    size = struct.unpack_from("<I", raw, 12)[0]
    manifest = json.loads(raw[16 : 16 + size])
    edit(manifest)
    text = json.dumps(manifest).encode()
    return raw[:12] + struct.pack("<I", len(text)) + text + raw[16 + size :]


@pytest.mark.parametrize("key", ["stats_version", "status", "irq_bound", "kicks"])
@pytest.mark.parametrize("value", [None, "x", [], {"a": 1}])
def test_archive_device_counters_of_the_wrong_type(tmp_path, saved_archive, key, value):
    raw = saved_archive
    bad = tmp_path / "bad.l4vm"
    bad.write_bytes(with_manifest(raw, lambda m: m["device_side"].__setitem__(key, value)))
    for args in (["diagnose"], ["diagnose", "--json"], ["queue-show", "--queue", "0"]):
        r = run_cli(args[0], str(bad), *args[1:])
        assert r.code == 4, (args, r.code, r.stderr)
        assert "internal error" not in r.stderr and len(r.stderr.strip().splitlines()) <= 1, r.stderr
        assert "device_side" in (r.json()["error"]["message"] if "--json" in args else r.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ["diagnose", "emu:blk", "--interval", "nan"],
        ["diagnose", "emu:blk", "--timeout", "nan"],
        ["check", "emu:blk", "--case", "status-*", "--timeout", "nan"],
        ["queue-show", "emu:blk", "--queue", "0", "--timeout", "NaN"],
    ],
)
def test_nan_seconds_are_a_usage_error(args):
    r = run_cli(*args, "--json")
    assert r.code == 2, (r.code, r.stdout, r.stderr)
    assert r.json()["error"]["type"] == "usage" and "nan" in r.json()["error"]["message"].lower()


HEADER = '{"t":0.0,"kind":"trace","format":1}\n'


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("[" * 100000 + "\n", "not a JSON line"),  # nesting deeper than the parser's recursion
        ('{"t":1e999,"s":1,"kind":"session","url":"emu:blk","role":"driver"}\n', "not a JSON line"),
        ('{"t":NaN,"s":1,"kind":"session","url":"emu:blk","role":"driver"}\n', "not a JSON line"),
        ('{"t":0.5,"s":1,"kind":"session","url":"emu:blk","role":"driver","x":-Infinity}\n', "not a JSON line"),
    ],
)
def test_trace_lines_json_cannot_carry(tmp_path, body, why):
    """Deep nesting and non-finite numbers are format errors, never an internal error or invalid JSON out."""
    path = tmp_path / "t.jsonl"
    path.write_text(HEADER + body)
    for args in (["trace", "show", str(path), "--json"], ["trace", "show", str(path)],
                 ["trace", "replay", str(path), "emu:blk"]):  # fmt: skip
        r = run_cli(*args)
        assert r.code == 4, (args, r.code, r.stdout[:300], r.stderr)
        assert f"t.jsonl:2: {why}" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_every_json_result_key_is_in_the_help(tmp_path, saved_archive):
    archive = tmp_path / "a.l4vm"
    archive.write_bytes(saved_archive)
    trace = tmp_path / "t.jsonl"
    assert run_cli("--trace", str(trace), "probe", "emu:rng").code == 0
    runs = {
        ("queue-show",): ["queue-show", str(archive), "--queue", "0"],
        ("diagnose",): ["diagnose", str(archive)],
        ("check",): ["check", "emu:rng", "--case", "status-*"],
        ("trace", "show"): ["trace", "show", str(trace)],
        ("trace", "replay"): ["trace", "replay", str(trace), "emu:rng"],
    }
    for command, args in runs.items():
        r = run_cli(*args, "--json")
        assert r.code in (0, 6), (args, r.stderr)
        helptext = run_cli(*command, "--help").stdout
        missing = [k for k in r.json()["result"] if k not in helptext]
        assert not missing, (command, missing)


@pytest.mark.parametrize(
    "args",
    [["trace", "show", "@"], ["trace", "replay", "@", "emu:blk"], ["diagnose", "@"], ["queue-show", "@", "-q", "0"]],
)
def test_a_fifo_nobody_writes_to_ends_in_a_timeout(tmp_path, monkeypatch, args):
    import os
    import time

    from l4vctl import files

    monkeypatch.setattr(files, "FIFO_WAIT", 0.3)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    r = run_cli(*[str(fifo) if a == "@" else a for a in args], "--json")
    assert time.monotonic() - t0 < 5
    assert r.code == 7, (r.code, r.stderr)
    assert r.json()["error"]["type"] == "timeout" and "nothing was written" in r.stderr


def test_a_fifo_with_a_writer_is_read(tmp_path, saved_archive):
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:
            f.write(saved_archive)

    t = threading.Thread(target=write)
    t.start()
    try:
        r = run_cli("queue-show", str(fifo), "-q", "0", "--json")
    finally:
        t.join(10)
    assert r.code == 0, r.stderr
    assert r.json()["result"]["queue"]["pending"] == 3


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_archive_manifest_with_non_json_numbers(tmp_path, saved_archive, constant):
    size = struct.unpack_from("<I", saved_archive, 12)[0]
    text = saved_archive[16 : 16 + size].replace(b'"taken":', b'"taken":' + constant.encode() + b',"was":', 1)
    bad = tmp_path / "bad.l4vm"
    bad.write_bytes(saved_archive[:12] + struct.pack("<I", len(text)) + text + saved_archive[16 + size :])
    r = run_cli("diagnose", str(bad), "--json")
    assert r.code == 4, (r.code, r.stderr)
    assert "manifest is not JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("fault", ["bad-magic", "queues-offset-outside"])
def test_diagnose_does_not_call_a_broken_page_healthy(tmp_path, fault):
    from tests.emu import emulator

    with emulator(tmp_path, "blk", "--inject", fault) as (url, _proc):
        for target in (url, f"emu:blk?inject={fault}"):
            r = run_cli("diagnose", target, "--interval", "0.05", "--json")
            assert r.code == 4, (target, r.code, r.stdout[:400], r.stderr)
            assert r.json()["error"]["type"] == "format"
            message = r.json()["error"]["message"]
            assert "config page is broken" in message
            assert ("bad magic" if fault == "bad-magic" else "queue array runs past the end") in message
