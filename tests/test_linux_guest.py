"""Linux drives vhost-user back-ends: Debian's kernel in QEMU (TCG) with a busybox initramfs.

The guest (tests/linux_guest.py, built once per machine from Debian packages)
boots with vhost-user devices, runs shell checks and powers off; each test
checks what the guest did against the host side: the image file, the bytes
the device model produced, the frames l4vctl's net commands saw.

First against qemu-storage-daemon (the set-up itself), then against
``l4vctl emulate TYPE --vhost-user SOCK``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import threading
import time

import pytest

from l4vctl.drivers.net import NetDriver, frame
from l4vctl.session import Session
from tests import linux_guest as lg
from tests.emu import ready_lines, reap
from tests.test_vhost_user import StorageDaemon

CI = os.environ.get("CI") == "true"
SECTOR = 512


def need(what: str) -> None:
    """Fail in CI (which installs everything), skip elsewhere, naming what is missing."""
    if CI:
        pytest.fail(f"missing in CI: {what}")
    pytest.skip(f"needs {what}")


@pytest.fixture(scope="module")
def image() -> lg.Image:
    try:
        lg.check_host()
        return lg.image()
    except lg.Missing as e:
        need(str(e))
        raise


@pytest.fixture
def guest(image, tmp_path):
    g = lg.Guest(image, tmp_path)
    yield g
    g.kill()


@pytest.fixture
def qsd(tmp_path):
    if not shutil.which("qemu-storage-daemon"):
        need("qemu-storage-daemon (apt-get install qemu-system-common)")
    d = StorageDaemon(tmp_path, size=16 << 20, queues=1)
    yield d
    d.stop()


def blk_checks(seek: int) -> dict[str, str]:
    """The guest writes /data/pattern at block ``seek`` (4 KiB blocks) of /dev/vda, reads it back,
    and hashes the 64 KiB the host wrote at byte 1 MiB."""
    return {
        "size": "cat /sys/block/vda/size",
        "write": f"dd if=/data/pattern of=/dev/vda bs=4096 seek={seek} oflag=direct conv=fsync 2>&1 && sync",
        "readback": f"dd if=/dev/vda bs=4096 skip={seek} count=16 iflag=direct 2>/dev/null | cmp - /data/pattern",
        "host-data": "dd if=/dev/vda bs=65536 skip=16 count=1 iflag=direct 2>/dev/null | sha256sum",
    }


def check_blk(result: lg.Result, image_path, size: int, seek: int, pattern: bytes, host: bytes) -> None:
    with result.explained():
        assert int(result.ok("size").lines[0]) == size // SECTOR
        result.ok("write")
        result.ok("readback")
        assert result.ok("host-data").lines[0].split()[0] == hashlib.sha256(host).hexdigest()
        with open(image_path, "rb") as f:
            f.seek(seek * 4096)
            assert f.read(len(pattern)) == pattern, "the guest's write is not in the image file"


def prepare_image(path, size: int) -> bytes:
    """Random data at 1 MiB of the image (read by the guest); returns it."""
    host = os.urandom(64 * 1024)
    with open(path, "r+b") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(host)
    return host


def test_guest_writes_and_reads_qemu_storage_daemon(guest, qsd):
    size = 16 << 20
    host = prepare_image(qsd.image, size)
    pattern = os.urandom(64 * 1024)
    seek = 700
    checks = {**blk_checks(seek), "fails": "echo before; exit 3"}
    r = guest.boot(checks, lg.blk(qsd.sock), files={"pattern": pattern})
    check_blk(r, qsd.image, size, seek, pattern, host)
    assert (r["fails"].rc, r["fails"].lines) == (3, ["before"])
    with pytest.raises(AssertionError, match=r"(?s)exited 3:.*--- guest serial log ---.*L4VG end fails rc=3"):
        r.ok("fails")


def test_serial_log_parsing():
    log = (
        "[    0.1] kernel noise\r\nL4VG ready 6.1\nL4VG begin a\nL4VG| x y\nL4VG|\nL4VG end a rc=0\n"
        "L4VG begin b\n[    2.0] interleaved kernel line\nL4VG end b rc=7\nL4VG insmod virtio_blk failed: x\n"
    )
    checks, done, errors = lg.parse(log)
    assert checks["a"].lines == ["x y", ""] and checks["a"].rc == 0
    assert checks["b"].lines == [] and checks["b"].rc == 7
    assert not done and errors == ["L4VG insmod virtio_blk failed: x"]
    assert lg.parse(log + "L4VG done\n")[1]
    r = lg.Result(checks, log, 1.0, 0, done)
    with pytest.raises(AssertionError, match=r"(?s)^wrong\n--- guest serial log ---\n.*L4VG end b rc=7"):
        with r.explained():
            raise AssertionError("wrong")


def test_the_initramfs_loads_dependencies_first(image):
    arc = lg.cpio([("d", lg.DIR, b""), ("d/f", 0o100644, b"abc")])
    assert arc.startswith(b"070701") and b"d/f\0" in arc and b"TRAILER!!!" in arc and len(arc) % 4 == 0
    base = image.initramfs.read_bytes()
    start = base.index(b"modules.order\0") + len(b"modules.order\0")
    order = base[start : base.index(b"\0", start)].decode().split()
    for name in order:
        assert f"lib/modules/{name}.ko".encode() in base, name
    # every module after the modules its .modinfo says it depends on (read back from the archive)
    for name in ("virtio_blk", "virtio_net", "virtio_rng", "virtio_pci"):
        at = base.index(f"lib/modules/{name}.ko\0".encode()) + len(name) + 16
        at += -at % 4  # the file's data starts at the next 4-byte boundary of the archive
        assert base[at : at + 4] == b"\x7fELF", name
        info = lg.modinfo(base[at:])
        deps = [d.replace("-", "_") for d in info["depends"].split(",") if d]
        assert deps and all(order.index(d) < order.index(name) for d in deps), (name, deps, order)


# -- l4vctl's own back-end: l4vctl emulate TYPE --vhost-user SOCK ----------------------------------


@contextlib.contextmanager
def backend(tmp_path, kind: str, *args: str):
    """``l4vctl emulate KIND --vhost-user SOCK ARGS`` as a process; yields (socket path, process)."""
    sock = tmp_path / f"{kind}.vhost.sock"
    proc = subprocess.Popen([sys.executable, "-m", "l4vctl", "emulate", kind, "--vhost-user", str(sock), "-q", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert ready_lines(proc, 1) == [f"vhost-user:{sock}?type={kind}"]
        yield sock, proc
    finally:
        reap(proc)


def test_guest_writes_and_reads_our_blk(guest, tmp_path):
    size = 16 << 20
    img = tmp_path / "emu.img"
    img.touch()
    host = prepare_image(img, size)
    pattern = os.urandom(64 * 1024)
    seek = 1234
    with backend(tmp_path, "blk", "--image", str(img)) as (sock, proc):
        r = guest.boot(blk_checks(seek), lg.blk(sock), files={"pattern": pattern})
        assert proc.poll() is None, "the back-end died"
    check_blk(r, img, size, seek, pattern, host)


def test_guest_sees_a_read_only_4k_disk(guest, tmp_path):
    """The device's features as Linux sees them: RO and BLK_SIZE 4096."""
    size = 8 << 20
    img = tmp_path / "ro.img"
    img.touch()
    host = prepare_image(img, size)
    before = img.read_bytes()
    checks = {
        "ro": "cat /sys/block/vda/ro",
        "lbs": "cat /sys/block/vda/queue/logical_block_size",
        "features": "cat /sys/block/vda/device/features",
        "host-data": "dd if=/dev/vda bs=65536 skip=16 count=1 iflag=direct 2>/dev/null | sha256sum",
        "write": "dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=fsync",
    }
    args = ("--image", str(img), "--ro", "--blk-size", "4096")
    with backend(tmp_path, "blk", *args) as (sock, proc):
        r = guest.boot(checks, lg.blk(sock))
        assert proc.poll() is None, "the back-end died"
    with r.explained():
        assert r.ok("ro").lines == ["1"]
        assert r.ok("lbs").lines == ["4096"]
        bits = r.ok("features").lines[0]  # one character per feature bit, bit 0 first
        assert (bits[5], bits[6]) == ("1", "1"), bits  # RO, BLK_SIZE
        assert r.ok("host-data").lines[0].split()[0] == hashlib.sha256(host).hexdigest()
        assert r["write"].rc != 0, r["write"].text
        assert img.read_bytes() == before, "a read-only disk's image changed"


