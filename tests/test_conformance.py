"""One conformance suite over every backend that can run here: emu:, unix:, vhost-user:.

Each backend serves a block device; the same commands must behave alike
(within what a backend can know: vhost-user has no monitor interface).
"""

from __future__ import annotations

import os

import pytest

from l4vctl import catalog as cat
from tests.conftest import run_cli
from tests.emu import emulator
from tests.test_vhost_user import StorageDaemon


@pytest.fixture(params=["emu", "unix", "vhost-user"])
def blk(request, tmp_path):
    """(url, image path or None) of a 16 MiB block device on each backend."""
    if request.param == "emu":
        img = tmp_path / "emu.img"
        yield f"emu:blk?image={img}&size=16M", None  # emu: lives for one command only
    elif request.param == "unix":
        img = tmp_path / "unix.img"
        with emulator(tmp_path, "blk", "--image", str(img), "--size", "16M") as (url, _proc):
            yield url, img
    else:
        d = StorageDaemon(tmp_path)
        try:
            yield d.url, d.image
        finally:
            d.stop()


def ok(*args):
    r = run_cli(*args, "--json")
    assert r.code == 0, (args, r.stderr)
    env = r.json()
    assert env["ok"] and env["schema"] == 1
    return env["result"]


def test_probe(blk):
    url, _img = blk
    r = ok("probe", url)
    assert r["device"]["name"] == "BLOCK" and r["magic"] == cat.L4VIRTIO_MAGIC and r["version"] == 2
    assert {cat.VERSION_1_BIT, cat.INDIRECT_DESC_BIT} <= set(r["features"]["bits"])
    assert r["status"]["value"] == 0 and r["num_queues"] >= 1


def test_negotiate(blk):
    url, _img = blk
    r = ok("negotiate", url, "--require", "flush,indirect_desc", "--refuse", "event_idx")
    assert r["status"]["value"] == 0x0F
    assert {9, 28, 32} <= set(r["negotiated"]) and 29 not in r["negotiated"]
    assert [t["wrote"] for t in r["transitions"]] == [0, 1, 3, 0x0B, 0x0F]
    rejected = run_cli("negotiate", url, "--require", "ro")
    assert rejected.code == 5


def test_dump_config(blk):
    url, _img = blk
    r = ok("dump-config", url)
    assert r["device_config"]["fields"]["capacity"] == (16 << 20) // 512
    assert r["queues"][0]["num_max"] >= 64


def test_queue_stats(blk):
    url, _img = blk
    r = ok("queue-stats", url)
    assert r["queues"] and r["queues"][0]["ready"] == 0


def test_blk_io_lands_in_the_image(blk, tmp_path):
    url, img = blk
    data = os.urandom(256 * 1024)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    if img is None:  # emu: forgets everything when the command ends; use one session instead
        from l4vctl.drivers.blk import BlkDriver
        from l4vctl.session import Session

        with Session(url) as s:
            s.handshake()
            d = BlkDriver(s)
            d.write(2048, data)
            assert d.read(2048, len(data)) == data
        return
    ok("blk", "write", url, "--sector", "2048", "-i", str(src), "--flush")
    with open(img, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(len(data)) == data
    r = ok("blk", "read", url, "--sector", "2048", "--count", "2", "-o", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data[:1024] and r["bytes"] == 1024
    assert run_cli("blk", "read", url, "--sector", str((16 << 20) // 512), "--count", "1").code == 6


def test_bench(blk):
    url, _img = blk
    r = ok("bench", url, "--time", "0.3s", "--qd", "8", "--workload", "randwrite")
    assert r["requests"] > 0 and r["latency_us"]["p50"] > 0
