"""The L4Re bridge against a real L4Re system: Fiasco, L4Re and real L4-VIRTIO servers under QEMU.

One system boots for the module (cons with console ``con0``, l4vio_switch
with ports ``net0`` and ``net1``, ahci-drv serving a disk image as
``blk0``, all held by l4vagent on COM2); a second one serves the disk
through nvme-drv.  The faults at the end (a console server and a block
server that die, a link that stalls, QEMU killed mid-command) run last on
the first system, which they break.  In CI (CI=true) a missing SDK, QEMU or
compiler fails these tests; elsewhere they skip, naming what is missing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from l4vctl import catalog as cat
from l4vctl.drivers.net import NetDriver, frame
from l4vctl.errors import UnavailableError
from l4vctl.session import Session
from tests.emu import emulator
from tests.l4re_system import booted, disk_pattern

pytestmark = pytest.mark.l4re


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with booted(tmp_path_factory, "ahci") as s:
        yield s


@pytest.fixture(scope="module")
def nvme(tmp_path_factory):
    with booted(tmp_path_factory, "nvme") as s:
        yield s


def l4vctl(*args: str, timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess:
    """The installed command line, as a user runs it (a process of its own)."""
    return subprocess.run([sys.executable, "-m", "l4vctl", *map(str, args)], capture_output=True, timeout=timeout,
                          input=input)  # fmt: skip


def result(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)["result"]


# -- fidelity: the emulator's profiles against the real servers (first: the devices are still fresh) ------

#: Each agent device and the emulator URL that reproduces its server.
PROFILES = {
    "con0": "emu:console?profile=l4re-cons",
    "net0": "emu:net?profile=l4re-switch",
    "blk0": "emu:blk?profile=l4re-ahci&size=4M",
}
#: Bytes a real server randomises: the switch port's MAC.
RANDOM = {"net0": range(0x100, 0x106)}


def page_of(url: str) -> bytes:
    s = Session(url, role="monitor")
    with s:
        return s.page_bytes()


def differences(real: bytes, emu: bytes, skip=()) -> list[str]:
    return [f"{i:#05x}: real {real[i]:#04x} emulator {emu[i]:#04x}" for i in range(len(real))
            if i not in skip and real[i] != emu[i]]  # fmt: skip


@pytest.mark.parametrize("dev", list(PROFILES))
def test_a_profile_page_equals_the_real_server_page(system, dev):
    real, emu = page_of(system.url(dev)), page_of(PROFILES[dev])
    assert len(real) == len(emu) == cat.PAGE_SIZE
    assert differences(real, emu, RANDOM.get(dev, ())) == []


#: The same profiles as ``l4vctl emulate`` arguments (a process that lives across sessions).
EMULATE = {
    "con0": ("console", "--profile", "l4re-cons"),
    "net0": ("net", "--profile", "l4re-switch"),
    "blk0": ("blk", "--profile", "l4re-ahci", "--size", "4M"),
}


@pytest.mark.parametrize("dev", list(PROFILES))
def test_negotiate_goes_the_same_way_on_the_server_and_its_profile(system, dev, tmp_path):
    def outcome(url):
        r = result(l4vctl("negotiate", url, "--json"))
        return {"negotiated": r["negotiated"], "status": r["status"], "transitions": r["transitions"],
                "queues": [(q["num"], q["accepted"]) for q in r["queues"]]}  # fmt: skip

    with emulator(tmp_path, *EMULATE[dev]) as (url, _proc):
        assert outcome(system.url(dev)) == outcome(url)
        # after a session (and the reset at its end) the pages still agree, the block server's
        # features included (it publishes them on reset); the generation counts the sessions
        # each side has seen, so it is left out
        real, emu = page_of(system.url(dev)), page_of(url)
        # where the driver put its rings differs (the bridge lends at fresh device addresses)
        qoff = int.from_bytes(real[0x2C:0x30], "little")
        nq = int.from_bytes(real[0x28:0x2C], "little")
        addresses = [qoff + 40 * q + i for q in range(nq) for i in range(8, 32)]
        assert differences(real, emu, [*RANDOM.get(dev, ()), 0xFC, 0xFD, 0xFE, 0xFF, *addresses]) == []


# -- what the agent holds -------------------------------------------------------------------------


def test_devices_lists_what_the_agent_holds(system):
    rows = result(l4vctl("devices", f"l4re:{system.link}", "--json"))["devices"]
    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == ["con0", "net0", "net1", "blk0"]
    assert [by_name[n]["device_id"] for n in by_name] == [3, 1, 1, 2]
    assert all(r["vendor"] == cat.L4VIRTIO_VENDOR_KK for r in rows)


def test_a_url_without_a_device_names_the_choices(system):
    p = l4vctl("probe", f"l4re:{system.link}")
    assert p.returncode == 2
    assert b"4 devices (con0, net0, net1, blk0)" in p.stderr and b"?dev=NAME" in p.stderr
    p = l4vctl("probe", system.url("nosuch"))
    assert p.returncode == 3 and b"no device 'nosuch'" in p.stderr


# -- probe, negotiate, dump-config, queue-stats on the real servers ---------------------------------


def test_probe_shows_each_real_server(system):
    con = result(l4vctl("probe", system.url("con0"), "--json"))
    assert con["device"]["id"] == 3 and con["num_queues"] == 2 and con["queues_offset"] == 0x120
    assert con["features"]["bits"] == [32]  # cons offers VERSION_1 only
    net = result(l4vctl("probe", system.url("net0"), "--json"))
    assert net["features"]["bits"] == [5, 15, 28, 32] and net["queues_offset"] == 0x110
    blk = result(l4vctl("probe", system.url("blk0"), "--json"))
    assert blk["device"]["id"] == 2 and blk["num_queues"] == 1 and blk["queues"][0]["num_max"] == 256


def test_negotiate_reaches_driver_ok_on_the_real_console(system):
    got = result(l4vctl("negotiate", system.url("con0"), "--json"))
    assert got["status"]["value"] == 0x0F
    assert all(q["accepted"] for q in got["queues"])
    # the agent reset the device when the command ended
    again = result(l4vctl("probe", system.url("con0"), "--json"))
    assert again["status"]["value"] == 0 and again["generation"] > 0


def test_dump_config_live_and_saved_agree(system, tmp_path):
    saved = tmp_path / "net0.hex"
    p = l4vctl("dump-config", system.url("net0"), "--hex")
    assert p.returncode == 0, p.stderr
    saved.write_bytes(p.stdout)
    live = result(l4vctl("dump-config", system.url("net0"), "--json"))
    offline = result(l4vctl("dump-config", saved, "--json"))
    for key in ("header", "features", "device_config", "queues"):
        assert live[key] == offline[key], key
    assert live["header"]["queues_offset"] == 0x110


def test_queue_stats_reads_the_real_page(system):
    got = result(l4vctl("queue-stats", system.url("con0"), "--json"))
    assert [q["num_max"] for q in got["queues"]] == [256, 256]


# -- real I/O ----------------------------------------------------------------------------------------


def test_console_send_reaches_the_real_cons(system):
    text = f"bridge says {os.getpid()}"
    assert l4vctl("console", "send", system.url("con0"), text, "--newline").returncode == 0
    deadline = time.monotonic() + 10
    while text not in system.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert text in system.log()


def test_console_recv_gets_what_is_typed_into_the_system(system):
    proc = subprocess.Popen([sys.executable, "-m", "l4vctl", "console", "recv", system.url("con0"), "--until", "END",
                             "--wait", "20", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        marker = b"typed into L4Re END\r"
        deadline = time.monotonic() + 20
        # cons hands input to con0 once its driver is up; type until the receiver has it
        while proc.poll() is None and time.monotonic() < deadline:
            system.type_in(marker)
            try:
                proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "typed into L4Re END" in json.loads(out)["result"]["text"]


def test_net_ping_between_two_switch_ports(system):
    got = result(l4vctl("net", "ping", system.url("net0"), system.url("net1"), "--count", "5", "--json"))
    assert got["sent"] == 5 and got["received"] == 5


def test_net_frames_cross_the_switch_both_ways(system):
    a, b = Session(system.url("net0")), Session(system.url("net1"))
    with a, b:  # two devices of one agent share the link
        a.handshake()
        b.handshake()
        na, nb = NetDriver(a), NetDriver(b)
        for src, dst in ((na, nb), (nb, na)):
            payload = os.urandom(300)
            src.send(frame(dst.mac, src.mac, 0x88B5, payload))
            got = dst.receive(5.0)
            assert got and got[0][14:] == payload


def test_blk_write_flush_read_against_the_real_ahci_server(system):
    data = os.urandom(8192)
    src = system.dir / "w.bin"
    src.write_bytes(data)
    assert l4vctl("blk", "write", system.url("blk0"), "--sector", 40, "-i", src, "--flush").returncode == 0
    with open(system.disk, "rb") as f:  # the bytes are in the disk image on the host
        f.seek(40 * 512)
        assert f.read(8192) == data
    back = l4vctl("blk", "read", system.url("blk0"), "--sector", 40, "--count", 16)
    assert back.returncode == 0 and back.stdout == data
    # sectors nobody wrote still hold the image's pattern
    untouched = l4vctl("blk", "read", system.url("blk0"), "--sector", 7, "--count", 2)
    assert untouched.stdout == disk_pattern(9 * 512)[7 * 512 :]


def test_blk_request_the_server_refuses_is_a_clean_error(system):
    # a sector beyond the capacity: the server answers IOERR and stays up
    p = l4vctl("blk", "read", system.url("blk0"), "--sector", 8190, "--count", 8)
    assert p.returncode == 6 and b"IOERR" in p.stderr and p.stderr.count(b"\n") == 1
    assert l4vctl("blk", "read", system.url("blk0"), "--sector", 0, "--count", 1).returncode == 0


def test_nvme_server_reads_and_writes(nvme):
    # fresh, the server's page is the l4re-nvme profile's
    assert differences(page_of(nvme.url("blk0")), page_of("emu:blk?profile=l4re-nvme&size=4M")) == []
    blk = result(l4vctl("probe", nvme.url("blk0"), "--json"))
    assert blk["device"]["id"] == 2
    data = os.urandom(4096)
    src = nvme.dir / "w.bin"
    src.write_bytes(data)
    assert (
        l4vctl("blk", "write", nvme.url("blk0"), "--sector", 64, "-i", src, "--flush", "--timeout", 20).returncode == 0
    )
    with open(nvme.disk, "rb") as f:
        f.seek(64 * 512)
        assert f.read(4096) == data
    # after a session the server shows what it offers (it publishes features on reset)
    blk = result(l4vctl("probe", nvme.url("blk0"), "--json"))
    assert set(blk["features"]["bits"]) >= {cat.BLK_F_WRITE_ZEROES, 32}


# -- more ways in, and hosts that misbehave (before the faults that break the system) -----------------


def test_a_tcp_link_works_too(system):
    # a TCP chardev, played here by a forwarder to the unix socket
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def forward():
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.connect(str(system.com2))

        def pump(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        t = threading.Thread(target=pump, args=(unix, conn), daemon=True)
        t.start()
        pump(conn, unix)
        t.join(5)
        conn.close()
        unix.close()

    t = threading.Thread(target=forward, daemon=True)
    t.start()
    try:
        got = result(l4vctl("probe", f"l4re:tcp:127.0.0.1:{port}?dev=net1", "--json"))
        assert got["device"]["id"] == 1
    finally:
        srv.close()
        t.join(5)


def test_the_agent_survives_hostile_frames(system):
    from l4vctl.backends import open_backend
    from l4vctl.wire import Cap

    backend = open_backend(system.url("con0"))
    link = backend.open_link(5.0)
    try:
        devices = dict((name, h) for h, name in link.devices())
        answers = [
            link.request(cat.KIND_READ, flags=9999, words=[3, 0, 16]).label,  # no such handle
            link.request(cat.KIND_READ, flags=devices["con0"], words=[3, 0, 16]).label,  # a device is not memory
            link.request(cat.KIND_WRITE, flags=0, words=[0, 0, 1], data=b"x").label,
            link.request(cat.KIND_REQUEST, 0, 0, [0], [Cap(cat.CAP_IRQ, 1, 77)], flags=devices["con0"]).label,
            link.request(cat.KIND_REQUEST, 0, 0, [0] * 70, flags=devices["con0"]).label,  # too many registers
            link.request(cat.KIND_REQUEST, cat.L4VCTL_PROTO_AGENT, 99).label,  # unknown agent request
            link.request(cat.KIND_REQUEST, cat.L4VCTL_PROTO_AGENT, cat.AGENT_OP_ALLOC_DS, [1 << 40, 0]).label,
            link.request(42).label,  # unknown kind
        ]
        assert all(a < 0 for a in answers), answers
        ds = link.agent(cat.AGENT_OP_ALLOC_DS, [4096, 0]).caps[0].handle
        bad = [
            link.request(cat.KIND_READ, flags=ds, words=[3, (1 << 64) - 1, 2]).label,  # offset overflow
            link.request(cat.KIND_READ, flags=ds, words=[3, 4000, 200]).label,  # past the end
            link.request(cat.KIND_WRITE, flags=ds, words=[1, 0, 100], data=b"\xff\xff\x05\x00abc").label,
            link.request(cat.KIND_WRITE, flags=ds, words=[0, 0, 100], data=b"short").label,
        ]
        assert bad == [-cat.L4_ERANGE, -cat.L4_ERANGE, -cat.L4_EINVAL, -cat.L4_EINVAL]
        link.trigger(31337)  # an unknown IRQ: counted, not fatal
        link.stream.send(b"\xa5\x5a" + os.urandom(3000), 5.0)  # a flood of noise with a marker in front
        stats = dict(zip(cat.AGENT_STATS, link.agent(cat.AGENT_OP_STATS).words, strict=False))
        assert stats["bad_triggers"] >= 1
    finally:
        link.bye()
        link.close()
    assert result(l4vctl("probe", system.url("con0"), "--json"))["device"]["id"] == 3


def test_a_frame_cut_short_does_not_wedge_the_agent(system):
    from l4vctl.link import encode, encode_frame

    frame = encode(encode_frame(cat.KIND_WRITE, 1, 0, 0, [0, 0, 4000], (), 5, os.urandom(4000)))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # a host that dies mid-frame
        s.connect(str(system.com2))
        s.sendall(frame[:1500])
    start = time.monotonic()
    assert result(l4vctl("probe", system.url("net0"), "--json"))["device"]["id"] == 1
    assert time.monotonic() - start < 4  # the agent gave up on the cut frame after a pause


def test_a_host_killed_mid_session_leaves_nothing_behind(system):
    proc = subprocess.Popen([sys.executable, "-m", "l4vctl", "net", "recv", system.url("net1"), "--count", "1",
                             "--wait", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        time.sleep(2.0)  # its driver is up and waiting (the handshake takes about 0.2 s)
        proc.kill()
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the next host's hello makes the agent release the dead host's objects and reset net1
    rows = result(l4vctl("devices", f"l4re:{system.link}", "--json"))["devices"]
    net1 = next(r for r in rows if r["name"] == "net1")
    assert net1["status"] == 0
    got = result(l4vctl("net", "ping", system.url("net0"), system.url("net1"), "--count", "2", "--json"))
    assert got["received"] == 2


# -- faults: no agent, stalls, servers that die, QEMU killed -------------------------------------------


def fake_line(tmp_path, chunks: list[bytes]) -> tuple[str, threading.Thread, socket.socket]:
    """A unix socket that plays ``chunks`` to whoever connects, and never answers."""
    path = str(tmp_path / "line.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve():
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            for c in chunks:
                conn.sendall(c)
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return path, t, srv


@pytest.mark.parametrize("what", ["boot log", "noise", "silence"])
def test_no_agent_on_the_line_is_reported_within_the_timeout(tmp_path, what):
    chunks = {
        "boot log": [b"Fiasco starting...\r\nL4Re: rom/ned loaded\r\n" * 20],
        "noise": [bytes(range(256)) * 8, b"\xa5\x5a" * 300],
        "silence": [],
    }[what]
    path, _t, srv = fake_line(tmp_path, chunks)
    try:
        start = time.monotonic()
        p = l4vctl("probe", f"l4re:unix:{path}?dev=con0", "--timeout", "1")
        took = time.monotonic() - start
    finally:
        srv.close()
    assert p.returncode == 3, p.stderr
    err = p.stderr.decode()
    assert "no l4vagent answered" in err and err.count("\n") == 1
    if what == "boot log":
        assert "Fiasco starting" in err
    assert took < 5


def test_nothing_listening_is_unavailable(tmp_path):
    p = l4vctl("probe", f"l4re:unix:{tmp_path}/none.sock?dev=con0")
    assert p.returncode == 3 and b"no such socket" in p.stderr


def test_a_console_server_that_dies_is_reported(system):
    # cons takes one receive buffer per byte of a burst and dies when it runs out
    args = ["console", "recv", system.url("con0"), "--rx-buffers", "4", "--wait", "15", "--timeout", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "l4vctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            system.type_in(b"a burst longer than four bytes\r")
            try:
                proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err
    assert b"device server is gone" in err and err.count(b"\n") == 1


def test_a_block_server_that_dies_is_reported(system):
    s = Session(system.url("blk0"), timeout=5)
    with s:
        s.handshake()
        vq = s.virtqueue(0)
        mem, addr = s.alloc(4096)
        mem[:16] = (0).to_bytes(4, "little") + bytes(12)  # IN, sector 0
        mem[16] = 0xFF
        # a data buffer far outside the memory lent to the server: it dies on it
        vq.add([(addr, 16, False), (0x7000_0000, 512, True), (addr + 16, 1, True)], 0)
        vq.kick()
        start = time.monotonic()
        with pytest.raises(UnavailableError, match="device server is gone|memory is gone"):
            vq.wait(10)
        assert time.monotonic() - start < 5


def test_a_stalled_link_times_out_and_recovers(system):
    system.pause()
    try:
        start = time.monotonic()
        p = l4vctl("probe", system.url("net0"), "--timeout", "1")
        took = time.monotonic() - start
    finally:
        system.resume()
    assert p.returncode in (3, 7), p.stderr  # no answer within the timeout, one line
    assert p.stderr.count(b"\n") == 1 and took < 6
    # the agent answers the next host after the pause
    assert result(l4vctl("probe", system.url("net0"), "--json"))["device"]["id"] == 1


def test_qemu_killed_mid_command(system):
    args = ["net", "ping", system.url("net0"), system.url("net1"), "--count", "5000", "--timeout", "10"]
    proc = subprocess.Popen([sys.executable, "-m", "l4vctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)  # the pings are under way (5000 take minutes over a serial line)
        system.kill()
        start = time.monotonic()
        _out, err = proc.communicate(timeout=15)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err
    assert b"the link was closed" in err and err.count(b"\n") == 1
    assert took < 3
