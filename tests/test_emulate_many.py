"""Several devices from one ``l4vctl emulate`` process: real processes, sockets and drivers.

Each device must behave as if it had a process of its own: its own driver
slot, its own clients and limits, its own socket file; a busy or hostile
client of one must not be felt by the others.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.errors import TimeoutExpired, UnavailableError, UsageError
from tests.emu import Session, emulator, emulators, hello, raw_connect, ready_lines, reap, wait_for

EMULATE = [sys.executable, "-m", "l4vctl", "emulate"]
DEVICE_IDS = {"blk": 2, "net": 1, "console": 3, "rng": 4}


def device_id(url: str, timeout: float = 5.0) -> int:
    with Session(url, role="monitor", timeout=timeout) as s:
        return s.get("device")


def blk_round_trip(url: str, pattern: bytes, sector: int = 8) -> bytes:
    """Attach as driver, write ``pattern`` at ``sector``, read it back; what was read."""
    from l4vctl.drivers.blk import BlkDriver

    with Session(url, timeout=5) as s:
        s.handshake()
        drv = BlkDriver(s, depth=4)
        drv.write(sector, pattern)
        return bytes(drv.read(sector, len(pattern)))


# -- every device answers its own driver ------------------------------------------------------------


def test_devices_of_different_types_each_serve_their_own_driver(tmp_path):
    from l4vctl.drivers.blk import BlkDriver
    from l4vctl.drivers.console import ConsoleDriver
    from l4vctl.drivers.net import NetDriver, frame
    from l4vctl.drivers.rng import RngDriver

    image = tmp_path / "disk.img"
    specs = [
        f"blk,size=1M,socket={tmp_path}/a.sock",
        f"blk,image={image},size=1M,serial=second,socket={tmp_path}/b.sock",
        f"net,loop,socket={tmp_path}/n.sock",
        f"console,io=echo,socket={tmp_path}/c.sock",
        f"rng,socket={tmp_path}/r.sock",
    ]
    args = [a for spec in specs for a in ("--device", spec)]
    with emulators(len(specs), *args) as (urls, proc):
        assert urls == [f"unix:{tmp_path}/{n}.sock" for n in "abncr"]
        a, b, n, c, r = urls
        # every device has a driver attached at the same time: five driver slots, not one
        with Session(a, timeout=5) as sa, Session(b, timeout=5) as sb, Session(n, timeout=5) as sn, \
                Session(c, timeout=5) as sc, Session(r, timeout=5) as sr:  # fmt: skip
            for s in (sa, sb, sn, sc, sr):
                s.handshake()
            da, db = BlkDriver(sa, depth=4), BlkDriver(sb, depth=4)
            da.write(16, b"\xa1" * 8192)
            db.write(16, b"\xb2" * 8192)
            assert da.read(16, 8192) == b"\xa1" * 8192  # each disk keeps its own data
            assert db.read(16, 8192) == b"\xb2" * 8192
            assert db.get_id() == "second"
            net = NetDriver(sn)
            sent = frame(net.mac, net.mac, 0x88B5, b"one process, many devices")
            net.send(sent)
            got: list[bytes] = []
            for _ in range(40):
                got += net.receive(0.05)
                if got:
                    break
            assert sent in got
            con = ConsoleDriver(sc)
            con.send(b"echo me")
            echoed = b""
            for _ in range(50):
                echoed += con.receive(0.1)
                if len(echoed) >= 7:
                    break
            assert echoed == b"echo me"
            data = RngDriver(sr).read(3000)
            assert len(data) == 3000 and len(set(data)) > 200
        with open(image, "rb") as f:  # the file-backed disk wrote through, the other did not touch it
            f.seek(16 * 512)
            assert f.read(8192) == b"\xb2" * 8192
        assert proc.poll() is None


def test_a_second_driver_is_refused_per_device_not_per_process(tmp_path):
    with emulators(2, "--socket-dir", str(tmp_path), "--device", "rng", "--device", "rng") as (urls, _proc):
        assert urls == [f"unix:{tmp_path}/rng0.sock", f"unix:{tmp_path}/rng1.sock"]
        with Session(urls[0], timeout=5) as first, Session(urls[1], timeout=5) as other:
            first.handshake()
            other.handshake()  # the other device has a driver slot of its own
            with pytest.raises(UnavailableError, match="busy"):
                Session(urls[0], timeout=1).open()


def test_a_busy_driver_on_one_device_does_not_block_another(tmp_path):
    from l4vctl.drivers.blk import BlkDriver

    args = ["--socket-dir", str(tmp_path), "--device", "blk,size=16M", "--device", "blk,size=16M"]
    with emulators(2, *args) as (urls, proc):
        busy, calm = urls
        bench = subprocess.Popen([sys.executable, "-m", "l4vctl", "bench", busy, "--time", "20s", "--qd", "32"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:

            def started():
                with Session(busy, role="monitor", timeout=5) as m:
                    return m.stats()["kicks"] > 0

            assert wait_for(started, 20, 0.05)
            worst = 0.0
            for _ in range(5):
                t0 = time.monotonic()
                assert device_id(calm) == 2
                worst = max(worst, time.monotonic() - t0)
            assert worst < 1.0, worst
            # and real I/O on the calm device goes on while the busy one is flooded
            with Session(calm, timeout=5) as s:
                s.handshake()
                drv = BlkDriver(s, depth=4)
                end = time.monotonic() + 1.0
                done = 0
                while time.monotonic() < end:
                    drv.write(done % 64, bytes([done & 0xFF]) * 4096)
                    assert drv.read(done % 64, 4096) == bytes([done & 0xFF]) * 4096
                    done += 1
                assert done > 10
            assert bench.poll() is None
        finally:
            reap(bench)
        assert proc.poll() is None


# -- one device's bad client does not disturb the others ------------------------------------------------


def test_a_client_that_never_reads_on_one_device_is_not_felt_by_another(tmp_path):
    args = ["--socket-dir", str(tmp_path), "--client-timeout", "1", "--device", "blk", "--device", "blk"]
    with emulators(2, *args) as (urls, proc):
        flooded, other = urls
        bad = raw_connect(flooded)
        try:
            bad.send(hello(role=cat.ROLE_MONITOR))
            bad.setblocking(False)
            req = wire.encode(cat.KIND_REQUEST, 7, cat.L4VIRTIO_PROTOCOL, cat.OP_DEVICE_CONFIG, [])
            out = select.poll()
            out.register(bad, select.POLLOUT)
            sent = 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    bad.send(req)
                    sent += 1
                except BlockingIOError:
                    if not out.poll(300):
                        break  # its replies pile up in the emulator now
            assert sent > 300
            t0 = time.monotonic()
            assert blk_round_trip(other, b"\x5a" * 4096) == b"\x5a" * 4096
            assert device_id(flooded) == 2  # the flooded device still serves others too
            assert time.monotonic() - t0 < 3.0
            hup = select.poll()
            hup.register(bad, select.POLLHUP)
            assert wait_for(lambda: any(ev & select.POLLHUP for _fd, ev in hup.poll(0)), 10, 0.05)
        finally:
            bad.close()
        assert proc.poll() is None


def test_limits_and_timeouts_hold_for_each_device(tmp_path):
    args = ["--socket-dir", str(tmp_path), "--max-clients", "2", "--client-timeout", "0.3", "--device", "rng",
            "--device", "rng"]  # fmt: skip
    with emulators(2, *args) as (urls, proc):
        full, other = urls
        holders = [Session(full, role="monitor", timeout=5) for _ in range(2)]
        silent = raw_connect(other)  # sends no HELLO
        try:
            for h in holders:
                h.open()
            with pytest.raises(UnavailableError, match="as many connections as it allows"):
                Session(full, role="monitor", timeout=0.3).open()
            # the other device has its own two slots (the silent connection holds one until its timeout)
            with Session(other, role="monitor", timeout=5) as m:
                assert m.get("device") == 4
            t0 = time.monotonic()
            silent.settimeout(5)
            assert silent.recv(100) == b""  # closed after --client-timeout on its own device
            assert time.monotonic() - t0 < 3
        finally:
            silent.close()
            for h in holders:
                h.close()
        assert wait_for(lambda: device_id(full) == 4, 5)
        assert proc.poll() is None


def test_running_out_of_descriptors_keeps_every_device_serving(tmp_path):
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    proc = subprocess.Popen([*EMULATE, "-q", "--client-timeout", "30", "--device", f"blk,socket={a}", "--device",
                             f"rng,socket={b}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=low_limit)  # fmt: skip
    hoard: list[socket.socket] = []
    try:
        assert ready_lines(proc, 2) == [f"unix:{a}", f"unix:{b}"]
        for _ in range(100):  # more than the process has descriptors for, all on the first device
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            hoard.append(s)
            s.settimeout(2)
            s.connect(str(a))
        for url in (f"unix:{a}", f"unix:{b}"):  # refused quickly, and nobody dies of it
            with pytest.raises((UnavailableError, TimeoutExpired)):
                device_id(url, 1.0)
        assert proc.poll() is None
        for s in hoard:
            s.close()
        hoard.clear()

        def both():
            try:
                return device_id(f"unix:{a}", 1.0) == 2 and device_id(f"unix:{b}", 1.0) == 4
            except (UnavailableError, TimeoutExpired):
                return False

        assert wait_for(both, 10, 0.05)
        assert proc.poll() is None
    finally:
        for s in hoard:
            s.close()
        reap(proc)


# -- life cycle: ready lines, signals, socket files -----------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_removes_every_socket_file(tmp_path, sig):
    kinds = ["blk", "net", "console,io=null", "rng"] * 2
    args = ["--socket-dir", str(tmp_path)] + [a for k in kinds for a in ("--device", k)]
    for _round in range(3):
        with emulators(len(kinds), *args) as (urls, proc):
            paths = [u[5:] for u in urls]
            assert all(os.path.exists(p) for p in paths)
            if _round == 0:  # a driver attached to one of them does not hold the others up
                s = Session(urls[0], timeout=5)
                s.open()
                s.handshake()
            proc.send_signal(sig)  # at once: right after the ready lines is the race window
            assert proc.wait(10) == 0, proc.stderr.read()
            assert not any(os.path.exists(p) for p in paths)
            if _round == 0:
                s.close()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".sock")]


def test_ready_lines_in_order_and_names_in_logs(tmp_path):
    args = ["--socket-dir", str(tmp_path), "--device", "blk,name=disk", "--device", "rng",
            "--device", f"net,socket={tmp_path}/eth.sock", "--device", "blk"]  # fmt: skip
    proc = subprocess.Popen([*EMULATE, "-v", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = ready_lines(proc, 4)
        assert lines == [f"unix:{tmp_path}/{n}.sock" for n in ("disk", "rng0", "eth", "blk1")]
        assert device_id(lines[1]) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        err = proc.stderr.read()
        assert "l4vctl emulate rng0[" in err and "client 1 connected" in err  # log lines name their device
    finally:
        reap(proc)


def test_json_gives_one_envelope_per_device(tmp_path):
    args = ["--json", "--socket-dir", str(tmp_path), "--device", "net,abi=classic,cmd-mode", "--device",
            "blk,size=4M,name=d"]  # fmt: skip
    proc = subprocess.Popen([*EMULATE, "-q", *args], stdout=subprocess.PIPE, text=True)
    try:
        first, second = (json.loads(line) for line in ready_lines(proc, 2))
        assert first["ok"] and first["command"] == "emulate" and second["ok"]
        a, b = first["result"], second["result"]
        assert (a["name"], a["type"], a["abi"], a["url"]) == ("net0", "net", "classic", f"unix:{tmp_path}/net0.sock")
        assert cat.CMD_CONFIG_BIT["classic"] in a["offered"] and a["cmd_mode"]
        assert (b["name"], b["type"], b["abi"], b["socket"]) == ("d", "blk", "current", f"{tmp_path}/d.sock")
        assert first["device"] == a["url"] and second["device"] == b["url"]
        assert a["pid"] == b["pid"] == proc.pid
    finally:
        reap(proc)


def test_a_socket_in_use_stops_start_up_and_leaves_no_socket_behind(tmp_path):
    with emulator(tmp_path, "rng", name="taken.sock") as (taken, _first):
        free = tmp_path / "free.sock"
        r = subprocess.run([*EMULATE, "--device", f"blk,socket={free}", "--device", f"rng,socket={taken[5:]}"],
                           capture_output=True, text=True, timeout=20)  # fmt: skip
        assert r.returncode == 3 and "in use by a running emulator" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
        assert not free.exists()
        assert device_id(taken) == 4


def test_the_one_device_form_is_unchanged(tmp_path):
    with emulator(tmp_path, "blk", "--size", "1M") as (url, _proc):
        assert blk_round_trip(url, b"\x11" * 512) == b"\x11" * 512


# -- bad command lines ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,fragment",
    [
        ([], "nothing to serve"),
        (["blk"], "--socket PATH is needed"),
        (["--device", "toaster,socket=@/x.sock"], "unknown device type 'toaster'"),
        (["--device", ",socket=@/x.sock"], "the device type comes first"),
        (["--device", "blk,colour=red,socket=@/x.sock"], "blk devices have no option 'colour'"),
        (["--device", "blk,socket=@/x.sock,type=net"], "the type comes first"),
        (["--device", "blk,socket=@/x.sock,"], "an empty item"),
        (["--device", "blk,socket=@/x.sock,=4M"], "'=4M' has no key"),
        (["--device", "blk,size=1M,size=2M,socket=@/x.sock"], "size given twice"),
        (["--device", "blk,socket=@/x.sock,socket=@/y.sock"], "socket given twice"),
        (["--device", "blk,size=lots,socket=@/x.sock"], "--device blk,size=lots,socket=@/x.sock: blk: option size"),
        (["--device", "net,mac=zz,socket=@/x.sock"], "is not a MAC address"),
        (["--device", "blk,feature=warp_drive,socket=@/x.sock"], "unknown feature 'warp_drive'"),
        (["--device", "blk"], "no socket"),
        (["--device", "blk,socket="], "socket= needs a value"),
        (["--device", "blk,socket=@/x.sock", "--device", "rng,socket=@/x.sock"], "both listen on"),
        (["--socket-dir", "@", "--device", "blk,name=x", "--device", "rng,name=x"], "both listen on"),
        (["--socket-dir", "@", "--device", "blk,name=../up"], "name '../up' is not"),
        (["--socket-dir", "@/nowhere", "--device", "blk"], "no such directory"),
        (["--device", "blk,socket=@/" + "x" * 120], "at most 107 bytes"),
        (["blk", "--socket", "@/x.sock", "--device", "rng,socket=@/y.sock"], "not both"),
        (["--device", "rng,socket=@/x.sock", "--socket", "@/y.sock"], "--socket is the socket of TYPE"),
        (["--device", "blk,socket=@/x.sock", "--size", "4M"], "--size is a device option of the TYPE form"),
        (["--device", "blk,socket=@/x.sock", "--abi", "classic"], "--abi is a device option"),
        (["blk", "--socket", "@/x.sock", "--socket-dir", "@"], "--socket-dir names the sockets of --device"),
        (["--device", "console,socket=@/a.sock", "--device", "console,socket=@/b.sock"], "would share this terminal"),
    ],
)
def test_bad_device_specs_are_one_line_usage_errors(tmp_path, args, fragment):
    args = [a.replace("@", str(tmp_path)) for a in args]
    fragment = fragment.replace("@", str(tmp_path))
    r = subprocess.run([*EMULATE, *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".sock")]


# -- TOML files -----------------------------------------------------------------------------------------


def test_a_toml_file_names_the_devices(tmp_path):
    conf = tmp_path / "devices.toml"
    conf.write_text(
        f"""