def test_guest_reads_our_rng(guest, tmp_path):
    record = tmp_path / "rng.record"
    with backend(tmp_path, "rng", "--record", str(record)) as (sock, proc):
        r = guest.boot({"hwrng": "cat /sys/class/misc/hw_random/rng_current && "
                                 "dd if=/dev/hwrng bs=512 count=2 2>/dev/null | od -An -tx1 -v"},
                       lg.rng(sock))  # fmt: skip
        assert proc.poll() is None, "the back-end died"
    with r.explained():
        c = r.ok("hwrng")
        assert c.lines[0].startswith("virtio_rng")
        got = bytes.fromhex("".join(c.lines[1:]))
        assert len(got) == 1024
        produced = record.read_bytes()
        assert got in produced, f"the guest's {len(got)} bytes are not among the {len(produced)} the model produced"


# -- net: ICMP echo both ways between the guest and l4vctl's net driver on the same cable ---------

HOST_MAC = bytes.fromhex("020000000d01")
GUEST_MAC = bytes.fromhex("525400123456")
HOST_IP, GUEST_IP = bytes([10, 13, 0, 1]), bytes([10, 13, 0, 2])
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_icmp(src: bytes, dst: bytes, icmp_type: int, ident: int, seq: int, payload: bytes) -> bytes:
    """An IPv4 packet carrying an ICMP echo request or reply, checksums filled in."""
    icmp = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0, src, dst)
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + icmp


