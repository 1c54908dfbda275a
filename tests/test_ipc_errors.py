"""Every IPC error of the protocol notes (§3) and malformed input, against real emulators."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.caps import Dataspace, Irq
from l4vctl.errors import ProtocolError, TimeoutExpired, UnavailableError, UsageError
from tests.emu import Cap, Session, call, emulator, register

ABIS = ["classic", "current"]
V = cat.L4VIRTIO_PROTOCOL
ICU = cat.L4_PROTO_IRQ


@pytest.fixture(params=ABIS)
def s(request):
    with Session(f"emu:blk?abi={request.param}", abi=request.param) as sess:
        yield sess


def err(name: str) -> int:
    return -getattr(cat, name)


# -- REGISTER_DS (§3.4) -----------------------------------------------------------------


def test_register_ds_without_capability(s):
    assert call(s, V, cat.OP_REGISTER_DS, [0x200000, 0, 4096])[0] == err("L4_EMSGTOOSHORT")


def test_register_ds_with_too_few_words(s):
    ds = Dataspace.create("x", 4096)
    try:
        r = call(s, V, cat.OP_REGISTER_DS, [0x200000], [Cap(cat.CAP_DATASPACE, 5, 0, 4096)], [ds.fd])
        assert r[0] == err("L4_EMSGTOOSHORT")
    finally:
        ds.close()


def test_register_ds_empty_item(s):
    assert call(s, V, cat.OP_REGISTER_DS, [0x200000, 0, 4096], [Cap(cat.CAP_NONE)])[0] == err("L4_EINVAL")


def test_register_ds_with_an_eventfd(s):
    irq = Irq.create()
    try:
        r = call(s, V, cat.OP_REGISTER_DS, [0x200000, 0, 4096], [Cap(cat.CAP_DATASPACE, 5, 0, 4096)], [irq.fd])
        assert r[0] == err("L4_EINVAL")
    finally:
        irq.close()


def test_register_ds_smaller_than_a_page(s):
    fd = os.memfd_create("tiny", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 100)
        r = call(s, V, cat.OP_REGISTER_DS, [0x200000, 0, 100], [Cap(cat.CAP_DATASPACE, 5, 0, 100)], [fd])
        assert r[0] == err("L4_EINVAL")
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "base,offset,size,code",
    [
        (0x200000, 0x10000, 4096, "L4_ERANGE"),  # offset beyond the dataspace
        (0x200000, 0, 0x20000, "L4_EINVAL"),  # larger than the dataspace
        (0x200000, 0x1000, 0x4000, "L4_EINVAL"),  # offset + size beyond the end
        ((1 << 64) - 0x1000, 0, 0x2000, "L4_EINVAL"),  # base + size overflows
        (0x200000, 0, 0, "L4_EINVAL"),  # nothing to register
        (0x200000, 0x1000, 0x3000, "L4_EOK"),
    ],
)
def test_register_ds_ranges(s, base, offset, size, code):
    ds = Dataspace.create("x", 0x4000)
    try:
        assert register(s, ds, base, offset, size) == (0 if code == "L4_EOK" else err(code))
    finally:
        ds.close()


def test_register_ds_table_full():
    with Session("emu:blk?max_regions=2") as s:
        dss = [Dataspace.create(f"r{i}", 4096) for i in range(3)]
        try:
            assert register(s, dss[0], 0x200000) == 0
            assert register(s, dss[1], 0x300000) == 0
            assert register(s, dss[2], 0x400000) == err("L4_ENOMEM")
        finally:
            for ds in dss:
                ds.close()


def test_register_ds_is_allowed_in_any_status(s):
    ds = Dataspace.create("x", 4096)
    try:
        assert s.status == 0 and register(s, ds, 0x200000) == 0
    finally:
        ds.close()


# -- DEVICE_CONFIG, GET_DEVICE_IRQ, ICU (§3.5-§3.8) ----------------------------------------


def test_device_config_returns_offset_and_dataspace():
    with Session("emu:blk?ds_offset=0x2000") as s:
        assert s.get("magic") == cat.L4VIRTIO_MAGIC  # the session mapped the page at the offset
        result, words, caps = call(s, V, cat.OP_DEVICE_CONFIG)
        assert result == 0 and words == [0x2000]
        assert caps[0].type == cat.CAP_DATASPACE and caps[0].size == 0x3000


def test_get_device_irq_only_index_0(s):
    assert call(s, V, cat.OP_GET_DEVICE_IRQ, [1])[0] == err("L4_ENOSYS")
    result, _w, caps = call(s, V, cat.OP_GET_DEVICE_IRQ, [0])
    assert result == 0 and caps[0].type == cat.CAP_IRQ
    assert call(s, V, cat.OP_GET_DEVICE_IRQ, [])[0] == err("L4_EMSGTOOSHORT")


def test_icu_bind_errors(s):
    irq = Irq.create()
    ds = Dataspace.create("x", 4096)
    try:
        assert call(s, ICU, cat.ICU_OP_BIND, [0])[0] == err("L4_EMSGTOOSHORT")
        assert call(s, ICU, cat.ICU_OP_BIND, [1], [Cap(cat.CAP_IRQ)], [irq.fd])[0] == err("L4_ERANGE")
        assert call(s, ICU, cat.ICU_OP_BIND, [0], [Cap(cat.CAP_NONE)])[0] == err("L4_EINVAL")
        assert call(s, ICU, cat.ICU_OP_BIND, [0], [Cap(cat.CAP_IRQ)], [ds.fd])[0] == err("L4_EINVAL")
        assert call(s, ICU, cat.ICU_OP_BIND, [0], [Cap(cat.CAP_IRQ)], [irq.fd])[0] == 0  # a rebind replaces
    finally:
        irq.close()
        ds.close()


def test_icu_info_and_unimplemented_ops(s):
    assert call(s, ICU, cat.ICU_OP_INFO) == (0, [0, 1, 0], [])
    for op in (cat.ICU_OP_UNBIND, cat.ICU_OP_MSI_INFO, cat.ICU_OP_MASK, cat.ICU_OP_SET_MODE, 99):
        assert call(s, ICU, op)[0] == err("L4_ENOSYS"), op


def test_icu_unmask_gets_no_reply(s):
    with pytest.raises(TimeoutExpired):
        call(s, ICU, cat.ICU_OP_UNMASK, timeout=0.2)
    # the connection still works: the stale reply never comes, the next call is answered
    assert call(s, ICU, cat.ICU_OP_INFO)[0] == 0


def test_unknown_opcode_and_label(s):
    assert call(s, V, 2 if s.abi == "current" else 17)[0] == err("L4_ENOSYS")
    assert call(s, V, 0x7FFF)[0] == err("L4_ENOSYS")
    assert call(s, 12345, 0)[0] == err("L4_EBADPROTO")
    assert call(s, V, cat.OP_SET_STATUS)[0] == err("L4_EMSGTOOSHORT")


# -- REGISTER_IFACE (§3.9) -------------------------------------------------------------------


def test_register_iface_classic():
    with Session("emu:blk?abi=classic", abi="classic", attach="iface") as s:  # attaches with REGISTER_IFACE
        assert s.attached_via == "iface"
        assert s.device_irq is not None and s.get("magic") == cat.L4VIRTIO_MAGIC
        s.handshake()
        assert s.status == 0x0F
        assert call(s, V, cat.OP_REGISTER_IFACE)[0] == err("L4_EMSGTOOSHORT")
        assert call(s, V, cat.OP_REGISTER_IFACE, [], [Cap(cat.CAP_NONE)])[0] == err("L4_EINVAL")


def test_register_iface_needs_page_at_offset_0():
    with Session("emu:blk?abi=classic&ds_offset=0x1000", abi="auto") as s:
        irq = Irq.create()
        try:
            assert call(s, V, cat.OP_REGISTER_IFACE, [], [Cap(cat.CAP_IRQ)], [irq.fd])[0] == err("L4_ENOSYS")
        finally:
            irq.close()


def test_register_iface_does_not_exist_in_current_era():
    with pytest.raises(ProtocolError, match="REGISTER_IFACE is not implemented"):
        with Session("emu:blk?abi=current", abi="classic", attach="iface"):
            pass


@pytest.mark.parametrize("attach,iface,config", [("iface", 0, err("L4_ENOSYS")), ("config", err("L4_ENOSYS"), 0),
                                                 ("both", 0, 0)])  # fmt: skip
def test_classic_device_answers_per_attach_mode(attach, iface, config):
    """iface: only REGISTER_IFACE; config: only DEVICE_CONFIG (+ GET_DEVICE_IRQ, ICU bind); both: either."""
    with Session(f"emu:blk?abi=classic&attach={attach}") as s:
        assert s.attached_via == ("iface" if attach == "iface" else "config")
        irq = Irq.create()
        try:
            assert call(s, V, cat.OP_REGISTER_IFACE, [], [Cap(cat.CAP_IRQ)], [irq.fd])[0] == iface
            assert call(s, V, cat.OP_DEVICE_CONFIG)[0] == config
            assert call(s, V, cat.OP_GET_DEVICE_IRQ, [0])[0] == config
            assert call(s, cat.L4_PROTO_IRQ, cat.ICU_OP_BIND, [0], [Cap(cat.CAP_IRQ)], [irq.fd])[0] == config
        finally:
            irq.close()


def test_forced_attach_against_the_wrong_generation():
    with pytest.raises(ProtocolError, match="DEVICE_CONFIG is not implemented.*--attach iface"):
        Session("emu:blk?abi=classic&attach=iface", attach="config").__enter__()
    with pytest.raises(ProtocolError, match="REGISTER_IFACE is not implemented.*--attach config"):
        Session("emu:blk?abi=classic&attach=config", attach="iface").__enter__()


def test_monitor_reads_the_page_of_an_iface_only_device():
    with Session("emu:blk?abi=classic&attach=iface", role="monitor") as s:
        assert s.attached_via == "config" and s.get("magic") == cat.L4VIRTIO_MAGIC


def test_attach_iface_needs_the_classic_era():
    with pytest.raises(UsageError, match="only in the classic era"):
        Session("emu:blk?attach=iface").__enter__()


# -- roles and malformed frames ------------------------------------------------------------------


def test_second_driver_is_busy_monitor_is_welcome(tmp_path):
    with emulator(tmp_path) as (url, _proc):
        with Session(url) as first:
            first.handshake()
            with pytest.raises(UnavailableError, match="busy"):
                Session(url).open()
            with Session(url, role="monitor") as mon:
                assert mon.stats()["driver_attached"] == 1
                assert mon.status == 0x0F
                assert call(mon, V, cat.OP_SET_STATUS, [0])[0] == err("L4_EPERM")
                assert call(mon, ICU, cat.ICU_OP_INFO)[0] == 0
            assert first.status == 0x0F


def test_monitor_page_is_read_only():
    with Session("emu:blk", role="monitor") as mon:
        with pytest.raises(TypeError):
            mon.page[0] = 0


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def hello(sock, role=cat.ROLE_DRIVER, lo=1, hi=1):
    sock.send(wire.encode(cat.KIND_HELLO, 1, 0, 0, [lo, hi, role, cat.PROFILE_FD]))
    return wire.decode(sock.recv(65536), any_version=True)


def test_malformed_frames_get_errors_and_the_emulator_keeps_serving(tmp_path):
    with emulator(tmp_path) as (url, proc):
        path = url[5:]
        sock = raw_connect(path)
        assert hello(sock).label == 0
        good = wire.encode(cat.KIND_REQUEST, 5, 0, cat.OP_SET_STATUS, [0])
        # length field disagrees with the packet
        bad = bytearray(good)
        struct.pack_into("<I", bad, 8, len(good) + 8)
        sock.send(bytes(bad))
        reply = wire.decode(sock.recv(65536))
        assert (reply.seq, reply.label) == (5, err("L4_EMSGTOOSHORT"))
        # a word count the frame cannot hold
        bad = bytearray(good)
        struct.pack_into("<H", bad, 24, 3)
        sock.send(bytes(bad))
        assert wire.decode(sock.recv(65536)).label == err("L4_EMSGTOOSHORT")
        # a truncated header: no seq to answer to, so the client is closed
        sock.send(good[:20])
        assert sock.recv(65536) == b""
        sock.close()
        # a REPLY frame from a client
        sock2 = raw_connect(path)
        assert hello(sock2).label == 0
        sock2.send(wire.encode(cat.KIND_REPLY, 9, 0, 0))
        assert wire.decode(sock2.recv(65536)).label == err("L4_EBADPROTO")
        # an oversize frame
        sock2.send(good + bytes(70000))
        r = wire.decode(sock2.recv(65536))
        assert r.label == err("L4_EMSGTOOLONG")
        # garbage magic: the connection is closed, the emulator lives on
        sock2.send(b"XXXX" + good[4:])
        assert sock2.recv(65536) == b""
        sock2.close()
        with Session(url) as s:
            s.handshake()
            assert s.status == 0x0F
        assert proc.poll() is None


def test_too_many_descriptors_are_refused_and_closed(tmp_path):
    with emulator(tmp_path) as (url, _proc):
        sock = raw_connect(url[5:])
        assert hello(sock).label == 0
        fds = [os.eventfd(0) for _ in range(12)]
        try:
            wire.send(sock, wire.encode(cat.KIND_REQUEST, 3, 0, 0, [0]), fds)
            r = wire.decode(sock.recv(65536))
            assert (r.seq, r.label) == (3, err("L4_EMSGTOOLONG"))
        finally:
            for fd in fds:
                os.close(fd)
        sock.close()


def test_hello_rules(tmp_path):
    with emulator(tmp_path) as (url, _proc):
        sock = raw_connect(url[5:])
        w = hello(sock, lo=2, hi=3)
        assert w.kind == cat.KIND_WELCOME and w.label == err("L4_EBADPROTO") and w.words[0] == 1
        assert sock.recv(100) == b""
        sock.close()
        sock = raw_connect(url[5:])
        sock.send(wire.encode(cat.KIND_REQUEST, 1, 0, cat.OP_DEVICE_CONFIG))  # no HELLO first
        assert sock.recv(100) == b""
        sock.close()
        sock = raw_connect(url[5:])
        assert hello(sock, role=7).label == err("L4_EBADPROTO")
        sock.close()


def test_client_with_wrong_version_gets_a_clear_error(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    path = str(tmp_path / "fake.sock")
    server.bind(path)
    server.listen(1)
    import threading

    def fake():
        conn, _ = server.accept()
        conn.recv(100)
        data = bytearray(wire.encode(cat.KIND_WELCOME, 1, -cat.L4_EBADPROTO, 0, [2]))
        struct.pack_into("<H", data, 4, 2)
        conn.send(bytes(data))
        conn.close()

    t = threading.Thread(target=fake)
    t.start()
    with pytest.raises(ProtocolError, match="speaks wire protocol 2, l4vctl speaks 1"):
        Session(f"unix:{path}").open()
    t.join(5)
    server.close()
