"""The vhost-user backend against a real, independent virtio-blk: qemu-storage-daemon.

qemu-storage-daemon (Debian package qemu-system-common, installed by .ci/run)
serves a vhost-user-blk export of a temporary image; every test checks what
it did against the image file itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time

import pytest

from l4vctl import catalog as cat
from l4vctl.drivers.blk import BlkDriver, BlkIOError
from l4vctl.errors import UnavailableError
from l4vctl.session import Session
from tests.conftest import run_cli
from tests.emu import listening

QSD = shutil.which("qemu-storage-daemon")
SECTOR = 512


def require_qsd() -> str:
    """qemu-storage-daemon's path; fail under CI (it installs it), skip elsewhere."""
    if QSD:
        return QSD
    if os.environ.get("CI") == "true":
        pytest.fail("qemu-storage-daemon is missing (.ci/run installs qemu-system-common)")
    pytest.skip("qemu-storage-daemon is not installed (Debian package qemu-system-common)")


class StorageDaemon:
    """A vhost-user-blk export of a temporary image (raw, or qcow2 with ``fmt="qcow2"``).

    ``export`` adds options to the export (``logical-block-size=4096``); ``writable=False``
    exports it read-only.
    """

    def __init__(self, tmp_path, size=16 << 20, queues=2, fmt="raw", writable=True, export=""):
        qsd = require_qsd()
        self.size = size
        self.fmt = fmt
        self.image = tmp_path / f"qsd.{fmt}"
        if fmt == "raw":
            with open(self.image, "wb") as f:
                f.truncate(size)
        else:
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(self.image), str(size)], check=True, timeout=30)
        self.sock = tmp_path / "qsd.sock"
        self.bare_url = f"vhost-user:{self.sock}"  # without ?type=: the device type is unknown
        self.url = f"{self.bare_url}?type=blk"
        options = f"writable={'on' if writable else 'off'},num-queues={queues}" + (f",{export}" if export else "")
        self.proc = subprocess.Popen(
            [qsd, "--blockdev", f"driver=file,node-name=f0,filename={self.image}",
             "--blockdev", f"driver={fmt},node-name=d0,file=f0",
             "--export", f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={self.sock},"
                         f"{options}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not listening(self.sock):  # bound is not enough: connecting before listen() is refused
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "qemu-storage-daemon did not listen on its socket"
            time.sleep(0.02)

    def image_bytes(self, sector: int, n: int) -> bytes:
        """Bytes of the disk at ``sector``, as the image holds them (qcow2 through 'qemu-img convert')."""
        path = self.image
        if self.fmt != "raw":
            path = self.image.with_suffix(".converted")
            subprocess.run(["qemu-img", "convert", "-U", "-f", self.fmt, "-O", "raw", str(self.image), str(path)],
                           check=True, timeout=60)  # fmt: skip
        with open(path, "rb") as f:
            f.seek(sector * SECTOR)
            return f.read(n)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


@pytest.fixture
def qsd(tmp_path):
    d = StorageDaemon(tmp_path)
    yield d
    d.stop()


def ok(*args):
    r = run_cli(*args, "--json")
    assert r.code == 0, r.stderr
    return r.json()["result"]


def test_probe_shows_a_synthesised_page(qsd):
    r = ok("probe", qsd.url)
    assert r["device"]["name"] == "BLOCK" and r["num_queues"] == 2
    assert {cat.VERSION_1_BIT, cat.INDIRECT_DESC_BIT, cat.EVENT_IDX_BIT} <= set(r["features"]["bits"])
    assert 30 not in r["features"]["bits"]  # VHOST_USER_F_PROTOCOL_FEATURES is not a device feature
    assert any("synthesised" in n for n in r["notes"])
    d = ok("dump-config", qsd.url)
    assert d["synthesized"] and d["device_config"]["fields"]["capacity"] == (16 << 20) // SECTOR


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("event_idx", [False, True])
def test_read_write_against_the_image(qsd, indirect, event_idx):
    refuse = ([] if indirect else ["indirect_desc"]) + ([] if event_idx else ["event_idx"])
    with Session(qsd.url) as s:
        s.handshake(refuse=refuse)
        assert (cat.EVENT_IDX_BIT in s.negotiated) == event_idx
        drv = BlkDriver(s, depth=16, max_io=64 * 1024, segments=2 if not indirect else 4, indirect=indirect)
        data = os.urandom(1 << 20)
        drv.write(100, data)
        drv.flush()
        assert qsd.image_bytes(100, len(data)) == data
        assert drv.read(100, len(data)) == data
        with open(qsd.image, "r+b") as f:  # written behind the device's back, read through it
            f.seek(5000 * SECTOR)
            f.write(b"\x77" * 4096)
        assert drv.read(5000, 4096) == b"\x77" * 4096


def test_get_id_flush_and_out_of_range(qsd):
    with Session(qsd.url) as s:
        s.handshake()
        drv = BlkDriver(s)
        assert drv.get_id()  # whatever the daemon calls itself, it answers
        drv.flush()
        with pytest.raises(BlkIOError, match="IOERR"):
            drv.read((16 << 20) // SECTOR - 1, 4096)
        assert drv.read(0, 512) == bytes(512)  # the device carries on


def test_two_queues(qsd):
    with Session(qsd.url) as s:
        s.handshake()
        assert len(s.queues) == 2
        q0 = BlkDriver(s, queue=0)
        q1 = BlkDriver(s, queue=1)
        q0.write(0, b"\x01" * 4096)
        q1.write(8, b"\x02" * 4096)
        assert q1.read(0, 4096) == b"\x01" * 4096 and q0.read(8, 4096) == b"\x02" * 4096
        assert q0.vq.kick_irq is not q1.vq.kick_irq  # each queue has its own kick eventfd


def test_reconnect_after_the_front_end_closes(qsd):
    for i in range(3):
        with Session(qsd.url) as s:
            s.handshake()
            drv = BlkDriver(s)
            drv.write(i * 8, bytes([i + 1]) * 4096)
    with Session(qsd.url) as s:
        s.handshake()
        drv = BlkDriver(s)
        assert [drv.read(i * 8, 512)[0] for i in range(3)] == [1, 2, 3]


def test_commands_over_vhost_user(qsd, tmp_path):
    n = ok("negotiate", qsd.url, "--require", "flush")
    assert n["status"]["value"] == 0x0F and cat.VERSION_1_BIT in n["negotiated"]
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(64 * 1024))
    ok("blk", "write", qsd.url, "--sector", "64", "-i", str(src), "--flush")
    assert qsd.image_bytes(64, 64 * 1024) == src.read_bytes()
    r = ok("blk", "read", qsd.url, "--sector", "64", "--count", "128")
    assert bytes.fromhex(r["hex"]) == src.read_bytes()
    assert ok("blk", "id", qsd.url)["id"]
    q = ok("queue-stats", qsd.url)
    assert len(q["queues"]) == 2 and q["device_side"] is None
    b = ok("bench", qsd.url, "--time", "0.3s", "--qd", "8")
    assert b["requests"] > 0
    bad = run_cli("blk", "read", qsd.url, "--sector", "40000", "--count", "1")
    assert bad.code == 6 and "IOERR" in bad.stderr


def test_back_end_dying_gives_a_clear_error(qsd):
    with Session(qsd.url, timeout=2) as s:
        s.handshake()
        drv = BlkDriver(s)
        drv.write(0, bytes(4096))
        qsd.proc.send_signal(signal.SIGKILL)
        qsd.proc.wait(10)
        t = time.monotonic()
        with pytest.raises(UnavailableError, match="hung up"):
            for _ in range(100):
                drv.read(0, 4096)
        assert time.monotonic() - t < 5


def test_second_front_end_is_not_served(qsd):
    with Session(qsd.url) as s:
        s.handshake()
        r = run_cli("probe", qsd.url, "--timeout", "0.5")
        assert r.code == 7 and "one front-end at a time" in r.stderr


def test_missing_socket():
    r = run_cli("probe", "vhost-user:/nonexistent/blk.sock")
    assert r.code == 3 and "no such socket" in r.stderr
    r = run_cli("probe", "vhost-user:/x?type=gpu")
    assert r.code == 2 and "not supported" in r.stderr


# -- the device type: vhost-user does not report it ----------------------------------------------

DEVICE_CLASS_COMMANDS = [
    (["blk", "id"], []),
    (["blk", "read"], ["--sector", "0", "--count", "1"]),
    (["blk", "write"], ["--sector", "0", "--count", "1", "--pattern", "a5"]),
    (["blk", "flush"], []),
    (["blk", "discard"], ["--sector", "0", "--count", "8"]),
    (["bench"], ["--time", "0.2s"]),
    (["rng", "read"], ["--bytes", "16"]),
    (["console", "recv"], ["--wait", "0.1"]),
    (["console", "send"], ["x"]),
    (["net", "recv"], ["--wait", "0.1"]),
    (["net", "send"], ["--text", "x"]),
]


def test_without_type_the_device_is_unknown(qsd):
    r = ok("probe", qsd.bare_url)
    assert r["device"] == {"id": None, "name": "unknown (vhost-user does not report it)", "class": None}
    assert any("?type=blk" in n for n in r["notes"])
    text = run_cli("probe", qsd.bare_url)
    assert text.code == 0 and "device:     unknown (vhost-user does not report it)\n" in text.stdout
    assert "BLOCK" not in text.stdout
    d = ok("dump-config", qsd.bare_url)
    assert d["device"]["id"] is None and d["device_config"]["struct"] is None  # nothing decoded as blk
    assert set(d["device_config"]["raw"]) <= {"0"}
    n = ok("negotiate", qsd.bare_url)  # the transport handshake needs no device class
    assert n["device"]["id"] is None and n["status"]["value"] == 0x0F
    assert ok("probe", qsd.url)["device"]["name"] == "BLOCK"  # ?type=blk says what it is


def test_expect_device_fails_on_an_unknown_type(qsd):
    r = run_cli("probe", qsd.bare_url, "--expect-device", "blk")
    assert r.code == 5, r.stderr
    assert "unknown (vhost-user does not report it)" in r.stderr and f"{qsd.bare_url}?type=blk" in r.stderr
    assert run_cli("probe", qsd.url, "--expect-device", "blk").code == 0


@pytest.mark.parametrize("cmd,rest", DEVICE_CLASS_COMMANDS, ids=[" ".join(c) for c, _ in DEVICE_CLASS_COMMANDS])
def test_device_class_commands_refuse_an_unknown_type(qsd, cmd, rest):
    with open(qsd.image, "r+b") as f:
        f.write(b"\x5a" * 4096)
    r = run_cli(*cmd, qsd.bare_url, *rest)
    assert r.code == 2, (r.code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "device type unknown (vhost-user does not report it)" in lines[0]
    assert "?type=" in lines[0]
    assert qsd.image_bytes(0, 4096) == b"\x5a" * 4096  # nothing was written or discarded
    assert qsd.proc.poll() is None


class FakeBackEnd:
    """A vhost-user back-end that records every message and serves no ring (like virtiofsd, not blk)."""

    def __init__(self, path, *, protocol=True, queues=1):
        import socket
        import threading

        self.path = str(path)
        self.queues = queues  # what GET_QUEUE_NUM answers
        self.requests: list[int] = []
        self.features = (1 << 32) | (1 << 28) | ((1 << 30) if protocol else 0)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.listener.settimeout(0.1)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):

        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(0.1)
                self._session(conn)

    def _session(self, conn):
        import socket
        import struct

        buf = b""
        while not self.stopping.is_set():
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn, 4096, 8)
            except TimeoutError:
                continue
            except OSError:
                return
            for fd in fds:
                os.close(fd)
            if not data:
                return
            buf += data
            while len(buf) >= 12:
                req, _fl, size = struct.unpack_from("<III", buf)
                if len(buf) < 12 + size:
                    break
                payload, buf = buf[12 : 12 + size], buf[12 + size :]
                self.requests.append(req)
                answer = {1: struct.pack("<Q", self.features), 15: struct.pack("<Q", (1 << 0) | (1 << 9)),
                          17: struct.pack("<Q", self.queues), 11: payload[:8].ljust(8, b"\0")}.get(req)  # fmt: skip
                if req == 24:
                    answer = payload  # GET_CONFIG: an all-zero config space
                if answer is not None:
                    conn.sendall(struct.pack("<III", req, 0x5, len(answer)) + answer)

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def fake_back_end(tmp_path):
    b = FakeBackEnd(tmp_path / "fake.sock")
    yield b
    b.stop()


#: What identifying a back-end sends: nothing specific to a device class.
IDENTIFY = {1, 3, 15, 16, 17}  # GET_FEATURES, SET_OWNER, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM


@pytest.mark.parametrize("cmd,rest", DEVICE_CLASS_COMMANDS, ids=[" ".join(c) for c, _ in DEVICE_CLASS_COMMANDS])
def test_no_request_of_a_guessed_class_reaches_the_back_end(fake_back_end, cmd, rest):
    url = f"vhost-user:{fake_back_end.path}"
    r = run_cli(*cmd, url, *rest, "--timeout", "2")
    assert r.code == 2 and "?type=" in r.stderr, (r.code, r.stderr)
    assert fake_back_end.requests and set(fake_back_end.requests) <= IDENTIFY, fake_back_end.requests


def test_probe_of_an_unknown_back_end_sends_no_get_config(fake_back_end):
    url = f"vhost-user:{fake_back_end.path}"
    r = ok("probe", url)
    assert r["device"]["id"] is None
    assert set(fake_back_end.requests) <= IDENTIFY and 24 not in fake_back_end.requests
    assert run_cli("probe", url, "--expect-device", "blk").code == 5
    fake_back_end.requests.clear()
    assert ok("probe", f"{url}?type=blk")["device"]["id"] == 2
    assert 24 in fake_back_end.requests  # with ?type=blk the block config is asked for, as before


def test_embedded_emulator_does_not_hold_a_vhost_user_connection(tmp_path):
    """A forked emu: child must not keep the parent's vhost-user connection open."""
    qsd = StorageDaemon(tmp_path)
    try:
        first = Session(qsd.url, timeout=5)
        first.open()
        with Session("emu:rng") as embedded:  # forked while `first` is connected
            first.close()  # the back-end serves one front-end: it must see this one leave now
            with Session(qsd.url, timeout=5) as again:
                assert again.get("device") == 2
            assert embedded.get("device") == 4
    finally:
        qsd.stop()


# -- qemu-storage-daemon variants: image format, queues, block size, read-only ------------------


def test_qcow2_image(tmp_path):
    d = StorageDaemon(tmp_path, fmt="qcow2")
    try:
        with open(d.image, "rb") as f:
            assert f.read(4) == b"QFI\xfb"  # a real qcow2 file: the disk's bytes are not at their raw offsets
        src = tmp_path / "data.bin"
        src.write_bytes(os.urandom(256 * 1024))
        ok("blk", "write", d.url, "--sector", "100", "-i", str(src), "--flush")
        r = ok("blk", "read", d.url, "--sector", "100", "--count", "512")
        assert r["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert d.image_bytes(100, 256 * 1024) == src.read_bytes()  # qemu-img convert -O raw of the image
        assert d.image_bytes(0, 100 * SECTOR) == bytes(100 * SECTOR)
        assert ok("probe", d.url)["device"]["name"] == "BLOCK"
    finally:
        d.stop()


def test_four_queues(tmp_path):
    d = StorageDaemon(tmp_path, queues=4)
    try:
        p = ok("probe", d.url)
        assert p["num_queues"] == 4 and any("GET_QUEUE_NUM 4 queues" in n for n in p["notes"])
        assert cat.BLK_F_MQ in p["features"]["bits"]
        with Session(d.url) as s:
            s.handshake()
            assert len(s.queues) == 4
            drivers = [BlkDriver(s, queue=q) for q in range(4)]
            for q, drv in enumerate(drivers):
                drv.write(q * 8, bytes([0x10 + q]) * 4096)
            for q in range(4):  # each written through one queue, read through the next
                assert drivers[(q + 1) % 4].read(q * 8, 4096) == bytes([0x10 + q]) * 4096
        assert [d.image_bytes(q * 8, 1)[0] for q in range(4)] == [0x10, 0x11, 0x12, 0x13]
        b = ok("bench", d.url, "--time", "0.3s", "--qd", "8")
        assert b["requests"] > 0 and b["queue"] == 0 and b["num_queues"] == 4  # says which queue it loaded
        text = run_cli("bench", d.url, "--time", "0.2s", "--qd", "4")
        assert text.code == 0 and "queue 0 of the device's 4" in text.stdout
    finally:
        d.stop()


def test_logical_block_size_4096(tmp_path):
    d = StorageDaemon(tmp_path, export="logical-block-size=4096")
    try:
        cfg = ok("dump-config", d.url)["device_config"]["fields"]
        assert cfg["blk_size"] == 4096
        src = tmp_path / "block.bin"
        src.write_bytes(os.urandom(8192))
        ok("blk", "write", d.url, "--sector", "16", "-i", str(src), "--flush")  # 4096-byte aligned
        assert d.image_bytes(16, 8192) == src.read_bytes()
        assert bytes.fromhex(ok("blk", "read", d.url, "--sector", "16", "--count", "16")["hex"]) == src.read_bytes()
        for args in (["blk", "read", d.url, "--sector", "17", "--count", "8"],
                     ["blk", "write", d.url, "--sector", "18", "--count", "8", "--pattern", "ee"]):  # fmt: skip
            r = run_cli(*args)
            lines = r.stderr.strip().splitlines()
            assert r.code == 6 and len(lines) == 1, (args, r.code, r.stderr)
            assert "IOERR" in lines[0] and "logical block size is 4096 bytes" in lines[0]
        assert d.image_bytes(16, 8192) == src.read_bytes()  # the misaligned write changed nothing
        with Session(d.url) as s:
            s.handshake()
            drv = BlkDriver(s)
            assert drv.block_size == 4096
            with pytest.raises(BlkIOError, match="IOERR") as info:
                drv.read(3, 4096)
            assert "multiples of 8 sectors" in str(info.value.hint)
            assert drv.read(16, 4096) == src.read_bytes()[:4096]  # the device carries on
    finally:
        d.stop()


def test_read_only_export(tmp_path):
    d = StorageDaemon(tmp_path, writable=False)
    try:
        with open(d.image, "r+b") as f:
            f.write(b"\x3c" * 8192)
        p = ok("probe", d.url)
        assert cat.BLK_F_RO in p["features"]["bits"]
        assert bytes.fromhex(ok("blk", "read", d.url, "--sector", "0", "--count", "16")["hex"]) == b"\x3c" * 8192
        r = run_cli("blk", "write", d.url, "--sector", "0", "--count", "8", "--pattern", "00")
        lines = r.stderr.strip().splitlines()
        assert r.code == 6 and len(lines) == 1, (r.code, r.stderr)
        assert "the device answered IOERR" in lines[0] and "read-only" in lines[0]
        j = run_cli("blk", "write", d.url, "--sector", "0", "--count", "8", "--pattern", "00", "--json")
        assert j.code == 6 and j.json()["ok"] is False and j.json()["error"]["exit_code"] == 6
        assert d.image_bytes(0, 8192) == b"\x3c" * 8192
        with Session(d.url) as s:
            s.handshake()
            drv = BlkDriver(s)
            assert drv.read_only
            with pytest.raises(BlkIOError, match="IOERR"):
                drv.write(0, bytes(4096))
            assert drv.read(0, 4096) == b"\x3c" * 4096  # reads carry on after the refused write
        w = run_cli("bench", d.url, "--workload", "randwrite", "--time", "0.2s")
        assert w.code == 2 and "read-only" in w.stderr
        assert ok("bench", d.url, "--time", "0.2s")["requests"] > 0
        assert d.image_bytes(0, 8192) == b"\x3c" * 8192
    finally:
        d.stop()


# -- the other classes against a back-end that serves no ring ----------------------------------


def test_rng_and_console_identification(fake_back_end):
    url = f"vhost-user:{fake_back_end.path}"
    r = ok("probe", f"{url}?type=rng")
    assert r["device"]["id"] == cat.DEVICE_ID_RNG and r["num_queues"] == 1
    assert 24 not in fake_back_end.requests  # an entropy device has no config to ask for
    fake_back_end.requests.clear()
    r = ok("probe", f"{url}?type=console")
    assert r["device"]["id"] == cat.DEVICE_ID_CONSOLE and r["num_queues"] == 1
    assert "GET_QUEUE_NUM 1 queue, fewer than l4vctl's driver of this class needs (2)" in r["notes"][0]
    assert 24 in fake_back_end.requests  # the console config (cols, rows, ports) is asked for
    r = ok("probe", f"{url}?type=net")
    assert r["device"]["id"] == cat.DEVICE_ID_NET and r["num_queues"] == 2  # one pair: GET_QUEUE_NUM said 1
    assert "GET_QUEUE_NUM 1 queue pair" in r["notes"][0]


@pytest.mark.parametrize("cmd", [["rng", "read", "--bytes", "16"], ["net", "send", "--text", "x"]])
def test_a_back_end_that_never_answers_a_ring_times_out(fake_back_end, cmd):
    t = time.monotonic()
    r = run_cli(*cmd[:2], f"vhost-user:{fake_back_end.path}?type={cmd[0]}", *cmd[2:], "--timeout", "1")
    lines = r.stderr.strip().splitlines()
    assert r.code == 7 and len(lines) == 1, (r.code, r.stderr)
    assert time.monotonic() - t < 10


def test_a_console_with_one_queue_is_refused(fake_back_end):
    r = run_cli("console", "send", f"vhost-user:{fake_back_end.path}?type=console", "x", "--timeout", "1")
    lines = r.stderr.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and "queue 1 is not configured" in lines[0], (r.code, r.stderr)


@pytest.mark.parametrize("answer", [0, 3, 1000, (1 << 64) - 1])
def test_queue_counts_from_a_hostile_get_queue_num(tmp_path, answer):
    b = FakeBackEnd(tmp_path / "q.sock", queues=answer)
    try:
        url = f"vhost-user:{b.path}"
        net = ok("probe", f"{url}?type=net")
        pairs = max(1, answer)
        assert net["num_queues"] == 2 * min(pairs, 32)  # two per pair, at most 64 queues on the page
        assert f"GET_QUEUE_NUM {answer} queue pair" in net["notes"][0]
        assert ("the page shows the first 32 pairs (64 queues)" in net["notes"][0]) == (pairs > 32)
        assert ("the page shows 1 pair (2 queues)" in net["notes"][0]) == (answer == 0)
        blk = ok("probe", f"{url}?type=blk")
        assert blk["num_queues"] == max(1, min(answer, 64))
        assert f"GET_QUEUE_NUM {answer} queue" in blk["notes"][0]
    finally:
        b.stop()
