"""``l4vctl emulate TYPE --vhost-user PATH``: the device models served to vhost-user front-ends.

Driven by l4vctl's own ``vhost-user:`` front-end (blk) and by a raw
front-end written here (every device class, and hostile messages): it
speaks the protocol byte by byte from the public vhost-user specification,
with its own memfd, rings at front-end addresses that differ from the
guest-physical ones, and eventfds for kicks, calls and errors.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from l4vctl.caps import Dataspace
from tests.emu import ready_lines, reap

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG = 24
VERSION, REPLY, NEED_REPLY = 1, 4, 8
NOFD = 0x100
F_PROTOCOL = 1 << 30
F_VERSION_1 = 1 << 32
P_MQ, P_REPLY_ACK, P_CONFIG = 1 << 0, 1 << 3, 1 << 9
DESC_F_NEXT, DESC_F_WRITE = 1, 2

GPA = 0x100000  # guest-physical base of the one region (descriptor addresses)
USER = 0x7F0000000000  # the front-end's own address of it (ring addresses)
MEM = 1 << 20
RING_AREA = 0x4000  # per queue: desc at +0, avail at +0x1000, used at +0x2000
BUFFERS = 0x40000
NET_HDR = 12


class RawFrontend:
    """A vhost-user front-end made of bytes: messages, one memfd region, split rings, eventfds."""

    def __init__(self, path, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.timeout = timeout
        self.acks = False
        self.ds = Dataspace.create("raw-frontend", MEM)
        self.mem = mmap.mmap(self.ds.fd, MEM)
        self.fds: list[int] = []
        self.queues: dict[int, dict] = {}
        self.next_buf = BUFFERS
        self.ring_base = 0  # offset of queue 0's ring area in the memfd

    def close(self) -> None:
        self.sock.close()
        self.mem.close()
        self.ds.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    # -- messages --

    def send(self, request: int, payload: bytes = b"", fds=(), flags: int = VERSION) -> None:
        data = struct.pack("<III", request, flags, len(payload)) + payload
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the back-end closed the connection")
            out += chunk
        return out

    def reply(self, request: int) -> bytes:
        req, flags, size = struct.unpack("<III", self.recv_exact(12))
        assert req == request and flags & REPLY, (req, flags)
        return self.recv_exact(size)

    def call(self, request: int, payload: bytes = b"") -> bytes:
        self.send(request, payload)
        return self.reply(request)

    def u64(self, request: int) -> int:
        return struct.unpack("<Q", self.call(request))[0]

    def ack(self, request: int, payload: bytes = b"", fds=()) -> int:
        """Send with NEED_REPLY and return the ack (0: done)."""
        assert self.acks
        self.send(request, payload, fds, VERSION | NEED_REPLY)
        return struct.unpack("<Q", self.reply(request))[0]

    def hung_up(self, timeout: float = 5.0) -> bool:
        """True if the back-end closes the connection within ``timeout`` (replies on the way are read)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return False
            try:
                if self.sock.recv(65536, socket.MSG_DONTWAIT) == b"":
                    return True
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return True

    # -- set-up --

    def negotiate(self, device_features: int | None = None) -> int:
        offered = self.u64(GET_FEATURES)
        self.send(SET_OWNER)
        assert offered & F_PROTOCOL
        proto = self.u64(GET_PROTOCOL_FEATURES)
        assert proto & (P_REPLY_ACK | P_CONFIG | P_MQ) == P_REPLY_ACK | P_CONFIG | P_MQ
        self.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", P_REPLY_ACK | P_CONFIG | P_MQ))
        self.acks = True
        accept = offered if device_features is None else (device_features | F_VERSION_1 | F_PROTOCOL)
        assert self.ack(SET_FEATURES, struct.pack("<Q", accept)) == 0
        return offered

    def table(self, skip: int = 0) -> bytes:
        """One region: the memfd from byte ``skip`` on (its ``mmap_offset``), at GPA + skip and USER + skip."""
        return struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GPA + skip, MEM - skip, USER + skip, skip)

    def set_mem_table(self, skip: int = 0) -> int:
        return self.ack(SET_MEM_TABLE, self.table(skip), [self.ds.fd])

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds.append(fd)
        return fd

    def setup_queue(self, index: int, num: int = 8, *, addrs=None, enable: bool = True, kick: bool = True) -> int:
        """NUM, BASE, ADDR, CALL, ERR, KICK, ENABLE; the ack of KICK (0: running)."""
        area = self.ring_base + index * RING_AREA
        q = {"num": num, "area": area, "avail": 0, "used": 0, "next_desc": 0}
        q["kick"], q["call"], q["err"] = self.eventfd(), self.eventfd(), self.eventfd()
        self.queues[index] = q
        assert self.ack(SET_VRING_NUM, struct.pack("<II", index, num)) == 0
        assert self.ack(SET_VRING_BASE, struct.pack("<II", index, 0)) == 0
        desc, used, avail = addrs or (USER + area, USER + area + 0x2000, USER + area + 0x1000)
        assert self.ack(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, desc, used, avail, 0)) == 0
        assert self.ack(SET_VRING_CALL, struct.pack("<Q", index), [q["call"]]) == 0
        assert self.ack(SET_VRING_ERR, struct.pack("<Q", index), [q["err"]]) == 0
        if kick:
            result = self.ack(SET_VRING_KICK, struct.pack("<Q", index), [q["kick"]])
        else:  # "no fd": the device polls the ring
            result = self.ack(SET_VRING_KICK, struct.pack("<Q", index | NOFD))
        if enable:
            assert self.ack(SET_VRING_ENABLE, struct.pack("<II", index, 1)) == 0
        return result

    # -- rings --

    def buffer(self, data: bytes | int) -> tuple[int, int]:
        """Room for ``data`` (or that many bytes) in the region: (offset, length)."""
        size = data if isinstance(data, int) else len(data)
        off = self.next_buf
        self.next_buf += (size + 63) & ~63
        assert self.next_buf <= MEM
        if not isinstance(data, int):
            self.mem[off : off + size] = data
        return off, size

    def post(self, index: int, segments, *, loop: bool = False) -> int:
        """Chain ``segments`` ((offset, length, device_writes)) into the ring; publish it; kick. Its head."""
        q = self.queues[index]
        base = q["area"]
        head = q["next_desc"]
        ids = [(head + i) % q["num"] for i in range(len(segments))]
        q["next_desc"] = (head + len(segments)) % q["num"]
        for i, (off, length, writes) in enumerate(segments):
            last = i == len(segments) - 1
            flags = (DESC_F_WRITE if writes else 0) | (0 if last and not loop else DESC_F_NEXT)
            nxt = ids[0] if last else ids[i + 1]
            struct.pack_into("<QIHH", self.mem, base + ids[i] * 16, GPA + off, length, flags, nxt)
        avail = base + 0x1000
        struct.pack_into("<H", self.mem, avail + 4 + (q["avail"] % q["num"]) * 2, head)
        q["avail"] = (q["avail"] + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, avail + 2, q["avail"])
        os.eventfd_write(q["kick"], 1)
        return head

    def used(self, index: int, timeout: float = 5.0) -> tuple[int, int]:
        """The next used element (id, len), waiting for the call eventfd."""
        q = self.queues[index]
        used = q["area"] + 0x2000
        deadline = time.monotonic() + timeout
        while struct.unpack_from("<H", self.mem, used + 2)[0] == q["used"]:
            left = deadline - time.monotonic()
            assert left > 0, f"queue {index}: nothing completed within {timeout} s"
            select.select([q["call"]], [], [], min(left, 0.05))
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(q["call"])
        slot = used + 4 + (q["used"] % q["num"]) * 8
        q["used"] = (q["used"] + 1) & 0xFFFF
        return struct.unpack_from("<II", self.mem, slot)

    def read(self, off: int, length: int) -> bytes:
        return bytes(self.mem[off : off + length])


