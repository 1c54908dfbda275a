"""l4vctl's vhost-user front-end against l4vctl's own vhost-user back-end, every device class.

``l4vctl emulate ... --vhost-user PATH`` serves the emulator's models over
vhost-user; ``vhost-user:PATH?type=TYPE`` drives them.  The two share
schemas, never code paths: the front-end's side of every message is built
in l4vctl/backends/vhost_user, the back-end's parsed in l4vctl/emulator.
What each test checks lies outside both: the image file, the console's
output file, frames crossing to an L4-VIRTIO device on the same cable.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from l4vctl import catalog as cat
from l4vctl.drivers.console import ConsoleDriver
from l4vctl.drivers.net import ETHERTYPE, NetDriver, frame, parse_frame
from l4vctl.drivers.rng import RngDriver
from l4vctl.session import Session
from tests.conftest import run_cli
from tests.emu import ready_lines, reap


@contextlib.contextmanager
def served(*specs: str):
    """``l4vctl emulate -q --device SPEC ...``; yields the ready lines (one URL per device)."""
    args = [a for spec in specs for a in ("--device", spec)]
    proc = subprocess.Popen([sys.executable, "-m", "l4vctl", "emulate", "-q", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        yield ready_lines(proc, len(specs))
    finally:
        reap(proc)


def ok(*args):
    r = run_cli(*args, "--json")
    assert r.code == 0, r.stderr
    return r.json()["result"]


def test_every_class_is_identified(tmp_path):
    specs = [f"{kind},vhost-user={tmp_path / kind}.sock" for kind in ("blk", "net", "rng", "console")]
    with served(*specs) as urls:
        for url, (name, queues) in zip(urls, [("BLOCK", 1), ("NET", 2), ("RNG", 1), ("CONSOLE", 2)]):
            assert url.startswith("vhost-user:")
            r = ok("probe", url)
            assert r["device"]["name"] == name and r["num_queues"] == queues, (url, r["num_queues"])
            assert "synthesised from the vhost-user back-end" in r["notes"][0]


def test_blk_data_lands_in_the_image(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    with served(f"blk,image={image},vhost-user={tmp_path / 'b.sock'}") as (url,):
        src = tmp_path / "data.bin"
        src.write_bytes(os.urandom(128 * 1024))
        ok("blk", "write", url, "--sector", "40", "-i", str(src), "--flush")
        with open(image, "rb") as f:
            f.seek(40 * 512)
            assert f.read(len(src.read_bytes())) == src.read_bytes()
        r = ok("blk", "read", url, "--sector", "40", "--count", "16")
        assert bytes.fromhex(r["hex"]) == src.read_bytes()[: 16 * 512]
        b = ok("bench", url, "--time", "0.3s", "--qd", "8")
        assert b["requests"] > 0 and b["num_queues"] == 1


def test_rng_ring_size_is_the_front_ends_to_choose(tmp_path):
    with served(f"rng,num_max=64,vhost-user={tmp_path / 'r.sock'}") as (url,):
        big = run_cli("rng", "read", f"{url}&num_max=128", "--bytes", "16")
        lines = big.stderr.strip().splitlines()
        assert big.code == 4 and len(lines) == 1, big.stderr
        assert "refused SET_VRING_NUM" in lines[0] and "128-entry ring" in lines[0] and "?num_max=N" in lines[0]
        with Session(f"{url}&num_max=64") as s:  # the back-end lives on: a ring it takes works
            s.handshake()
            rng = RngDriver(s, chunk=1024, depth=4)
            first, second = rng.read(8192), rng.read(8192)
        assert len(first) == len(second) == 8192 and first != second
        assert len(set(first)) > 200  # entropy, not a filler
        r = ok("rng", "read", f"{url}&num_max=64", "--bytes", "100")
        assert r["bytes"] == 100 and len(bytes.fromhex(r["hex"])) == 100


def test_default_ring_sizes_are_the_models(tmp_path):
    specs = [f"{kind},vhost-user={tmp_path / kind}.sock" for kind in ("blk", "net", "rng", "console")]
    with served(*specs) as urls:
        for url, size in zip(urls, [256, 256, 128, 128]):  # what l4vctl's models offer, taken without ?num_max=
            n = ok("negotiate", url)
            assert [q["num"] for q in n["queues"]] == [size] * len(n["queues"]), (url, n["queues"])
        assert len(bytes.fromhex(ok("rng", "read", urls[2], "--bytes", "64")["hex"])) == 64


def test_console_echo_and_output(tmp_path):
    out = tmp_path / "console.out"
    with served(f"console,io=echo,vhost-user={tmp_path / 'c.sock'}",
                f"console,io=null,output={out},vhost-user={tmp_path / 'd.sock'}") as (echo, sink):  # fmt: skip
        with Session(echo) as s:
            s.handshake()
            con = ConsoleDriver(s, rx_buffers=32)
            con.send(b"over vhost-user\n")
            got = b""
            for _ in range(20):
                got += con.receive(0.5)
                if len(got) >= 16:
                    break
        assert got == b"over vhost-user\n"
        ok("console", "send", sink, "written to a file")
        assert out.read_bytes() == b"written to a file"


def test_net_crosses_to_an_l4virtio_device(tmp_path):
    with served(f"net,link=lan,mac=02:00:00:00:00:0a,vhost-user={tmp_path / 'n.sock'}",
                f"net,link=lan,mac=02:00:00:00:00:0b,socket={tmp_path / 'u.sock'}") as (vhost, unix):  # fmt: skip
        assert vhost.endswith("?type=net") and unix.startswith("unix:")
        r = ok("net", "ping", vhost, unix, "--count", "4")
        assert r["received"] == 4 and r["from"] == "02:00:00:00:00:0a" and r["to"] == "02:00:00:00:00:0b"
        with Session(vhost) as a, Session(unix) as b:
            a.handshake()
            b.handshake()
            assert cat.NET_F_MAC in a.negotiated
            da, db = NetDriver(a), NetDriver(b)
            for i in range(10):
                da.send(frame(db.mac, da.mac, ETHERTYPE, bytes([i]) * 300))
            got: list[bytes] = []
            for _ in range(40):
                got += db.receive(0.5)
                if len(got) >= 10:
                    break
        assert [parse_frame(f)["payload"] for f in got] == [bytes([i]) * 300 for i in range(10)]


@pytest.mark.parametrize("kind", ["net", "rng", "console"])
def test_negotiate_and_queue_stats(tmp_path, kind):
    with served(f"{kind},vhost-user={tmp_path / kind}.sock") as (url,):
        n = ok("negotiate", url)
        assert n["status"]["value"] == 0x0F and cat.VERSION_1_BIT in n["negotiated"]
        q = ok("queue-stats", url)
        assert q["device_side"] is None and len(q["queues"]) == q["num_queues"]
