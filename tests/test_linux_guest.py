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
import subprocess
import sys

import pytest

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
    r = guest.boot(blk_checks(seek), lg.blk(qsd.sock), files={"pattern": pattern})
    check_blk(r, qsd.image, size, seek, pattern, host)


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


def test_guest_reads_our_rng(guest, tmp_path):
    record = tmp_path / "rng.record"
    with backend(tmp_path, "rng", "--record", str(record)) as (sock, proc):
        r = guest.boot({"hwrng": "cat /sys/class/misc/hw_random/rng_current && "
                                 "dd if=/dev/hwrng bs=512 count=2 2>/dev/null | od -An -tx1 -v"},
                       lg.rng(sock))  # fmt: skip
        assert proc.poll() is None, "the back-end died"
    c = r.ok("hwrng")
    assert c.lines[0].startswith("virtio_rng")
    got = bytes.fromhex("".join(c.lines[1:]))
    assert len(got) == 1024
    produced = record.read_bytes()
    assert got in produced, f"the guest's {len(got)} bytes are not among the {len(produced)} the model produced"
