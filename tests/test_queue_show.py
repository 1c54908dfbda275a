"""queue-show against real emulator processes: requests in flight, decoded payloads, hostile rings, saved state."""

from __future__ import annotations

import contextlib
import json

import pytest

from l4vctl import catalog as cat
from l4vctl.drivers.blk import BlkDriver
from l4vctl.formats.fast import codec
from l4vctl.formats.fast import ring as geometry
from l4vctl.session import Session
from tests.conftest import run_cli as cli_run
from tests.emu import emulator
from tests.test_vhost_user import StorageDaemon

BLK_HDR = codec("l4virtio_block_header_t")
NET_HDR = codec("l4virtio_net_header_t")
DESC = geometry().desc
NEXT, WRITE, INDIRECT = 1, 2, 4


def bring_up_without_driver_ok(s: Session, queue_size: int | None = None) -> None:
    """Everything of a handshake but DRIVER_OK: queues are ready, and the device serves none of them.

    A driver that posts requests before DRIVER_OK (a bug made on purpose) leaves
    them in the rings for as long as it likes, which queue-show then reads.
    """
    s.reset()
    s.write_status(cat.STATUS_ACKNOWLEDGE)
    s.write_status(cat.STATUS_ACKNOWLEDGE | cat.STATUS_DRIVER)
    s.negotiate(None, (), (), s.get("device"))
    s.setup_queues(queue_size)


@contextlib.contextmanager
def stalled(tmp_path, kind: str, abi: str, *args: str, queue_size: int | None = None):
    """An emulator process and a driver session whose requests stay in flight; yields (url, session)."""
    with emulator(tmp_path, kind, "--abi", abi, *args) as (url, _proc):
        with Session(url) as s:
            bring_up_without_driver_ok(s, queue_size)
            yield url, s


def publish(vq) -> None:
    """Make what was added visible to the device (avail.idx), without a kick."""
    vq._avail_idx[0] = vq.avail_idx


def show(cli, url: str, *args: str) -> dict:
    r = cli("queue-show", url, *args, "--json")
    assert r.code == 0, (r.stdout, r.stderr)
    return r.json()["result"]


ABIS = pytest.mark.parametrize("abi", ["classic", "current"])


def post_blk(s: Session):
    """Three blk requests in flight on queue 0: IN sector 0, OUT sector 8, FLUSH; returns (vq, mem, addr)."""
    mem, addr = s.alloc(65536)
    vq = s.virtqueue(0)
    for k, rtype in enumerate((cat.BLK_T_IN, cat.BLK_T_OUT, cat.BLK_T_FLUSH)):
        BLK_HDR.pack_into(mem, k * 1024, {"type": rtype, "ioprio": 0, "sector": 8 * k})
        mem[k * 1024 + 1023] = 0xAA
        bufs = [(addr + k * 1024, BLK_HDR.size, False)]
        if rtype != cat.BLK_T_FLUSH:
            bufs.append((addr + 8192 + k * 4096, 4096, rtype == cat.BLK_T_IN))
        bufs.append((addr + k * 1024 + 1023, 1, True))
        vq.add(bufs, k)
    publish(vq)
    return vq, mem, addr