@contextlib.contextmanager
def raw(path, **kw):
    fe = RawFrontend(path, **kw)
    try:
        yield fe
    finally:
        fe.close()


class Backend:
    """A running ``l4vctl emulate`` with vhost-user devices; its log in a file."""

    def __init__(self, proc, urls, log_path):
        self.proc = proc
        self.urls = urls
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not in the log:\n{self.log()}"
            assert self.proc.poll() is None, f"the back-end died:\n{self.log()}"
            time.sleep(0.02)
        return self.log()

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log().splitlines() if text in line]


@contextlib.contextmanager
def backend(tmp_path, *args: str, count: int = 1):
    log_path = tmp_path / "backend.log"
    with open(log_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "l4vctl", "emulate", *args], stdout=subprocess.PIPE,
                                stderr=err)  # fmt: skip
    try:
        urls = ready_lines(proc, count)
        yield Backend(proc, urls, log_path)
        assert proc.poll() is None, f"the back-end died:\n{log_path.read_text()}"
    finally:
        reap(proc)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "l4vctl", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def blk(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    path = tmp_path / "vblk.sock"
    with backend(
        tmp_path, "blk", "--vhost-user", str(path), "--image", str(image), "--client-timeout", "0.5", "-v"
    ) as b:
        b.path, b.image = path, image
        yield b


def blk_roundtrip(b, tmp_path, sector: int = 16, tag: bytes = b"x") -> None:
    """Write 4 KiB with l4vctl's front-end, check the image file, read it back."""
    data = (tag * 4096)[:4096]
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    src.write_bytes(data)
    r = cli("blk", "write", b.urls[0], "--sector", str(sector), "-i", str(src))
    assert r.returncode == 0, r.stderr
    assert b.image.read_bytes()[sector * 512 : sector * 512 + 4096] == data
    r = cli("blk", "read", b.urls[0], "--sector", str(sector), "--count", "8", "-o", str(back))
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == data


# -- l4vctl's own front-end ------------------------------------------------------------------


def test_ready_line_names_the_vhost_user_url(blk):
    assert blk.urls == [f"vhost-user:{blk.path}?type=blk"]


def test_json_ready_line(tmp_path):
    path = tmp_path / "r.sock"
    with backend(tmp_path, "rng", "--vhost-user", str(path), "--json") as b:
        import json

        env = json.loads(b.urls[0])
        assert env["ok"] and env["result"]["url"] == f"vhost-user:{path}?type=rng"
        assert env["result"]["transport"] == "vhost-user" and env["result"]["device_id"] == 4


def test_probe_and_negotiate(blk):
    r = cli("probe", blk.urls[0], "--json")
    assert r.returncode == 0, r.stderr
    import json

    result = json.loads(r.stdout)["result"]
    assert result["device"]["id"] == 2 and result["num_queues"] == 1
    r = cli("negotiate", blk.urls[0])
    assert r.returncode == 0, r.stderr
    assert "DRIVER_OK+" in r.stdout


def test_blk_write_read_lands_in_the_image(blk, tmp_path):
    blk_roundtrip(blk, tmp_path, 16, b"abc")
    blk_roundtrip(blk, tmp_path, 100, b"\x5a")


def test_conformance_suite_passes(blk):
    r = cli("check", blk.urls[0], "--timeout", "1", "--json", timeout=120)
    import json

    env = json.loads(r.stdout)
    verdicts = {c["name"]: c["verdict"].upper() for c in env["result"]["cases"]}
    assert set(verdicts.values()) <= {"PASS", "REJECT", "NOT-APPLICABLE"}, verdicts
    assert verdicts["request"] == "PASS" and verdicts["desc-loop"] == "PASS"
    assert verdicts["buffer-outside-memory"] == "PASS" and verdicts["driver-vanishes"] == "PASS"
    assert r.returncode == 0, r.stderr


def test_reconnect_after_the_front_end_went_away(blk, tmp_path):
    with raw(blk.path) as fe:
        fe.negotiate()
        assert fe.set_mem_table() == 0
        assert fe.setup_queue(0) == 0
    blk.wait_log("front-end 1 left")
    blk_roundtrip(blk, tmp_path, 8, b"second")


def test_reconnect_after_the_front_end_was_killed_mid_request(blk, tmp_path):
    bench = subprocess.Popen([sys.executable, "-m", "l4vctl", "bench", blk.urls[0], "--time", "30s"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        blk.wait_log("queue 0 running", timeout=20)
        time.sleep(0.5)
        bench.send_signal(signal.SIGKILL)
        bench.wait(10)
    finally:
        reap(bench)
    blk_roundtrip(blk, tmp_path, 32, b"after-kill")


# -- every class, through the raw front-end ----------------------------------------------------


def test_get_config_is_the_models_config(blk):
    with raw(blk.path) as fe:
        fe.negotiate()
        body = fe.call(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))
        offset, size, _flags = struct.unpack_from("<III", body)
        assert (offset, size) == (0, 60)
        capacity = struct.unpack_from("<Q", body, 12)[0]
        assert capacity == (1 << 20) // 512
        assert fe.u64(GET_QUEUE_NUM) == 1


def test_blk_request_through_translated_rings(blk):
    blk.image.write_bytes(b"\xa5" * 512 + bytes((1 << 20) - 512))
    with raw(blk.path) as fe:
        fe.negotiate()
        assert fe.set_mem_table() == 0
        assert fe.setup_queue(0) == 0
        hdr = fe.buffer(struct.pack("<IIQ", 0, 0, 0))  # IN, sector 0
        data = fe.buffer(512)
        status = fe.buffer(1)
        head = fe.post(0, [(*hdr, False), (*data, True), (*status, True)])
        assert fe.used(0) == (head, 513)
        assert fe.read(data[0], 512) == b"\xa5" * 512
        assert fe.read(status[0], 1) == b"\0"
        # GET_VRING_BASE stops the ring and says where it stopped
        body = fe.call(GET_VRING_BASE, struct.pack("<II", 0, 0))
        assert struct.unpack("<II", body) == (0, 1)


def test_region_with_an_mmap_offset(blk):
    blk.image.write_bytes(b"\x3c" * 512 + bytes((1 << 20) - 512))
    with raw(blk.path) as fe:
        fe.negotiate()
        assert fe.set_mem_table(skip=0x4000) == 0
        fe.ring_base = 0x4000
        assert fe.setup_queue(0) == 0
        hdr = fe.buffer(struct.pack("<IIQ", 0, 0, 0))
        data = fe.buffer(512)
        status = fe.buffer(1)
        head = fe.post(0, [(*hdr, False), (*data, True), (*status, True)])
        assert fe.used(0) == (head, 513)
        assert fe.read(data[0], 512) == b"\x3c" * 512


def test_ring_without_a_kick_fd_is_polled(tmp_path):
    path = tmp_path / "rng.sock"
    with backend(tmp_path, "rng", "--vhost-user", str(path)) as b, raw(path) as fe:
        fe.negotiate()
        assert fe.set_mem_table() == 0
        assert fe.setup_queue(0, kick=False) == 0
        buf = fe.buffer(32)
        os.close(fe.queues[0]["kick"])  # nobody reads it: the post's kick goes nowhere
        fe.fds.remove(fe.queues[0]["kick"])
        fe.queues[0]["kick"] = os.eventfd(0)
        fe.fds.append(fe.queues[0]["kick"])
        head = fe.post(0, [(*buf, True)])
        assert fe.used(0) == (head, 32)
        assert b.proc.poll() is None


def test_rng_read(tmp_path):
    path = tmp_path / "rng.sock"
    with backend(tmp_path, "rng", "--vhost-user", str(path)) as b, raw(path) as fe:
        assert b.urls == [f"vhost-user:{path}?type=rng"]
        fe.negotiate()
        assert fe.set_mem_table() == 0
        assert fe.setup_queue(0) == 0
        got = []
        for n in range(1, 3):
            buf = fe.buffer(64)
            head = fe.post(0, [(*buf, True)])
            assert fe.used(0) == (head, 64)
            got.append(fe.read(buf[0], 64))
            # EVENT_IDX was accepted: the device asks for a kick at the next request (avail_event)
            deadline = time.monotonic() + 5  # it is written after the completion is published
            while struct.unpack_from("<H", fe.mem, 0x2000 + 4 + 8 * 8)[0] != n:
                assert time.monotonic() < deadline, "avail_event was not moved on"
                time.sleep(0.005)
        assert got[0] != got[1] and got[0] != bytes(64)


def test_console_echo(tmp_path):
    path = tmp_path / "con.sock"
    with backend(tmp_path, "console", "--vhost-user", str(path), "--io", "echo") as b, raw(path) as fe:
        assert b.urls == [f"vhost-user:{path}?type=console"]
        fe.negotiate()
        assert fe.set_mem_table() == 0
        assert fe.setup_queue(0) == 0 and fe.setup_queue(1) == 0
        rx = fe.buffer(64)
        rx_head = fe.post(0, [(*rx, True)])
        tx = fe.buffer(b"hello console")
        tx_head = fe.post(1, [(*tx, False)])
        assert fe.used(1)[0] == tx_head
        head, length = fe.used(0)
        assert head == rx_head and fe.read(rx[0], length) == b"hello console"


def _frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x88\xb5" + payload


def test_net_two_back_ends_on_one_link(tmp_path):
    a, c = tmp_path / "a.sock", tmp_path / "c.sock"
    with backend(tmp_path, "--device", f"net,link=t1,vhost-user={a}", "--device", f"net,link=t1,vhost-user={c}",
                 count=2) as b:  # fmt: skip
        assert b.urls == [f"vhost-user:{a}?type=net", f"vhost-user:{c}?type=net"]
        with raw(a) as fa, raw(c) as fc:
            for fe in (fa, fc):
                fe.negotiate()
                assert fe.u64(GET_QUEUE_NUM) == 1  # one queue pair
                assert fe.set_mem_table() == 0
                assert fe.setup_queue(0) == 0 and fe.setup_queue(1) == 0
            rx = fc.buffer(2048)
            rx_head = fc.post(0, [(*rx, True)])
            frame = _frame(b"\xff" * 6, b"\x52\x54\x00\x12\x34\x56", b"ping over vhost-user")
            tx = fa.buffer(bytes(NET_HDR) + frame)
            fa.post(1, [(*tx, False)])
            fa.used(1)
            head, length = fc.used(0)
            assert head == rx_head and length == NET_HDR + len(frame)
            assert fc.read(rx[0] + NET_HDR, len(frame)) == frame


def test_net_to_an_l4virtio_device_on_the_same_link(tmp_path):
    a, u = tmp_path / "a.sock", tmp_path / "u.sock"
    with backend(tmp_path, "--device", f"net,link=t2,vhost-user={a}", "--device", f"net,link=t2,socket={u}",
                 count=2) as b:  # fmt: skip
        assert b.urls == [f"vhost-user:{a}?type=net", f"unix:{u}"]
        recv = subprocess.Popen([sys.executable, "-m", "l4vctl", "net", "recv", f"unix:{u}", "--count", "1",
                                 "--wait", "10", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        try:
            with raw(a) as fa:
                fa.negotiate()
                assert fa.set_mem_table() == 0
                assert fa.setup_queue(0) == 0 and fa.setup_queue(1) == 0
                frame = _frame(b"\xff" * 6, b"\x52\x54\x00\x12\x34\x56", b"to the l4-virtio side")
                deadline = time.monotonic() + 10
                while recv.poll() is None and time.monotonic() < deadline:  # until the receiver is attached
                    tx = fa.buffer(bytes(NET_HDR) + frame)
                    fa.post(1, [(*tx, False)])
                    fa.used(1)
                    fa.next_buf = BUFFERS
                    time.sleep(0.2)
            out, err = recv.communicate(timeout=10)
        finally:
            reap(recv)
        assert recv.returncode == 0, err
        assert b"to the l4-virtio side".hex() in out or "to the l4-virtio side" in out


# -- hostile front-ends --------------------------------------------------------------------------


def _serves_next(blk, tmp_path) -> None:
    blk_roundtrip(blk, tmp_path, 24, b"next")


def test_truncated_header_then_close(blk, tmp_path):
    with raw(blk.path) as fe:
        fe.sock.sendall(struct.pack("<II", GET_FEATURES, VERSION))
    blk.wait_log("closed in the middle of a message")
    _serves_next(blk, tmp_path)
    assert len(blk.lines("closed in the middle of a message")) == 1


def test_truncated_header_left_open_times_out(blk, tmp_path):
    with raw(blk.path) as fe:
        fe.sock.sendall(struct.pack("<I", GET_FEATURES))
        assert fe.hung_up(5)
    assert len(blk.lines("stayed incomplete")) == 1
    _serves_next(blk, tmp_path)


def test_huge_size_drops_the_front_end(blk, tmp_path):
    with raw(blk.path) as fe:
        fe.sock.sendall(struct.pack("<III", SET_MEM_TABLE, VERSION, 0xFFFFFFF0))
        assert fe.hung_up(5)
    assert len(blk.lines("4294967280-byte payload")) == 1
    _serves_next(blk, tmp_path)


def test_bad_version_drops_the_front_end(blk):
    with raw(blk.path) as fe:
        fe.send(GET_FEATURES, flags=2)
        assert fe.hung_up(5)
    assert len(blk.lines("protocol version 2")) == 1


def test_unknown_request_is_refused_and_the_connection_goes_on(blk):
    with raw(blk.path) as fe:
        fe.negotiate()
        assert fe.ack(99) == 1
        assert fe.u64(GET_FEATURES) & F_VERSION_1
    assert len(blk.lines("request 99 is not a message")) == 1


@pytest.mark.parametrize("kind", ["pipe", "directory", "none", "too-small", "unsealed"])
def test_bad_memory_fds_are_refused(blk, tmp_path, kind):
    with raw(blk.path) as fe:
        fe.negotiate()
        fds: list[int] = []
        table = fe.table()
        if kind == "pipe":
            r, w = os.pipe()
            fe.fds += [r, w]
            fds = [r]
        elif kind == "directory":
            d = os.open(str(tmp_path), os.O_RDONLY)
            fe.fds.append(d)
            fds = [d]
        elif kind == "too-small":
            fds = [fe.ds.fd]
            table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GPA, MEM * 4, USER, 0)
        elif kind == "unsealed":
            m = os.memfd_create("unsealed")
            os.ftruncate(m, MEM)
            fe.fds.append(m)
            fds = [m]
        assert fe.ack(SET_MEM_TABLE, table, fds) == 1
        assert fe.u64(GET_FEATURES) & F_VERSION_1  # still served
    assert len(blk.lines("SET_MEM_TABLE refused")) == 1
    _serves_next(blk, tmp_path)


@pytest.mark.parametrize("kind", ["pipe", "regular file"])
def test_bad_kick_fd_is_refused(blk, tmp_path, kind):
    with raw(blk.path) as fe:
        fe.negotiate()
        assert fe.set_mem_table() == 0
        if kind == "pipe":
            r, w = os.pipe()
            fe.fds += [r, w]
            fd = r
        else:
            fd = os.open(str(blk.image), os.O_RDONLY)
            fe.fds.append(fd)
        assert fe.ack(SET_VRING_KICK, struct.pack("<Q", 0), [fd]) == 1
        assert fe.ack(SET_VRING_KICK, struct.pack("<Q", 0)) == 1  # no fd and no NOFD flag
    assert len(blk.lines(f"is a {kind.split()[-1]}, not an eventfd")) == 1
    _serves_next(blk, tmp_path)


def test_vring_outside_the_memory_table(blk, tmp_path):
    with raw(blk.path) as fe:
        fe.negotiate()
        assert fe.set_mem_table() == 0
        assert fe.setup_queue(0, addrs=(USER + MEM - 16, USER + 0x2000, USER + 0x1000), enable=False) == 1
    assert len(blk.lines("descriptor table")) == 1
    _serves_next(blk, tmp_path)


def test_ring_with_a_loop_puts_the_device_in_error(blk, tmp_path):
    with raw(blk.path) as fe:
        fe.negotiate()
        assert fe.set_mem_table() == 0
        assert fe.setup_queue(0) == 0
        hdr = fe.buffer(struct.pack("<IIQ", 0, 0, 0))
        data = fe.buffer(512)
        fe.post(0, [(*hdr, False), (*data, True)], loop=True)
        err = fe.queues[0]["err"]
        assert select.select([err], [], [], 5)[0], "the error eventfd was not signalled"
        blk.wait_log("a loop?")
        assert struct.unpack_from("<H", fe.mem, 0x2002)[0] == 0  # nothing completed
    assert len(blk.lines("device error")) == 1
    _serves_next(blk, tmp_path)


def test_flood_of_messages_without_reading_replies(blk, tmp_path):
    with raw(blk.path) as fe:
        msg = struct.pack("<III", GET_FEATURES, VERSION, 0)
        fe.sock.settimeout(0.2)
        with contextlib.suppress(OSError):
            for _ in range(100000):
                fe.sock.sendall(msg * 64)
        time.sleep(1.5)  # replies stay unread for longer than --client-timeout
        assert fe.hung_up(10)
    assert len(blk.lines("does not read its replies")) + len(blk.lines("left replies unread")) == 1
    _serves_next(blk, tmp_path)


def test_flood_of_messages_that_need_no_reply(blk, tmp_path):
    with raw(blk.path) as fe:
        fe.sock.sendall(struct.pack("<III", SET_OWNER, VERSION, 0) * 20000)
        assert fe.u64(GET_FEATURES) & F_VERSION_1
    _serves_next(blk, tmp_path)


def test_usage_errors(tmp_path):
    r = cli("emulate", "blk", "--vhost-user", str(tmp_path / "a"), "--socket", str(tmp_path / "b"))
    assert r.returncode == 2 and "not both" in r.stderr
    r = cli("emulate", "blk", "--vhost-user", str(tmp_path / "a"), "--cmd-mode")
    assert r.returncode == 2 and "L4-VIRTIO option" in r.stderr
    r = cli("emulate", "--device", f"blk,socket={tmp_path / 'a'},vhost-user={tmp_path / 'b'}")
    assert r.returncode == 2 and "not both" in r.stderr


def test_bench_with_many_requests_in_flight(blk):
    """32 requests in flight with EVENT_IDX: no kick may be lost when the ring refills while it is served."""
    import json

    r = cli("bench", blk.urls[0], "--workload", "randread", "--bs", "4096", "--qd", "32", "--time", "1s", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)["result"]
    assert result["iops"] > 0


# -- l4vctl's own front-end for the other classes -------------------------------------------------


def test_rng_read_with_l4vctls_front_end(tmp_path):
    path, out = tmp_path / "rng.sock", tmp_path / "bytes.bin"
    with backend(tmp_path, "rng", "--vhost-user", str(path)) as b:
        r = cli("rng", "read", b.urls[0], "--bytes", "4096", "-o", str(out))
        assert r.returncode == 0, r.stderr
        data = out.read_bytes()
        assert len(data) == 4096 and len(set(data)) > 200


def test_net_ping_between_two_back_ends(tmp_path):
    a, c = tmp_path / "a.sock", tmp_path / "c.sock"
    with backend(tmp_path, "--device", f"net,link=p1,vhost-user={a}", "--device", f"net,link=p1,vhost-user={c}",
                 count=2) as b:  # fmt: skip
        r = cli("net", "ping", *b.urls, "--count", "3", "--json")
        assert r.returncode == 0, r.stderr
        import json

        result = json.loads(r.stdout)["result"]
        assert result["received"] == 3, result


def test_net_ping_between_vhost_user_and_l4virtio(tmp_path):
    a, u = tmp_path / "a.sock", tmp_path / "u.sock"
    with backend(tmp_path, "--device", f"net,link=p2,vhost-user={a}", "--device", f"net,link=p2,socket={u}",
                 count=2) as b:  # fmt: skip
        r = cli("net", "ping", *b.urls, "--count", "3", "--json")
        assert r.returncode == 0, r.stderr
        import json

        assert json.loads(r.stdout)["result"]["received"] == 3


def test_console_send_with_l4vctls_front_end(tmp_path):
    path, out = tmp_path / "con.sock", tmp_path / "console.out"
    with backend(tmp_path, "console", "--vhost-user", str(path), "--io", "null", "--output", str(out)) as b:
        r = cli("console", "send", b.urls[0], "hello from the front-end", "--newline")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 5
        while b"hello from the front-end\n" not in (out.read_bytes() if out.exists() else b""):
            assert time.monotonic() < deadline, out.read_bytes() if out.exists() else "no output file"
            time.sleep(0.02)


def test_from_file_with_a_vhost_user_device(tmp_path):
    v, u = tmp_path / "v.sock", tmp_path / "u.sock"
    conf = tmp_path / "devices.toml"
    conf.write_text(f'[[device]]\ntype = "rng"\nvhost-user = "{v}"\n[[device]]\ntype = "rng"\nsocket = "{u}"\n')
    with backend(tmp_path, "--from", str(conf), count=2) as b:
        assert b.urls == [f"vhost-user:{v}?type=rng", f"unix:{u}"]
        r = cli("rng", "read", b.urls[0], "--bytes", "16", "--json")
        assert r.returncode == 0, r.stderr


def test_a_second_front_end_is_served_when_the_first_leaves(blk, tmp_path):
    with raw(blk.path) as first:
        first.negotiate()
        second = RawFrontend(blk.path, timeout=0.5)
        try:
            second.send(GET_FEATURES)
            with pytest.raises(TimeoutError):
                second.reply(GET_FEATURES)  # waits in the listen queue
            first.sock.close()
            second.sock.settimeout(5)
            assert struct.unpack("<Q", second.reply(GET_FEATURES))[0] & F_VERSION_1
        finally:
            second.close()


def test_random_messages_never_stop_the_back_end(blk, tmp_path):
    """Seeded random messages of every type (right version, random payloads, sometimes fds): the back-end
    answers, refuses or drops each front-end, and still serves the next good one."""
    import random

    rng = random.Random(1313)
    for _ in range(30):
        with raw(blk.path, timeout=2) as fe:
            fe.negotiate()
            with contextlib.suppress(OSError):
                for _ in range(20):
                    request = rng.choice([*range(1, 41), 99, 0xFFFFFFFF])
                    size = rng.choice([0, 4, 8, 12, 40, 72, rng.randrange(0, 300)])
                    payload = bytes(rng.randrange(256) for _ in range(size))
                    if request == SET_MEM_TABLE and size >= 8:  # mostly well-formed counts, random regions
                        payload = struct.pack("<II", rng.randrange(0, 3), 0) + payload[8:]
                    fds = []
                    kind = rng.random()
                    if kind < 0.1:
                        fds = [fe.ds.fd]
                    elif kind < 0.2:
                        fds = [fe.eventfd()]
                    elif kind < 0.3:
                        fds = [os.open(str(tmp_path), os.O_RDONLY)]
                        fe.fds.extend(fds)
                    fe.send(request, payload, fds, VERSION | (NEED_REPLY if rng.random() < 0.5 else 0))
                    while select.select([fe.sock], [], [], 0.01)[0]:
                        if not fe.sock.recv(65536):
                            raise ConnectionError
        assert blk.proc.poll() is None, blk.log()
    _serves_next(blk, tmp_path)
    assert "Traceback" not in blk.log()
    assert len(blk.lines("dropped")) >= 10 and len(blk.lines("refused")) >= 10, blk.log()


def test_sigterm_removes_the_socket_and_a_stale_one_is_replaced(tmp_path):
    path = tmp_path / "v.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file nobody listens on
    stale.close()
    proc = subprocess.Popen([sys.executable, "-m", "l4vctl", "emulate", "blk", "--vhost-user", str(path), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert ready_lines(proc, 1) == [f"vhost-user:{path}?type=blk"]
        with raw(path) as fe:
            assert fe.u64(GET_FEATURES) & F_VERSION_1
        proc.terminate()
        assert proc.wait(10) == 0
        assert not path.exists()
    finally:
        reap(proc)


def test_reset_owner_stops_the_rings_and_the_device_sets_up_again(blk):
    with raw(blk.path) as fe:
        fe.negotiate()
        assert fe.set_mem_table() == 0
        assert fe.setup_queue(0) == 0
        assert fe.ack(RESET_OWNER) == 0
        blk.wait_log("device reset by the front-end")
        # everything is gone: a ring needs the memory table again
        assert fe.ack(SET_FEATURES, struct.pack("<Q", F_VERSION_1 | F_PROTOCOL)) == 0
        fe.queues.clear()
        assert fe.setup_queue(0) == 1  # no memory table
        assert fe.set_mem_table() == 0
        assert fe.setup_queue(0) == 0
        hdr = fe.buffer(struct.pack("<IIQ", 0, 0, 0))
        data, status = fe.buffer(512), fe.buffer(1)
        head = fe.post(0, [(*hdr, False), (*data, True), (*status, True)])
        assert fe.used(0) == (head, 513)


def test_config_windows(blk):
    with raw(blk.path) as fe:
        fe.negotiate()
        body = fe.call(GET_CONFIG, struct.pack("<III", 250, 16, 0) + bytes(16))  # beyond 256 bytes
        assert struct.unpack_from("<III", body) == (0, 0, 0) and len(body) == 12
        assert fe.ack(25, struct.pack("<III", 0, 8, 0) + bytes(8)) == 1  # SET_CONFIG: read-only
        assert fe.u64(GET_FEATURES) & F_VERSION_1
    assert len(blk.lines("GET_CONFIG refused")) == 1 and len(blk.lines("SET_CONFIG refused")) == 1


# -- QEMU's front-end ---------------------------------------------------------------------------


def _qemu() -> str:
    import shutil

    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("qemu-system-x86_64 is missing (CI installs qemu-system-x86)")
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return exe


def boot_sector(message: bytes) -> bytes:
    """A 512-byte boot sector that writes ``message`` to the first serial port and halts."""
    code = bytes.fromhex(
        "".join(
            [
                "31c0",  # 7c00 xor ax, ax
                "8ed8",  # 7c02 mov ds, ax
                "baf803",  # 7c04 mov dx, 0x3f8
                "be167c",  # 7c07 mov si, 0x7c16 (the message)
                "ac",  # 7c0a lodsb
                "84c0",  # 7c0b test al, al
                "7403",  # 7c0d jz 7c12
                "ee",  # 7c0f out dx, al
                "ebf8",  # 7c10 jmp 7c0a
                "fa",  # 7c12 cli
                "f4",  # 7c13 hlt
                "ebfc",  # 7c14 jmp 7c12
            ]
        )
    )
    assert len(code) == 0x16  # the message follows at 0x7c16
    sector = code + message + b"\0"
    return sector.ljust(510, b"\0") + b"\x55\xaa"


def test_qemu_boots_from_the_blk_back_end(blk, tmp_path):
    """QEMU's vhost-user-blk-pci (SeaBIOS, TCG) reads the boot sector through our back-end and runs it."""
    qemu = _qemu()
    marker = b"L4VCTL-VHOST-" + os.urandom(6).hex().encode()
    with open(blk.image, "r+b") as f:
        f.write(boot_sector(marker))
    serial = tmp_path / "serial.out"
    proc = subprocess.Popen([qemu, "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-m", "64M",
                             "-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-nodefaults",
                             "-no-user-config", "-display", "none", "-monitor", "none", "-serial", f"file:{serial}",
                             "-chardev", f"socket,id=c0,path={blk.path}",
                             "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1,bootindex=1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while marker not in (serial.read_bytes() if serial.exists() else b""):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, f"no boot within 60 s:\n{blk.log()}"
            time.sleep(0.1)
    finally:
        reap(proc)
    log = blk.wait_log("front-end 1 left")
    assert "queue 0 running" in log and "GET_CONFIG refused" not in log
    _serves_next(blk, tmp_path)  # and the next front-end is served


def test_a_new_kick_fd_for_a_running_ring_keeps_its_place(tmp_path):
    path = tmp_path / "rng.sock"
    with backend(tmp_path, "rng", "--vhost-user", str(path)) as b, raw(path) as fe:
        fe.negotiate()
        assert fe.set_mem_table() == 0
        assert fe.setup_queue(0) == 0
        first = fe.buffer(16)
        head = fe.post(0, [(*first, True)])
        assert fe.used(0) == (head, 16)
        fe.queues[0]["kick"] = fe.eventfd()
        assert fe.ack(SET_VRING_KICK, struct.pack("<Q", 0), [fe.queues[0]["kick"]]) == 0
        before = fe.read(first[0], 16)
        second = fe.buffer(16)
        head = fe.post(0, [(*second, True)])
        assert fe.used(0) == (head, 16)
        assert fe.read(first[0], 16) == before  # the first request was not served again
        body = fe.call(GET_VRING_BASE, struct.pack("<II", 0, 0))
        assert struct.unpack("<II", body) == (0, 2)
        assert b.proc.poll() is None
