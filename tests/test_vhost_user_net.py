"""The vhost-user backend as a net front-end, against a real, independent back-end: DPDK testpmd.

testpmd (tests/testpmd.py starts it; .ci/run installs it) serves vhost-user
net ports without hugepages.  With one port in ``macswap`` mode every frame
comes back with its addresses swapped; with two ports in ``io`` mode what
one port receives leaves the other unchanged.  Every test checks what came
back against what was sent and against testpmd's own counters.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from l4vctl import catalog as cat
from l4vctl.backends.vhost_user import MAX_QUEUES
from l4vctl.backends.vhost_user.client import VhostUserClient
from l4vctl.drivers.net import ETHERTYPE, NetDriver, frame, parse_frame
from l4vctl.errors import UnavailableError
from l4vctl.session import Session
from tests.conftest import run_cli
from tests.testpmd import Testpmd

MAC_A = "02:00:00:00:0a:01"
MAC_B = "02:00:00:00:0b:01"
PEER = bytes.fromhex("0200000000aa")


@pytest.fixture
def macswap(tmp_path):
    t = Testpmd(tmp_path)
    yield t
    t.stop()


@pytest.fixture
def paired(tmp_path):
    t = Testpmd(tmp_path, ports=2, mode="io")
    yield t
    t.stop()


def ok(*args):
    r = run_cli(*args, "--json")
    assert r.code == 0, r.stderr
    return r.json()["result"]


def reported_queue_pairs(sock) -> int:
    """GET_QUEUE_NUM as testpmd answers it, asked here on a connection of our own."""
    c = VhostUserClient(str(sock), 5)
    try:
        assert c.get_u64(cat.VHOST_USER_GET_FEATURES) >> cat.VHOST_USER_F_PROTOCOL_FEATURES & 1
        c.send(cat.VHOST_USER_SET_OWNER)
        c.protocol = c.get_u64(cat.VHOST_USER_GET_PROTOCOL_FEATURES)
        assert c.has_protocol(cat.VHOST_USER_PROTOCOL_F_MQ)
        return c.get_u64(cat.VHOST_USER_GET_QUEUE_NUM)
    finally:
        c.close()


def test_probe_counts_queue_pairs(macswap):
    pairs = reported_queue_pairs(macswap.socks[0])  # testpmd answers its maximum, 128 pairs
    assert pairs >= 1
    r = ok("probe", macswap.urls[0])
    assert r["device"]["name"] == "NET"
    assert r["num_queues"] == 2 * min(pairs, MAX_QUEUES // 2)  # two queues per pair, not one per "queue"
    note = r["notes"][0]
    assert f"GET_QUEUE_NUM {pairs} queue pairs" in note and "net counts pairs" in note
    if pairs > MAX_QUEUES // 2:
        assert f"the page shows the first {MAX_QUEUES // 2} pairs ({MAX_QUEUES} queues)" in note
    assert "no CONFIG protocol feature" in note and "GET_CONFIG" not in note.split(";")[0]
    assert {cat.VERSION_1_BIT, cat.NET_F_MRG_RXBUF, cat.NET_F_MQ} <= set(r["features"]["bits"])
    assert 30 not in r["features"]["bits"] and cat.NET_F_MAC not in r["features"]["bits"]
    d = ok("dump-config", macswap.urls[0])
    assert d["device_config"]["fields"]["max_virtqueue_pairs"] == pairs
    text = run_cli("probe", macswap.urls[0])
    assert text.code == 0 and "NET" in text.stdout and f"{pairs} queue pairs" in text.stdout


def test_negotiate_and_queue_stats(macswap):
    n = ok("negotiate", macswap.urls[0])
    assert n["status"]["value"] == 0x0F
    assert cat.VERSION_1_BIT in n["negotiated"]
    # the driver takes one buffer per frame and drives no control queue: those stay off
    for bit in (cat.NET_F_MRG_RXBUF, cat.NET_F_MQ, cat.NET_F_CTRL_VQ, 34):  # 34: packed rings
        assert bit not in n["negotiated"]
    q = ok("queue-stats", macswap.urls[0])
    assert q["device_side"] is None and len(q["queues"]) == q["num_queues"] > 2


def test_frames_come_back_with_macs_swapped(macswap):
    before = macswap.stats()[0]
    with Session(macswap.urls[0]) as s:
        s.handshake()
        drv = NetDriver(s)
        assert drv.hdr == 12  # VERSION_1: the header carries num_buffers
        sent = [frame(PEER, drv.mac, ETHERTYPE, i.to_bytes(4, "big") + os.urandom(60 + i)) for i in range(30)]
        for f in sent:
            drv.send(f)
        drv.flush()
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < deadline:
            got += drv.receive(deadline - time.monotonic())
    assert len(got) == len(sent)
    by_seq = {parse_frame(f)["payload"][:4]: parse_frame(f) for f in got}
    for f in sent:
        p = parse_frame(f)
        back = by_seq[p["payload"][:4]]
        assert back["dst"] == p["src"] and back["src"] == p["dst"]  # swapped
        assert back["type"] == ETHERTYPE and back["payload"] == p["payload"]  # nothing else changed
    after = macswap.stats()[0]
    assert after["rx"] - before["rx"] == 30 and after["tx"] - before["tx"] == 30


def test_mac_from_the_url(macswap):
    url = f"{macswap.urls[0]}&mac={MAC_A}"
    r = ok("probe", url)
    assert cat.NET_F_MAC in r["features"]["bits"] and any(MAC_A in n for n in r["notes"])
    assert ok("dump-config", url)["device_config"]["fields"]["mac"] == MAC_A
    with Session(url) as s:
        s.handshake()
        assert cat.NET_F_MAC in s.negotiated  # offered by the front-end, not sent to testpmd
        drv = NetDriver(s)
        assert drv.mac == bytes.fromhex(MAC_A.replace(":", ""))
        drv.send(frame(PEER, drv.mac, ETHERTYPE, b"mine"))
        back = parse_frame(drv.receive(5)[0])
        assert back["dst"] == drv.mac and back["payload"][:4] == b"mine"
    for bad, words in ((f"{macswap.urls[0]}&mac=zz", "mac"), (f"vhost-user:{macswap.socks[0]}?type=blk&mac={MAC_A}",
                                                               "option of a net device")):  # fmt: skip
        b = run_cli("probe", bad)
        assert b.code == 2 and words in b.stderr and len(b.stderr.strip().splitlines()) == 1


def test_ping_through_macswap(macswap):
    before = macswap.stats()[0]
    r = ok("net", "ping", macswap.urls[0], "--to", "02:00:00:00:00:aa", "--count", "6", "--size", "200")
    assert r["sent"] == r["received"] == 6 and r["lost"] == 0 and len(r["rtts_ms"]) == 6
    assert r["swapped"] == 6 and r["to"] == "02:00:00:00:00:aa"  # every answer came from --to, to us
    after = macswap.stats()[0]
    assert after["rx"] - before["rx"] == 6 and after["tx"] - before["tx"] == 6
    text = run_cli("net", "ping", f"{macswap.urls[0]}&mac={MAC_A}", "--count", "2")
    assert text.code == 0 and "2 sent, 2 received, 0% lost" in text.stdout
    assert "2 of 2 answers came from 02:00:00:00:00:02 (addresses swapped)" in text.stdout
    bad = run_cli("net", "ping", f"{macswap.urls[0]}&mac={MAC_A}", "--to", MAC_A)
    assert bad.code == 2 and "DEVICE_A's own address" in bad.stderr


def test_ping_with_nothing_coming_back(paired):
    # port 1 has no front-end: testpmd drops what port 0 forwards to it, nothing comes back
    t = time.monotonic()
    r = run_cli("net", "ping", paired.urls[0], "--count", "1", "--timeout", "3")
    assert r.code == 7 and "no echo came back" in r.stderr and "does the network send frames back" in r.stderr
    assert time.monotonic() - t < 15


def test_ping_between_two_ports(paired):
    a, b = f"{paired.urls[0]}&mac={MAC_A}", f"{paired.urls[1]}&mac={MAC_B}"
    before = paired.stats()
    r = ok("net", "ping", a, b, "--count", "5", "--size", "100")
    assert r["sent"] == 5 and r["received"] == 5 and r["lost"] == 0
    assert r["from"] == MAC_A and r["to"] == MAC_B and len(r["rtts_ms"]) == 5
    after = paired.stats()
    for port in (0, 1):  # five requests one way, five answers the other
        assert after[port]["rx"] - before[port]["rx"] == 5 and after[port]["tx"] - before[port]["tx"] == 5
    same = run_cli("net", "ping", paired.urls[0], paired.urls[1], "--count", "1")
    assert same.code == 2 and "both devices have the MAC address" in same.stderr  # testpmd gives no MAC


def test_send_and_recv_commands(paired):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    recv = subprocess.Popen(
        [sys.executable, "-m", "l4vctl", "net", "recv", paired.urls[1], "--count", "3", "--wait", "20", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        sent = 0
        deadline = time.monotonic() + 20
        while recv.poll() is None and time.monotonic() < deadline:
            # until the receiver has posted its buffers, testpmd drops what it cannot deliver: send until it has 3
            r = ok("net", "send", paired.urls[0], "--text", f"hello {sent}", "--to", MAC_B)
            assert r["sent"] == 1 and r["dst"] == MAC_B
            sent += 1
            time.sleep(0.1)
        out, err = recv.communicate(timeout=20)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    assert recv.returncode == 0, err
    import json

    frames = json.loads(out)["result"]["frames"]
    assert len(frames) == 3
    texts = [f"hello {i}" for i in range(sent)]
    for f in frames:
        assert f["dst"] == MAC_B and f["type"] == ETHERTYPE and f["payload_text"] in texts
    assert [texts.index(f["payload_text"]) for f in frames] == sorted(texts.index(f["payload_text"]) for f in frames)
    stats = paired.stats()
    assert stats[0]["rx"] == sent  # testpmd took every frame sent


def test_back_end_dying_gives_a_clear_error(macswap):
    with Session(macswap.urls[0], timeout=2) as s:
        s.handshake()
        drv = NetDriver(s)
        drv.send(frame(PEER, drv.mac, ETHERTYPE, b"before"))
        assert drv.receive(5)
        macswap.proc.kill()
        macswap.proc.wait(10)
        t = time.monotonic()
        with pytest.raises(UnavailableError, match="hung up"):
            for _ in range(50):
                drv.receive(0.2)
        assert time.monotonic() - t < 5


def test_recv_command_when_the_back_end_dies(macswap):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    recv = subprocess.Popen([sys.executable, "-m", "l4vctl", "net", "recv", macswap.urls[0], "--wait", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "virtio is now ready for processing" not in macswap.text():  # testpmd has the receiver's rings
            assert time.monotonic() < deadline and recv.poll() is None, recv.stderr.read() if recv.stderr else ""
            time.sleep(0.05)
        time.sleep(0.3)
        macswap.proc.kill()
        t = time.monotonic()
        _out, err = recv.communicate(timeout=20)
        assert time.monotonic() - t < 10
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    lines = err.strip().splitlines()
    assert recv.returncode == 3 and len(lines) == 1 and "hung up" in lines[0], (recv.returncode, err)


def test_net_commands_refuse_other_classes_and_bad_types(macswap):
    r = run_cli("rng", "read", macswap.urls[0], "--bytes", "4")
    assert r.code == 5 and "not an entropy device" in r.stderr
    r = run_cli("probe", f"vhost-user:{macswap.socks[0]}?type=gpu")
    assert r.code == 2 and "not supported" in r.stderr and "net" in r.stderr


def test_conformance_suite_over_testpmd(macswap):
    r = run_cli("check", macswap.urls[0], "--timeout", "1", "--json")
    assert r.code == 0, r.stdout[-2000:]
    verdicts = {c["name"]: c["verdict"] for c in r.json()["result"]["cases"]}
    assert "fail" not in verdicts.values()
    # the ring cases run against testpmd's own ring walker; the status cases have no wire to run on
    for name in ("desc-loop", "head-out-of-range", "buffer-outside-memory", "driver-vanishes"):
        assert verdicts[name] == "pass", (name, verdicts[name])
    assert macswap.proc.poll() is None  # testpmd lived through it