@ABIS
def test_blk_requests_in_flight(tmp_path, cli, abi):
    with stalled(tmp_path, "blk", abi, "--size", "1M") as (url, s):
        post_blk(s)
        r = show(cli, url, "--queue", "0")
        assert r["device_class"] == "blk" and r["role"] == "requests"
        assert r["queue"]["avail"]["idx"] == 3 and r["queue"]["used"]["idx"] == 0
        assert r["queue"]["next_avail"] == 0 and r["queue"]["pending"] == 3
        assert r["selection"] == {"mode": "outstanding", "value": None}
        chains = r["chains"]
        assert [c["state"] for c in chains] == ["pending"] * 3
        assert [c["avail_index"] for c in chains] == [0, 1, 2]
        p = [c["payload"] for c in chains]
        assert [x["type_name"] for x in p] == ["IN", "OUT", "FLUSH"]
        assert [x["sector"] for x in p] == [0, 8, 16]
        assert [x["data_len"] for x in p] == [4096, 4096, 0]
        assert [x["direction"] for x in p] == ["in", "out", None]
        assert all(x["status"] is None and not x["completed"] for x in p)  # 0xAA is not a status yet
        first = chains[0]["buffers"]
        assert [b["flag_names"] for b in first] == [["NEXT"], ["NEXT", "WRITE"], ["WRITE"]]
        assert [b["len"] for b in first] == [16, 4096, 1]
        assert all(not c["findings"] for c in chains) and not r["findings"]
        text = cli("queue-show", url, "--queue", "0")
        assert text.code == 0, text.stderr
        assert "IN, sector 0, data 4096 bytes in 1 buffer(s), status not written yet" in text.stdout
        assert "chain head 0 (avail 0 slot 0): pending" in text.stdout
        one = show(cli, url, "--queue", "0", "--index", "1")
        assert [c["payload"]["type_name"] for c in one["chains"]] == ["OUT"]
        by_head = show(cli, url, "--queue", "0", "--head", str(chains[2]["head"]))
        assert by_head["chains"][0]["payload"]["type_name"] == "FLUSH"
        assert by_head["chains"][0]["avail_index"] is None


@ABIS
def test_completed_blk_request_shows_its_status(tmp_path, cli, abi):
    with emulator(tmp_path, "blk", "--abi", abi, "--size", "1M") as (url, _proc):
        with Session(url) as s:
            s.handshake()
            drv = BlkDriver(s)
            drv.write(8, b"\x5a" * 4096)
            assert drv.read(8, 4096) == b"\x5a" * 4096
            r = show(cli, url, "--queue", "0", "--all")
            done = [c for c in r["chains"] if c["state"] == "completed"]
            # the driver used the same descriptors for both requests: they now hold the read
            assert done and {c["payload"]["type_name"] for c in done} == {"IN"}
            for c in done:
                p = c["payload"]
                assert (p["status"], p["status_name"], p["sector"], p["data_len"]) == (cat.BLK_S_OK, "OK", 8, 4096)
                assert c["used_len"] == 4096 + 1
            assert show(cli, url, "--queue", "0")["chains"] == []  # nothing in flight


@ABIS
def test_console_bytes_escaped_and_truncated(tmp_path, cli, abi):
    with stalled(tmp_path, "console", abi) as (url, s):
        mem, addr = s.alloc(4096)
        mem[:13] = b"hello\x1b[2Jok\n\\"
        vq = s.virtqueue(cat.CONSOLE_TX_QUEUE)
        vq.add([(addr, 13, False)], 0)
        rx = s.virtqueue(cat.CONSOLE_RX_QUEUE)
        rx.add([(addr + 1024, 256, True)], 0)
        publish(vq)
        publish(rx)
        tx = show(cli, url, "--queue", "1")
        (c,) = tx["chains"]
        assert tx["role"] == "tx"
        assert c["payload"]["kind"] == "console-tx"
        assert c["payload"]["text"] == "hello\\x1b[2Jok\\n\\\\"
        assert c["payload"]["bytes"] == 13 and not c["payload"]["truncated"]
        short = show(cli, url, "--queue", "1", "--bytes", "5")["chains"][0]["payload"]
        assert short["text"] == "hello" and short["truncated"]
        text = cli("queue-show", url, "--queue", "1")
        assert "\x1b" not in text.stdout and "hello\\x1b[2Jok" in text.stdout
        (r,) = show(cli, url, "--queue", "0")["chains"]
        assert r["payload"]["kind"] == "console-rx" and r["payload"]["buffer_len"] == 256
        assert r["payload"]["text"] is None