def parse_icmp(frame: bytes) -> dict | None:
    """The fields of an Ethernet frame holding an IPv4 ICMP echo message (None for anything else)."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 1:
        return None
    ihl = (frame[14] & 0xF) * 4
    icmp = frame[14 + ihl :]
    t, _code, _sum, ident, seq = struct.unpack("!BBHHH", icmp[:8])
    return {"dst_mac": frame[0:6], "src_mac": frame[6:12], "src": frame[26:30], "dst": frame[30:34],
            "type": t, "id": ident, "seq": seq, "payload": icmp[8:], "icmp_ok": checksum(icmp) == 0}  # fmt: skip


NET_CHECKS = {
    "net": f"""
ip link set eth0 up || exit 1
ip addr add 10.13.0.2/24 dev eth0 || exit 1
arp -s 10.13.0.1 {":".join(f"{b:02x}" for b in HOST_MAC)} || exit 1
cat /sys/class/net/eth0/address
ping -c 3 -W 2 10.13.0.1
ok=$?
sleep 1
echo "rx_packets $(cat /sys/class/net/eth0/statistics/rx_packets)"
exit $ok
""",
}


def test_guest_exchanges_frames_with_our_net(guest, tmp_path):
    """The guest pings l4vctl's net driver (which answers), and the driver pings the guest."""
    link = f"l4vg-{os.getpid()}-{tmp_path.name}"[:60]
    nonce = os.urandom(24)
    with backend(tmp_path, "net", "--link", link) as (sock, proc):
        host_url = f"emu:net?link={link}&mac={':'.join(f'{b:02x}' for b in HOST_MAC)}"
        with Session(host_url) as s:
            s.handshake()
            drv = NetDriver(s)
            assert drv.mac == HOST_MAC
            box: dict = {}

            def run() -> None:
                try:
                    box["r"] = guest.boot(NET_CHECKS, lg.net(sock), append="ipv6.disable=1")
                except BaseException as e:  # re-raised below, in the test's thread
                    box["error"] = e

            t = threading.Thread(target=run)
            requests, replies, sent = [], [], False
            t.start()
            try:
                deadline = time.monotonic() + 60
                while t.is_alive() and time.monotonic() < deadline:
                    for f in drv.receive(0.2):
                        m = parse_icmp(f)
                        if m is None:
                            continue
                        if m["type"] == ICMP_ECHO_REQUEST and m["dst"] == HOST_IP:
                            requests.append(m)
                            reply = ipv4_icmp(HOST_IP, m["src"], ICMP_ECHO_REPLY, m["id"], m["seq"], m["payload"])
                            drv.send(frame(m["src_mac"], HOST_MAC, 0x0800, reply))
                            if not sent:  # the guest is up: ping it too
                                req = ipv4_icmp(HOST_IP, GUEST_IP, ICMP_ECHO_REQUEST, 0x4C34, 1, nonce)
                                drv.send(frame(GUEST_MAC, HOST_MAC, 0x0800, req))
                                sent = True
                        elif m["type"] == ICMP_ECHO_REPLY and m["dst"] == HOST_IP:
                            replies.append(m)
            finally:
                guest.kill()
                t.join(30)
            assert proc.poll() is None, "the back-end died"
    if "error" in box:
        raise box["error"]
    assert "r" in box, "the guest did not finish"
    r: lg.Result = box["r"]
    with r.explained():
        c = r.ok("net")
        assert c.lines[0] == "52:54:00:12:34:56"
        assert "3 packets transmitted, 3 packets received" in c.text, c.text
        assert len(requests) == 3 and all(m["src_mac"] == GUEST_MAC and m["src"] == GUEST_IP and m["icmp_ok"]
                                          for m in requests)  # fmt: skip
        assert len(replies) == 1, replies
        (rep,) = replies
        assert (rep["src_mac"], rep["dst_mac"], rep["src"]) == (GUEST_MAC, HOST_MAC, GUEST_IP)
        assert (rep["id"], rep["seq"], rep["payload"], rep["icmp_ok"]) == (0x4C34, 1, nonce, True)
