"""--pcap on net commands: the file is classic libpcap, read back here and by tcpdump."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli
from tests.emu import emulator, reap, wait_for

A_MAC = bytes.fromhex("525400123456")
B_MAC = bytes.fromhex("525400123457")


def read_pcap(path):
    """(file header fields, [(seconds, frame)]) of a classic pcap file, parsed independently of l4vctl."""
    data = path.read_bytes()
    assert len(data) >= 24, "shorter than a pcap file header"
    magic, major, minor, zone, sigfigs, snaplen, linktype = struct.unpack_from("<IHHiIII", data, 0)
    header = {"magic": magic, "version": (major, minor), "zone": zone, "sigfigs": sigfigs, "snaplen": snaplen,
              "linktype": linktype}  # fmt: skip
    frames = []
    pos = 24
    while pos < len(data):
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, pos)
        pos += 16
        assert usec < 1_000_000 and incl == orig and pos + incl <= len(data)
        frames.append((sec + usec / 1e6, data[pos : pos + incl]))
        pos += incl
    return header, frames


def tcpdump_lines(path):
    """``tcpdump -r FILE -nn -e`` lines, one per frame; fails under CI when tcpdump is missing, else skips."""
    tool = shutil.which("tcpdump")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tcpdump is not installed (CI installs it: .ci/run)")
        pytest.skip("tcpdump is not installed")
    r = subprocess.run([tool, "-r", str(path), "-nn", "-e"], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert "link-type EN10MB (Ethernet)" in r.stderr
    return [line for line in r.stdout.splitlines() if not line.startswith((" ", "\t"))]  # no payload dumps


def test_ping_capture_is_read_back_and_by_tcpdump(tmp_path):
    path = tmp_path / "ping.pcap"
    link = f"t-pcap-{os.getpid()}"
    before = time.time()
    r = run_cli("net", "ping", f"emu:net?link={link}", f"emu:net?link={link}", "--count", "3", "--size", "60",
                "--pcap", str(path), "--json")  # fmt: skip
    assert r.code == 0 and r.json()["result"]["received"] == 3, r.stderr
    header, frames = read_pcap(path)
    assert header == {"magic": 0xA1B2C3D4, "version": (2, 4), "zone": 0, "sigfigs": 0, "snaplen": 65535,
                      "linktype": 1}  # fmt: skip
    # at A: each request sent, each answer received, in order; no virtio-net header in front
    assert len(frames) == 6
    for i, (when, frame) in enumerate(frames):
        assert before - 1 <= when <= time.time() + 1
        assert len(frame) == 14 + 4 + 60 and frame[12:14] == b"\x88\xb5"  # header, sequence number, payload
        seq = i // 2
        assert frame[14:18] == seq.to_bytes(4, "big") and frame[18:] == bytes(60)
        if i % 2 == 0:
            assert frame[0:6] == B_MAC and frame[6:12] == A_MAC
        else:
            assert frame[0:6] == A_MAC and frame[6:12] == B_MAC
    times = [w for w, _f in frames]
    assert times == sorted(times)
    lines = tcpdump_lines(path)
    assert len(lines) == 6
    assert "52:54:00:12:34:56 > 52:54:00:12:34:57, ethertype Unknown (0x88b5), length 78" in lines[0]
    assert "52:54:00:12:34:57 > 52:54:00:12:34:56, ethertype Unknown (0x88b5), length 78" in lines[1]


def test_send_and_recv_captures_between_two_emulator_processes(tmp_path):
    link = f"t-pcap-sr-{os.getpid()}"
    sent_pcap, recv_pcap = tmp_path / "sent.pcap", tmp_path / "recv.pcap"
    with emulator(tmp_path, "net", "--link", link, name="a.sock") as (a, _pa), \
         emulator(tmp_path, "net", "--link", link, name="b.sock") as (b, _pb):  # fmt: skip
        recv = subprocess.Popen([sys.executable, "-m", "l4vctl", "net", "recv", b, "--count", "2", "--wait", "10",
                                 "--pcap", str(recv_pcap)], stdout=subprocess.DEVNULL)  # fmt: skip
        try:

            def rx_posted():
                r = run_cli("queue-stats", b, "--json")
                return r.code == 0 and r.json()["result"]["queues"][0]["device"]["avail_idx"] > 0

            assert wait_for(rx_posted, 20, 0.05)
            r = run_cli("net", "send", a, "--hex", "0102030405", "--count", "2", "--pcap", str(sent_pcap))
            assert r.code == 0, r.stderr
            assert recv.wait(20) == 0
        finally:
            reap(recv)
    _h, sent = read_pcap(sent_pcap)
    _h, got = read_pcap(recv_pcap)
    want = b"\xff" * 6 + A_MAC + b"\x88\xb5" + bytes.fromhex("0102030405")
    assert [f for _w, f in sent] == [want, want]
    assert [f for _w, f in got] == [want, want]
    assert len(tcpdump_lines(recv_pcap)) == 2


def test_pcap_file_problems(tmp_path):
    r = run_cli("net", "send", "emu:net", "--text", "x", "--pcap", str(tmp_path))
    assert r.code == 2 and "is a directory" in r.stderr
    r = run_cli("net", "send", "emu:net", "--text", "x", "--pcap", str(tmp_path / "no" / "dir.pcap"))
    assert r.code == 3 and "dir.pcap" in r.stderr and "Traceback" not in r.stderr


def test_a_capture_that_ends_early_is_readable(tmp_path):
    """A receive that gives up still leaves a valid (empty) capture."""
    path = tmp_path / "none.pcap"
    r = run_cli("net", "recv", "emu:net", "--wait", "0.1", "--pcap", str(path))
    assert r.code == 7
    header, frames = read_pcap(path)
    assert header["linktype"] == 1 and frames == []
    assert tcpdump_lines(path) == []