@ABIS
def test_rng_lengths(tmp_path, cli, abi):
    with stalled(tmp_path, "rng", abi) as (url, s):
        _mem, addr = s.alloc(4096)
        vq = s.virtqueue(0)
        vq.add([(addr, 64, True), (addr + 64, 32, True)], 0)
        vq.add([(addr + 128, 16, True)], 1)
        publish(vq)
        r = show(cli, url, "--queue", "0")
        assert [c["payload"]["buffers"] for c in r["chains"]] == [[64, 32], [16]]
        assert [c["payload"]["requested"] for c in r["chains"]] == [96, 16]


@ABIS
def test_net_tx_header(tmp_path, cli, abi):
    with stalled(tmp_path, "net", abi) as (url, s):
        mem, addr = s.alloc(4096)
        hdr = {"flags": 1, "gso_type": 1, "hdr_len": 54, "gso_size": 1448, "csum_start": 34, "csum_offset": 16,
               "num_buffers": 0}  # fmt: skip
        NET_HDR.pack_into(mem, 0, hdr)
        mem[NET_HDR.size : NET_HDR.size + 60] = b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + b"x" * 46
        vq = s.virtqueue(cat.NET_TX_QUEUE)
        vq.add([(addr, NET_HDR.size, False), (addr + NET_HDR.size, 60, False)], 0)
        publish(vq)
        (c,) = show(cli, url, "--queue", "1")["chains"]
        p = c["payload"]
        assert p["kind"] == "net-tx" and p["header_size"] == 12  # VERSION_1 negotiated
        assert p["frame_len"] == 60
        h = p["header"]
        assert (h["flag_names"], h["gso_name"], h["hdr_len"], h["gso_size"]) == (["NEEDS_CSUM"], "TCPV4", 54, 1448)
        assert (h["csum_start"], h["csum_offset"], h["num_buffers"]) == (34, 16, 0)


# -- hostile rings -----------------------------------------------------------------------


