"""The I/O commands end to end: blk, rng, console, net and bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import run_cli
from tests.emu import emulator, reap, wait_for

SECTOR = 512


def ok(*args, **kw):
    r = run_cli(*args, "--json", **kw)
    assert r.code == 0, r.stderr
    env = r.json()
    assert env["ok"] is True
    return env["result"]


# -- blk ------------------------------------------------------------------------------------


def test_blk_write_read_file_round_trip(tmp_path):
    img = tmp_path / "disk.img"
    with emulator(tmp_path, "blk", "--image", str(img), "--size", "8M") as (url, _proc):
        payload = os.urandom(300_000)
        src = tmp_path / "in.bin"
        src.write_bytes(payload)
        r = ok("blk", "write", url, "--sector", "2048", "-i", str(src), "--flush")
        assert r["bytes"] == 300_032 and r["padded"] == 32 and r["flushed"] is True
        with open(img, "rb") as f:
            f.seek(2048 * SECTOR)
            assert f.read(300_032) == payload + bytes(32)
        back = tmp_path / "back.bin"
        r = ok("blk", "read", url, "--sector", "2048", "--count", str(300_032 // SECTOR), "-o", str(back))
        assert back.read_bytes() == payload + bytes(32) and r["output"] == str(back)
        text = run_cli("blk", "write", url, "--sector", "0", "--count", "2", "--pattern", "0xdeadbeef")
        assert text.code == 0 and text.stdout == "wrote 1024 bytes (2 sectors) at sector 0\n"
        raw = run_cli("blk", "read", url, "--sector", "0", "--count", "2")
        assert raw.stdout_bytes == bytes.fromhex("deadbeef") * 256  # raw bytes into a pipe
        dump = run_cli("blk", "read", url, "--sector", "1", "--count", "1", "--hex")
        assert dump.stdout.startswith("00000200  de ad be ef")
        assert ok("blk", "id", url)["id"] == "l4vctl-disk.img"
        assert ok("blk", "flush", url)["flush_negotiated"] is True
        assert ok("blk", "write-zeroes", url, "--sector", "0", "--count", "1")["count"] == 1
        assert ok("blk", "read", url, "--sector", "0", "--count", "1")["hex"] == "00" * 512


def test_blk_read_json_carries_hash_and_data():
    r = ok("blk", "read", "emu:blk", "--sector", "0", "--count", "1")
    assert r["bytes"] == 512 and r["hex"] == "00" * 512
    assert r["sha256"] == "076a27c79e5ace2a3d47f9dd2e83e4ff6ea8872b3c2218f66c92b89b55f36560"


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["blk", "read", "emu:blk?size=1M", "--sector", "2047", "--count", "2"], 6, "IN at sector 2047"),
        (["blk", "write", "emu:blk?ro=1", "--sector", "0", "--count", "1", "--pattern", "00"], 6, "read-only"),
        (["blk", "read", "emu:blk", "--sector", "-1", "--count", "1"], 2, "must not be negative"),
        (["blk", "write", "emu:blk", "--sector", "0", "--pattern", "zz", "--count", "1"], 2, "not hex bytes"),
        (["blk", "write", "emu:blk", "--sector", "0", "--pattern", "00"], 2, "--pattern needs --count"),
        (["blk", "write", "emu:blk", "--sector", "0"], 2, "exactly one of"),
        (["blk", "write", "emu:blk", "--sector", "0", "-i", "/nonexistent"], 3, "/nonexistent"),
        (["blk", "read", "emu:net", "--sector", "0", "--count", "1"], 5, "is not a block device"),
        (["rng", "read", "emu:rng", "--bytes", "lots"], 2, "--bytes"),
        (["console", "send", "emu:console"], 2, "exactly one of TEXT"),
        (["net", "send", "emu:net", "--text", "x", "--to", "nope"], 2, "is not a MAC address"),
        (["bench", "--bs", "1000", "--time", "0.1s"], 2, "multiple of 512"),
        (["bench", "--time", "forever"], 2, "is not a duration"),
        (["bench", "emu:blk?ro=1", "--workload", "randwrite", "--time", "0.1s"], 2, "read-only"),
    ],
)
def test_io_errors(args, code, fragment):
    r = run_cli(*args)
    assert r.code == code, (r.code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr


# -- rng ------------------------------------------------------------------------------------


def test_rng_read():
    r = ok("rng", "read", "emu:rng", "--bytes", "4096")
    data = bytes.fromhex(r["hex"])
    assert len(data) == 4096 and len(set(data)) > 200  # entropy, not a constant
    raw = run_cli("rng", "read", "emu:rng?abi=classic", "--bytes", "100K")
    assert raw.code == 0 and len(raw.stdout_bytes) == 100 * 1024


def test_rng_to_file(tmp_path):
    out = tmp_path / "r.bin"
    r = ok("rng", "read", "emu:rng", "--bytes", "1M", "-o", str(out))
    assert out.stat().st_size == 1 << 20 and r["bytes"] == 1 << 20


# -- console ------------------------------------------------------------------------------------


def test_console_echo_interactive_from_a_pipe():
    r = subprocess.run([sys.executable, "-m", "l4vctl", "console", "emu:console"], input=b"hello\nworld\n",
                       capture_output=True, timeout=30)  # fmt: skip
    assert r.returncode == 0 and r.stdout == b"hello\nworld\n", r.stderr


def test_console_send_and_recv_through_files(tmp_path):
    out = tmp_path / "out.txt"
    inp = tmp_path / "in.txt"
    inp.write_bytes(b"login: ")
    with emulator(tmp_path, "console", "--io", "null", "--output", str(out), name="o.sock") as (url, _p):
        assert ok("console", "send", url, "uname -a", "--newline")["sent"] == 9
        assert out.read_bytes() == b"uname -a\n"
    # input goes to the first driver that posts receive buffers
    with emulator(tmp_path, "console", "--io", "null", "--input", str(inp), name="i.sock") as (url, _p):
        r = ok("console", "recv", url, "--until", "login:", "--wait", "3")
        assert r["text"] == "login: "
    r = run_cli("console", "recv", "emu:console?io=null", "--until", "never", "--wait", "0.2")
    assert r.code == 7 and "did not arrive" in r.stderr


def test_console_pty(tmp_path):
    path = tmp_path / "pty.sock"
    proc = subprocess.Popen([sys.executable, "-m", "l4vctl", "emulate", "console", "--pty", "--socket", str(path),
                             "--json", "-q"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ready = json.loads(proc.stdout.readline())["result"]
        pty = ready["pty"]
        assert pty.startswith("/dev/pts/")
        import termios
        import tty

        fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
        try:
            tty.setraw(fd)
            os.write(fd, b"typed")
            r = ok("console", "recv", ready["url"], "--bytes", "5", "--wait", "3")
            assert r["text"] == "typed"
            assert ok("console", "send", ready["url"], "shown")["sent"] == 5
            import select

            got = b""
            while len(got) < 5 and select.select([fd], [], [], 3)[0]:
                got += os.read(fd, 100)
            assert got == b"shown"
            termios.tcflush(fd, termios.TCIOFLUSH)
        finally:
            os.close(fd)
    finally:
        reap(proc)


# -- net ---------------------------------------------------------------------------------------------


def test_net_ping_two_embedded_devices():
    r = ok(
        "net",
        "ping",
        f"emu:net?link=t-ping-{os.getpid()}",
        f"emu:net?link=t-ping-{os.getpid()}",
        "--count",
        "3",
        "--size",
        "100",
    )
    assert r["sent"] == 3 and r["received"] == 3 and r["lost"] == 0 and r["rtt_ms"]["min"] > 0


def test_net_ping_without_a_cable_times_out():
    r = run_cli("net", "ping", "emu:net", "emu:net?mac=52:54:00:00:00:99", "--count", "1", "--timeout", "0.2")
    assert r.code == 7 and "one cable" in r.stderr


def test_net_send_recv_between_two_emulator_processes(tmp_path):
    link = f"t-sr-{os.getpid()}"  # link names are machine-wide: one per test run
    with emulator(tmp_path, "net", "--link", link, name="a.sock") as (a, _pa), \
         emulator(tmp_path, "net", "--link", link, name="b.sock") as (b, _pb):  # fmt: skip
        recv = subprocess.Popen([sys.executable, "-m", "l4vctl", "net", "recv", b, "--count", "2", "--wait", "10",
                                 "--json"], stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            # the receiver is attached once its RX queue has buffers posted
            def rx_posted():
                q = run_cli("queue-stats", b, "--json").json()["result"]["queues"][0]
                return q["device"]["avail_idx"] > 0

            assert wait_for(rx_posted, 20, 0.05)
            sent = ok("net", "send", a, "--text", "hello", "--count", "2")
            assert sent["sent"] == 2 and sent["src"] == "52:54:00:12:34:56"
            out, _ = recv.communicate(timeout=20)
        finally:
            reap(recv)
        frames = json.loads(out)["result"]["frames"]
        assert [f["payload_text"] for f in frames] == ["hello", "hello"]
        assert frames[0]["src"] == "52:54:00:12:34:56" and frames[0]["type"] == 0x88B5


def test_net_loopback():
    from l4vctl.drivers.net import NetDriver, frame
    from l4vctl.session import Session

    with Session("emu:net?loop=1") as s:
        s.handshake()
        d = NetDriver(s)
        d.send(frame(d.mac, d.mac, 0x88B5, b"round"))
        got = d.receive(2)
        assert got and got[0].endswith(b"round")


def test_link_takes_two_devices_only():
    from l4vctl.errors import UsageError
    from l4vctl.session import Session

    link = f"t-three-{os.getpid()}"
    with Session(f"emu:net?link={link}"), Session(f"emu:net?link={link}"):
        with pytest.raises(UsageError, match="already has two devices"):
            Session(f"emu:net?link={link}").open()


# -- bench ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", ["randread", "seqread", "randwrite", "seqwrite"])
def test_bench_result_schema(workload):
    r = ok("bench", "emu:blk?size=8M", "--workload", workload, "--time", "0.3s", "--qd", "8", "--bs", "8k")
    assert r["workload"] == workload and r["bs"] == 8192 and r["qd"] == 8
    assert r["requests"] > 0 and r["bytes"] == r["requests"] * 8192
    assert r["iops"] > 0 and r["mb_per_s"] > 0
    lat = r["latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert set(r) >= {"seconds", "indirect", "event_idx", "mode", "cpus"}


def test_bench_text_and_modes():
    r = run_cli("bench", "emu:blk?cmd_mode=1&features=event_idx", "--time", "0.2s", "--indirect", "off")
    assert r.code == 0 and "req/s" in r.stdout and "indirect off, event_idx on, mode cmd" in r.stdout