socket-dir = "{tmp_path}"
idle-timeout = 0.3

[[device]]
type = "blk"
size = "1M"
feature = ["flush", "config_wce"]
serial = "from-toml"

[[device]]
type = "net"
socket = "{tmp_path}/eth.sock"
mac = "52:54:00:aa:bb:cc"
cmd-mode = true

[[device]]
type = "rng"
name = "entropy"
"""
    )
    with emulators(4, "--from", str(conf), "--device", "console,io=null") as (urls, proc):
        assert urls == [f"unix:{tmp_path}/{n}.sock" for n in ("blk0", "eth", "entropy", "console0")]
        assert [device_id(u) for u in urls] == [2, 1, 4, 3]
        from l4vctl.drivers.blk import BlkDriver

        with Session(urls[0], timeout=5) as s:
            s.handshake()
            assert {cat.BLK_F_FLUSH, cat.BLK_F_CONFIG_WCE} <= s.offered()
            assert BlkDriver(s).get_id() == "from-toml"
        with Session(urls[1], role="monitor", timeout=5) as m:
            assert bytes(m.device_config()["mac"]) == bytes.fromhex("525400aabbcc")
            assert cat.CMD_CONFIG_BIT["current"] in m.offered()
            m.channel.sock.settimeout(5)
            assert m.channel.sock.recv(100) == b""  # the file's idle-timeout holds
        assert proc.poll() is None


def test_the_command_line_wins_over_the_file(tmp_path):
    conf = tmp_path / "d.toml"
    conf.write_text(f'idle-timeout = 0.2\n[[device]]\ntype = "rng"\nsocket = "{tmp_path}/r.sock"\n')
    with emulators(1, "--from", str(conf), "--idle-timeout", "0") as (urls, _proc):
        with Session(urls[0], role="monitor", timeout=5) as m:
            time.sleep(0.6)
            assert m.get("device") == 4  # not closed: --idle-timeout 0 won over the file's 0.2


@pytest.mark.parametrize(
    "text,fragment",
    [
        ('[[device]]\ntype = "blk"\nsize = \n', "not valid TOML"),
        ("[[device]\n", "line 1"),
        ('colour = "red"\n[[device]]\ntype = "rng"\n', "unknown key 'colour'"),
        ('socket-dir = "@"\n', "no devices"),
        ('device = "blk"\n', "no devices"),
        ('[[device]]\nsize = "1M"\nsocket = "@/x.sock"\n', "device 1: needs a type"),
        (
            '[[device]]\ntype = "rng"\nsocket = "@/a.sock"\n[[device]]\ntype = "blk"\nwarp = 9\n',
            "device 2: blk devices have no option 'warp'",
        ),
        ('[[device]]\ntype = "blk"\nsize = {a = 1}\nsocket = "@/x.sock"\n', "is not a value here"),
        ('[[device]]\ntype = "blk"\nsize = "lots"\nsocket = "@/x.sock"\n', "device 1: blk: option size"),
        ('max-clients = 0\n[[device]]\ntype = "rng"\nsocket = "@/x.sock"\n', "max-clients must be"),
        ('client-timeout = "soon"\n[[device]]\ntype = "rng"\nsocket = "@/x.sock"\n', "must be a number"),
        ('[[device]]\ntype = "rng"\n', "no socket"),
    ],
)
def test_bad_toml_is_a_clear_usage_error(tmp_path, text, fragment):
    conf = tmp_path / "bad.toml"
    conf.write_text(text.replace("@", str(tmp_path)))
    r = subprocess.run([*EMULATE, "--from", str(conf)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".sock")]


def test_a_missing_toml_file_is_a_usage_error(tmp_path):
    r = subprocess.run([*EMULATE, "--from", str(tmp_path / "none.toml")], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "cannot read" in r.stderr and "No such file" in r.stderr


# -- specs and the loop, in this process ---------------------------------------------------------------------


def test_spec_items_and_escaped_commas():
    from l4vctl.emulator.specs import parse_device, split_items

    assert split_items("blk,size=1M,inject=no-reply=1,,bad-magic") == ["blk", "size=1M", "inject=no-reply=1,bad-magic"]
    assert split_items("a,,,b") == ["a,", "b"]
    spec = parse_device("blk,feature=flush,features=ro,ro,cmd-mode=on,socket=/tmp/x.sock,name=n")
    assert spec.kind == "blk" and spec.socket == "/tmp/x.sock" and spec.name == "n"
    assert spec.options == {"features": "flush,ro", "ro": "", "cmd_mode": "on"}
    with pytest.raises(UsageError, match="no option .nonsense."):
        parse_device("rng,nonsense")


def test_sockets_are_named_after_types_and_counts(tmp_path):
    from l4vctl.emulator.specs import parse_device, place_sockets

    specs = [parse_device(t) for t in ("blk", "net", "blk,name=x", f"blk,socket={tmp_path}/own.sock", "blk")]
    place_sockets(specs, str(tmp_path))
    assert [os.path.basename(s.socket or "") for s in specs] == ["blk0.sock", "net0.sock", "x.sock", "own.sock",
                                                                 "blk3.sock"]  # fmt: skip
    assert [s.name for s in specs] == ["blk0", "net0", "x", "own", "blk3"]


def test_hub_stopped_before_serve_returns_and_close_removes_every_socket(tmp_path):
    from l4vctl.backends.emu import build_device
    from l4vctl.emulator.server import Hub, Server, listen

    hub = Hub()
    devices = [build_device("rng", {}) for _ in range(3)]
    paths = [str(tmp_path / f"{i}.sock") for i in range(3)]
    try:
        for i, (device, path) in enumerate(zip(devices, paths, strict=True)):
            listener, ident = listen(path)
            server = Server(device, listener=listener, path=path, socket_id=ident)
            if i == 1:
                server._pause_accept(10)  # as when no descriptor was left for a newcomer
            hub.add(server, f"rng{i}")
        hub._on_signal(signal.SIGTERM, None)  # as if the signal came before the loop
        done = threading.Event()
        t = threading.Thread(target=lambda: (hub.serve(), done.set()), daemon=True)
        t.start()
        assert done.wait(5), "serve() ignored a stop that came before it"
    finally:
        hub.stop()
        hub.close()
        for device in devices:
            device.close()
    assert not any(os.path.exists(p) for p in paths)
