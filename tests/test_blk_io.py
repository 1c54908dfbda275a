"""Block I/O through real virtqueues, verified against the image file itself."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4vctl import catalog as cat
from l4vctl.drivers.blk import BlkDriver, BlkIOError
from l4vctl.errors import UsageError
from tests.emu import Session, emulator, reap, wait_for

SECTOR = 512


def image_bytes(path, sector: int, nbytes: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(sector * SECTOR)
        return f.read(nbytes)


@pytest.mark.parametrize("abi", ["classic&attach=iface", "classic&attach=config", "current"])  # the 3 generations
@pytest.mark.parametrize("num", [8, 64, 256])
@pytest.mark.parametrize("segments,indirect", [(1, False), (3, False), (1, True), (8, True)])
@pytest.mark.parametrize("event_idx", [False, True])
def test_random_writes_then_reads_match_the_image(tmp_path, abi, num, segments, indirect, event_idx):
    img = tmp_path / "disk.img"
    url = f"emu:blk?image={img}&size=2M&abi={abi}&num_max={num}" + ("&features=event_idx" if event_idx else "")
    rnd = random.Random(f"{abi}{num}{segments}{indirect}{event_idx}")
    with Session(url) as s:
        s.handshake(want="all" if event_idx else None)
        assert (cat.EVENT_IDX_BIT in s.negotiated) == event_idx
        drv = BlkDriver(s, depth=16, max_io=32 * 1024, segments=segments, indirect=indirect)
        assert drv.indirect == indirect
        model = bytearray(img.read_bytes())
        for _ in range(12):
            count = rnd.randrange(1, 200)
            sector = rnd.randrange(0, 4096 - count)
            data = rnd.randbytes(count * SECTOR)
            drv.write(sector, data)
            model[sector * SECTOR : sector * SECTOR + len(data)] = data
            assert image_bytes(img, sector, len(data)) == data  # acknowledged = in the file
        for _ in range(6):
            count = rnd.randrange(1, 100)
            sector = rnd.randrange(0, 4096 - count)
            n = count * SECTOR
            assert drv.read(sector, n) == model[sector * SECTOR : sector * SECTOR + n]
        assert img.read_bytes() == bytes(model)
        assert s.stats()["device_errors"] == 0


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 2040), st.integers(1, 8)), min_size=1, max_size=12))
def test_property_io_sequence_matches_a_model(tmp_path_factory, ops):
    img = tmp_path_factory.mktemp("p") / "disk.img"
    with Session(f"emu:blk?image={img}&size=1M") as s:
        s.handshake()
        drv = BlkDriver(s, depth=4, max_io=8 * SECTOR, segments=2)
        model = bytearray(1 << 20)
        for i, (is_write, sector, count) in enumerate(ops):
            if is_write:
                data = bytes([i + 1]) * (count * SECTOR)
                drv.write(sector, data)
                model[sector * SECTOR : (sector + count) * SECTOR] = data
            else:
                assert drv.read(sector, count * SECTOR) == model[sector * SECTOR : (sector + count) * SECTOR]
        assert img.read_bytes() == bytes(model)


def test_flush_id_discard_and_write_zeroes(tmp_path):
    img = tmp_path / "d.img"
    with Session(f"emu:blk?image={img}&size=1M&serial=disk-0042") as s:
        s.handshake()
        drv = BlkDriver(s)
        assert drv.get_id() == "disk-0042"
        drv.write(100, b"\xaa" * 4096)
        drv.flush()
        drv.write_zeroes(100, 2)
        assert image_bytes(img, 100, 4096) == bytes(1024) + b"\xaa" * 3072
        drv.discard(102, 6)
        assert image_bytes(img, 100, 4096) == bytes(4096)


def test_out_of_range_gets_ioerr_and_the_device_carries_on(tmp_path):
    with Session("emu:blk?size=1M") as s:
        s.handshake()
        drv = BlkDriver(s)
        with pytest.raises(BlkIOError, match="IN at sector 2046 .* IOERR") as e:
            drv.read(2046, 4096)
        assert "2048 sectors" in e.value.hint
        with pytest.raises(BlkIOError):
            drv.write(5000, bytes(512))
        with pytest.raises(BlkIOError):
            drv.discard(2000, 100)
        assert s.status == 0x0F  # IOERR is a request's failure, not the device's
        assert drv.read(0, 512) == bytes(512)


def test_read_only_device_refuses_writes(tmp_path):
    img = tmp_path / "ro.img"
    img.write_bytes(b"\x5a" * (1 << 20))
    with Session(f"emu:blk?image={img}&ro=1") as s:
        s.handshake()
        drv = BlkDriver(s)
        assert drv.read_only
        with pytest.raises(BlkIOError, match="OUT .* IOERR") as e:
            drv.write(0, bytes(512))
        assert "read-only" in e.value.hint
        assert drv.read(0, 512) == b"\x5a" * 512
    assert img.read_bytes() == b"\x5a" * (1 << 20)


def test_driver_rejects_bad_lengths():
    with Session("emu:blk") as s:
        s.handshake()
        drv = BlkDriver(s)
        with pytest.raises(UsageError):
            drv.read(0, 100)
        with pytest.raises(UsageError):
            BlkDriver(s, segments=0)


def test_image_options(tmp_path):
    from l4vctl.errors import UsageError as UE

    with pytest.raises(UE, match="does not exist; give --size"):
        Session(f"emu:blk?image={tmp_path / 'missing.img'}").open()
    img = tmp_path / "x.img"
    img.write_bytes(bytes(4096))
    with pytest.raises(UE, match="has 4096 bytes, not the 8192"):
        Session(f"emu:blk?image={img}&size=8K").open()
    with Session(f"emu:blk?image={img}") as s:
        assert s.device_config()["capacity"] == 8


WRITER = r"""
import sys
from l4vctl.session import Session
from l4vctl.drivers.blk import BlkDriver
s = Session(sys.argv[1]); s.open(); s.handshake()
d = BlkDriver(s, depth=8)
i = 0
while True:
    d.write(i * 8, bytes([i % 251 + 1]) * 4096)
    sys.stdout.write(f"{i}\n"); sys.stdout.flush()
    i += 1