def write_desc(vq, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
    DESC.pack_into(vq.desc, index * DESC.size, {"addr": addr, "len": length, "flags": flags, "next": nxt})


def offer(vq, heads) -> None:
    for h in heads:
        vq._avail_ring[vq.avail_idx % vq.num] = h
        vq.avail_idx = (vq.avail_idx + 1) & 0xFFFF
    publish(vq)


@ABIS
def test_hostile_chains_are_reported(tmp_path, cli, abi):
    with stalled(tmp_path, "blk", abi, "--size", "1M", queue_size=16) as (url, s):
        mem, addr = s.alloc(65536)
        vq = s.virtqueue(0)
        num = vq.num
        assert num == 16
        # 0 -> 1 -> 0: a loop
        write_desc(vq, 0, addr, 16, NEXT, 1)
        write_desc(vq, 1, addr + 16, 16, NEXT, 0)
        # 2: next beyond the table
        write_desc(vq, 2, addr, 16, NEXT, num + 3)
        # 3: a buffer outside the registered memory
        write_desc(vq, 3, 0x10, 512, WRITE, 0)
        # 4: an indirect table of 24 bytes
        write_desc(vq, 4, addr + 4096, 24, INDIRECT, 0)
        # 5: an indirect table holding an indirect descriptor
        DESC.pack_into(mem, 8192, {"addr": addr, "len": 16, "flags": NEXT, "next": 1})
        DESC.pack_into(mem, 8192 + 16, {"addr": addr + 4096, "len": 32, "flags": INDIRECT, "next": 0})
        write_desc(vq, 5, addr + 8192, 32, INDIRECT, 0)
        # 6: an indirect table of 20 chained entries in a queue of 16
        for k in range(20):
            DESC.pack_into(mem, 12288 + k * 16, {"addr": addr, "len": 8, "flags": NEXT if k < 19 else 0, "next": k + 1})
        write_desc(vq, 6, addr + 12288, 20 * 16, INDIRECT, 0)
        # 7: an indirect table outside the registered memory
        write_desc(vq, 7, 0x1000, 64, INDIRECT, 0)
        # 8: readable after writable
        write_desc(vq, 8, addr, 16, WRITE | NEXT, 9)
        write_desc(vq, 9, addr + 16, 16, 0, 0)
        offer(vq, [0, 2, 3, 4, 5, 6, 7, 8, num + 5])
        r = show(cli, url, "--queue", "0")
        kinds = [sorted({f["kind"] for f in c["findings"]}) for c in r["chains"]]
        assert kinds[0] == ["loop"]
        assert kinds[1] == ["next-out-of-range"]
        assert kinds[2] == ["outside-memory"]
        assert kinds[3] == ["indirect-size"]
        assert "nested-indirect" in kinds[4]
        assert "chain-too-long" in kinds[5]
        assert "outside-memory" in kinds[6]
        assert kinds[7] == ["read-after-write"]
        assert kinds[8] == ["head-out-of-range"]
        assert len(r["chains"][0]["buffers"]) == 2  # the loop is cut where it closes
        assert len(r["chains"][5]["buffers"]) <= num
        # the text form reports the same, one finding a line
        text = cli("queue-show", url, "--queue", "0")
        assert text.code == 0
        assert text.stdout.count("finding ") >= 9


@ABIS
def test_index_corruption(tmp_path, cli, abi):
    with stalled(tmp_path, "rng", abi, queue_size=8) as (url, s):
        _mem, addr = s.alloc(4096)
        vq = s.virtqueue(0)
        write_desc(vq, 0, addr, 16, WRITE, 0)
        vq.avail_idx = 8 + 30  # avail.idx jumps past the queue size
        publish(vq)
        r = show(cli, url, "--queue", "0")
        assert [f["kind"] for f in r["findings"]] == ["index-corruption"]
        assert len(r["chains"]) == 8


# -- saved state ---------------------------------------------------------------------------


@ABIS
def test_archive_round_trip(tmp_path, cli, abi):
    archive = tmp_path / "blk.l4vm"
    with stalled(tmp_path, "blk", abi, "--size", "1M") as (url, s):
        post_blk(s)
        live = show(cli, url, "--queue", "0")
        w = cli("dump-config", url, "--with-memory", "-o", archive, "--json")
        assert w.code == 0, w.stderr
        info = w.json()["result"]
        assert info["format"] == "archive" and info["regions"] >= 2 and info["bytes"] == archive.stat().st_size
    # the driver and the emulator are gone: the archive alone tells the same
    saved = show(cli, f"dump:{archive}", "--queue", "0")
    assert saved["chains"] == live["chains"]
    assert saved["queue"] == live["queue"]
    assert saved["memory"]["source"] == "archive"
    page = cli("dump-config", archive, "--json")
    assert page.code == 0, page.stderr
    assert page.json()["result"]["source"]["format"] == "archive"
    assert page.json()["result"]["device"]["class"] == "blk"


def _archive(tmp_path, cli) -> bytes:
    path = tmp_path / "a.l4vm"
    with stalled(tmp_path, "rng", "current") as (url, s):
        _mem, addr = s.alloc(4096)
        vq = s.virtqueue(0)
        vq.add([(addr, 64, True)], 0)
        publish(vq)
        assert cli("dump-config", url, "--with-memory", "-o", path).code == 0
    return path.read_bytes()


def _rebuild(data: bytes, edit) -> bytes:
    """The archive with its manifest changed by ``edit`` (the blobs kept)."""
    hdr = codec("archive_header")
    h = hdr.unpack(data)
    manifest = json.loads(data[hdr.size : hdr.size + h["manifest_size"]])
    body = data[hdr.size + h["manifest_size"] :]
    edit(manifest)
    text = json.dumps(manifest).encode()
    return hdr.pack({**h, "manifest_size": len(text)}) + text + body


def test_hostile_archives_are_refused(tmp_path, cli):
    good = _archive(tmp_path, cli)
    assert show(cli, _write(tmp_path, good), "--queue", "0")["chains"]

    def regions(m):
        return m["regions"]

    cases = {
        "truncated header": good[:10],
        "truncated manifest": good[:40],
        "truncated page": good[: len(good) - sum(r["size"] for r in _manifest(good)["regions"]) - 100],
        "truncated region": good[:-1],
        "trailing bytes": good + b"\0",
        "version": good[:8] + b"\x02\x00" + good[10:],
        "manifest size": good[:12] + (1 << 30).to_bytes(4, "little") + good[16:],
        "manifest not json": _rebuild_raw(good, b"{not json"),
        "manifest a list": _rebuild_raw(good, b"[]"),
        "wrong region offset": _rebuild(good, lambda m: regions(m)[0].update(offset=1)),
        "negative size": _rebuild(good, lambda m: regions(m)[0].update(size=-1)),
        "size as text": _rebuild(good, lambda m: regions(m)[0].update(size="4096")),
        "overlap": _rebuild(good, lambda m: regions(m)[1].update(base=regions(m)[0]["base"]))
        if len(_manifest(good)["regions"]) > 1
        else good[:-2],
        "past 2^64": _rebuild(good, lambda m: regions(m)[0].update(base=(1 << 64) - 16)),
        "page size": _rebuild(good, lambda m: m["page"].update(size=10)),
        "registered": _rebuild(good, lambda m: m.update(registered=[{"base": "x"}])),
        "device_side queues": _rebuild(good, lambda m: m["device_side"].update(queues="x")),
        "device_side queue": _rebuild(good, lambda m: m["device_side"]["queues"][0].update(next_avail="7")),
        "memory_note": _rebuild(good, lambda m: m.update(memory_note=5)),
    }
    for what, data in cases.items():
        path = _write(tmp_path, data)
        for cmd in (("queue-show", path, "--queue", "0"), ("dump-config", path)):
            r = cli(*cmd)
            assert r.code == 4, (what, cmd[0], r.code, r.stderr)
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (what, r.stderr)


def _manifest(data: bytes) -> dict:
    hdr = codec("archive_header")
    h = hdr.unpack(data)
    return json.loads(data[hdr.size : hdr.size + h["manifest_size"]])


def _rebuild_raw(data: bytes, text: bytes) -> bytes:
    hdr = codec("archive_header")
    h = hdr.unpack(data)
    body = data[hdr.size + h["manifest_size"] :]
    return hdr.pack({**h, "manifest_size": len(text)}) + text + body


_n = [0]


def _write(tmp_path, data: bytes) -> str:
    _n[0] += 1
    path = tmp_path / f"case{_n[0]}.l4vm"
    path.write_bytes(data)
    return f"dump:{path}"


# -- errors ---------------------------------------------------------------------------------


def test_no_memory_interface_is_exit_3(tmp_path, cli):
    page = tmp_path / "page.bin"
    assert cli("dump-config", "emu:rng", "--raw", "-o", page).code == 0
    r = cli("queue-show", f"dump:{page}", "--queue", "0")
    assert r.code == 3 and "saved page holds no memory" in r.stderr
    r = cli("dump-config", page, "--with-memory", "-o", tmp_path / "x.l4vm")
    assert r.code == 3 and "saved page holds no memory" in r.stderr
    r = cli("queue-show", "emu:rng", "--queue", "0", "--json")
    assert r.code == 3 and r.json()["error"]["message"] == "queue 0 is not ready (ready 0, num 0)"


def test_usage_errors(tmp_path, cli):
    assert cli("queue-show", "emu:rng", "--queue", "0", "--index", "1", "--head", "2").code == 2
    assert cli("queue-show", "emu:rng").code == 2  # --queue is required
    r = cli("queue-show", "emu:rng", "--queue", "9")
    assert r.code == 2 and "does not exist" in r.stderr
    assert cli("dump-config", "emu:rng", "--with-memory", "--raw", "-o", tmp_path / "x").code == 2


@pytest.fixture
def qsd(tmp_path):
    d = StorageDaemon(tmp_path)  # fails (never skips) without qemu-storage-daemon, as its own tests do
    yield d
    d.stop()


def test_vhost_user_has_no_memory_view(qsd):
    """A vhost-user back-end's rings live in its own process: exit 3, saying so."""
    for cmd in (("queue-show", qsd.url, "--queue", "0"), ("dump-config", qsd.url, "--with-memory", "-o", "/dev/null")):
        r = cli_run(*cmd)
        assert r.code == 3, (cmd, r.stderr)
        assert "vhost-user: the back-end's ring memory is its own" in r.stderr


def test_net_header_of_ten_bytes():
    """Without VERSION_1 and MRG_RXBUF the net header has no num_buffers: 10 bytes."""
    import struct

    from l4vctl import decode
    from l4vctl.ringread import QueueState
    from l4vctl.snapshot import Region, Snapshot

    base = 0x200000
    table = struct.pack("<QIHH", base + 0x1000, 10 + 20, 0, 0).ljust(32, b"\0")
    avail = struct.pack("<HH2HH", 0, 1, 0, 0, 0)
    used = bytes(geometry().used_size(2))
    frame = NET_HDR.pack({"flags": 2, "gso_type": 0, "hdr_len": 0, "gso_size": 0, "csum_start": 0, "csum_offset": 0,
                          "num_buffers": 0})[:10] + b"F" * 20  # fmt: skip
    regions = [Region(base, 32, table, True), Region(base + 0x100, len(avail), avail, True),
               Region(base + 0x200, len(used), used, True), Region(base + 0x1000, 30, frame, True)]  # fmt: skip
    for bits, size in (([], 10), ([cat.NET_F_MRG_RXBUF], 12), ([cat.VERSION_1_BIT], 12)):
        decoded = {"queues": [{"index": i, "num": 2, "ready": 1, "desc_addr": base, "avail_addr": base + 0x100,
                               "used_addr": base + 0x200} for i in (0, 1)],
                   "features": {"accepted": {"bits": bits}}, "device": {"class": "net"}}  # fmt: skip
        snap = Snapshot(b"", "current", decoded, regions, registered=[(base, 0x2000, True)])
        q = QueueState(snap, decoded["queues"][1])
        p = decode.payload(snap, q.walk(0), 1)
        assert p["kind"] == "net-tx" and p["header_size"] == size
        assert p["frame_len"] == 30 - size
        if size == 10:
            assert "num_buffers" not in p["header"] and p["header"]["flag_names"] == ["DATA_VALID"]
            assert p["frame"] == "F" * 20


def test_archive_through_a_pipe(tmp_path, cli):
    """--with-memory without -o writes the archive to a pipe; dump:- reads one from standard input."""
    from l4vctl import archive

    with stalled(tmp_path, "rng", "classic") as (url, s):
        _mem, addr = s.alloc(4096)
        vq = s.virtqueue(0)
        vq.add([(addr, 48, True)], 0)
        publish(vq)
        w = cli("dump-config", url, "--with-memory")
        assert w.code == 0, w.stderr
        assert "wrote a memory archive to standard output" in w.stderr
        assert cli("dump-config", url, "--with-memory", "--json").code == 2  # JSON and archive cannot share stdout
    data = w.stdout_bytes
    assert archive.parse(data).manifest["source"] == url
    r = cli("queue-show", "dump:-", "--queue", "0", "--json", input=data)
    assert r.code == 0, r.stderr
    assert [c["payload"]["requested"] for c in r.json()["result"]["chains"]] == [48]