"""


def test_killed_driver_leaves_every_acknowledged_write_in_the_image(tmp_path):
    img = tmp_path / "k.img"
    with emulator(tmp_path, "blk", "--image", str(img), "--size", "16M") as (url, proc):
        w = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, text=True)
        acked = []
        try:
            for line in w.stdout:
                acked.append(int(line))
                if len(acked) >= 200:
                    break
        finally:
            w.send_signal(signal.SIGKILL)
            reap(w)
        assert len(acked) >= 200
        for i in acked:
            assert image_bytes(img, i * 8, 4096) == bytes([i % 251 + 1]) * 4096, i
        with Session(url) as s:  # the emulator serves the next driver
            s.handshake()
            assert BlkDriver(s).read(0, 4096) == bytes([1]) * 4096
        assert proc.poll() is None


def test_queue_stats_shows_io(tmp_path):
    with emulator(tmp_path, "blk") as (url, _proc):
        with Session(url) as s:
            s.handshake()
            drv = BlkDriver(s)
            drv.write(0, bytes(64 * 1024))
            with Session(url, role="monitor") as mon:
                q = mon.stats()["queues"][0]
                assert q["completed"] >= 1 and q["used_idx"] == q["next_avail"] == drv.vq.avail_idx


def test_session_memory_is_released(tmp_path):
    before = set(os.listdir("/proc/self/fd"))
    with Session("emu:blk") as s:
        s.handshake()
        BlkDriver(s).read(0, 4096)
    assert wait_for(lambda: set(os.listdir("/proc/self/fd")) <= before)


def test_io_threads_keep_data_intact(tmp_path):
    img = tmp_path / "t.img"
    with Session(f"emu:blk?image={img}&size=4M&io_threads=3") as s:
        s.handshake()
        drv = BlkDriver(s, depth=32, max_io=16 * 1024)
        data = os.urandom(2 << 20)
        drv.write(0, data)
        assert drv.read(0, len(data)) == data
        assert image_bytes(img, 0, len(data)) == data
