"""The remote profile without L4Re: message registers, frames, zero runs, the link's reader, URLs.

The host side of the bridge is tested here against a scripted peer on a
socket pair (it decodes what the host sends and answers as the script
says); the agent itself is tested against real L4Re in test_l4re.py.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4vctl import catalog as cat
from l4vctl import l4msg
from l4vctl.backends import open_backend
from l4vctl.backends.l4re import CHUNK, RemoteMemory
from l4vctl.backends.l4re.agent import AgentLink
from l4vctl.backends.l4re.stream import Stream, open_stream
from l4vctl.errors import TimeoutExpired, UnavailableError, UsageError
from l4vctl.link import Decoder, decode_frame, encode, encode_frame, zero_runs_decode, zero_runs_encode
from l4vctl.wire import Cap, WireError

# -- message registers (protocol notes §3.1) ----------------------------------------------------------


def test_u32_arguments_share_the_first_word_with_the_opcode():
    assert l4msg.pack(cat.L4VIRTIO_PROTOCOL, cat.OP_SET_STATUS, [0x0B]) == [0x0B << 32]
    assert l4msg.pack(cat.L4VIRTIO_PROTOCOL, cat.OP_CONFIG_QUEUE, [1]) == [1 | 1 << 32]
    assert l4msg.pack(cat.L4VIRTIO_PROTOCOL, cat.OP_GET_DEVICE_IRQ, [0]) == [5]


def test_register_ds_puts_base_offset_and_size_in_words_1_to_3():
    assert l4msg.pack(cat.L4VIRTIO_PROTOCOL, cat.OP_REGISTER_DS, [0x200000, 0, 0x3000]) == [3, 0x200000, 0, 0x3000]
    assert l4msg.pack(cat.L4VIRTIO_PROTOCOL, cat.OP_DEVICE_CONFIG, []) == [4]


def test_icu_opcodes_are_whole_words():
    assert l4msg.pack(cat.L4_PROTO_IRQ, cat.ICU_OP_BIND, [0]) == [0, 0]
    assert l4msg.pack(cat.L4_PROTO_IRQ, cat.ICU_OP_INFO, []) == [2]


def test_receive_slots_follow_the_operation():
    kinds = l4msg.receive_kinds(cat.L4VIRTIO_PROTOCOL, cat.OP_REGISTER_IFACE)
    assert kinds == (cat.CAP_IRQ, cat.CAP_DATASPACE)
    assert l4msg.receive_flags(kinds) == (cat.CAP_IRQ | cat.CAP_DATASPACE << 2) << 16
    assert l4msg.receive_kinds(cat.L4VIRTIO_PROTOCOL, cat.OP_SET_STATUS) == ()


# -- frames and zero runs --------------------------------------------------------------------------------


def test_a_frame_carries_flags_and_data():
    raw = encode_frame(cat.KIND_WRITE, 7, 0, 0, [1, 2], [Cap(cat.CAP_DATASPACE, 5, 9, 4096)], 0x1234, b"abc")
    f = decode_frame(raw)
    assert (f.kind, f.seq, f.words, f.flags, f.data) == (cat.KIND_WRITE, 7, [1, 2], 0x1234, b"abc")
    assert (f.caps[0].handle, f.caps[0].size) == (9, 4096)


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[:20], lambda b: b"XXXX" + b[4:], lambda b: b[:8] + (999).to_bytes(4, "little") + b[12:]],
    ids=["short", "magic", "length"],
)
def test_malformed_frames_are_refused(damage):
    raw = encode_frame(cat.KIND_READ, 1, 0, 0, [3, 0, 16])
    with pytest.raises(WireError):
        decode_frame(damage(raw))


@given(st.lists(st.one_of(st.just(b"\0" * 9), st.binary(max_size=40), st.just(b"\0")), max_size=30))
def test_zero_runs_round_trip(parts):
    data = b"".join(parts)
    assert zero_runs_decode(zero_runs_encode(data), len(data)) == data


def test_zero_runs_shrink_a_fresh_page_and_refuse_bad_records():
    page = bytearray(4096)
    page[:4] = b"virt"
    packed = zero_runs_encode(page)
    assert len(packed) < 16
    with pytest.raises(ValueError):
        zero_runs_decode(packed, 4095)
    with pytest.raises(ValueError):
        zero_runs_decode(b"\x01\x00\xff\x00ab", 300)


# -- the link's reader against a scripted agent ----------------------------------------------------------


class ScriptedAgent:
    """Answers the host's frames over one end of a socket pair, as ``reply`` decides."""

    def __init__(self, reply):
        self.host_end, self.end = socket.socketpair()
        self.reply = reply
        self.seen: list = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def send(self, kind, seq=0, label=0, words=(), caps=(), flags=0, data=b"", noise=b""):
        self.end.sendall(noise + encode(encode_frame(kind, seq, label, 0, words, caps, flags, data)))

    def run(self):
        dec = Decoder()
        try:
            while True:
                chunk = self.end.recv(65536)
                if not chunk:
                    return
                for lf in dec.feed(chunk):
                    f = decode_frame(lf.payload)
                    self.seen.append(f)
                    self.reply(self, f)
        except OSError:
            return

    def link(self, timeout=2.0) -> AgentLink:
        return AgentLink(Stream(os.dup(self.host_end.fileno()), "test-line"), timeout)

    def close(self):
        self.end.close()
        self.host_end.close()
        self.thread.join(2)


def welcome_and_echo(agent, f):
    if f.kind == cat.KIND_HELLO:
        agent.send(cat.KIND_WELCOME, f.seq, 0, [1, f.words[2], 16384, 1, 96, f.words[4]], noise=b"boot log\r\n")
    elif f.kind == cat.KIND_READ:  # memory whose byte i is i & 0xff, zero-run encoded as the agent may
        data = b"".join(bytes((i & 0xFF) for i in range(off, off + n)) for off, n in zip(f.words[1::2], f.words[2::2]))
        agent.send(cat.KIND_REPLY, f.seq, 0, [1], data=zero_runs_encode(data))
    elif f.kind == cat.KIND_REQUEST and f.opcode == cat.AGENT_OP_IRQ_CREATE:
        agent.send(cat.KIND_REPLY, f.seq, 0, caps=[Cap(cat.CAP_IRQ, 1, 42)])
        agent.send(cat.KIND_EVENT, 0, 0, [1], flags=42)  # fires at once
    elif f.kind == cat.KIND_REQUEST:
        agent.send(cat.KIND_REPLY, f.seq + 1000, 0)  # a stale reply nobody waits for
        agent.send(cat.KIND_REPLY, f.seq, 0, list(f.words))


def test_hello_through_boot_log_then_requests_match_their_replies():
    agent = ScriptedAgent(welcome_and_echo)
    link = agent.link()
    try:
        w = link.hello(cat.ROLE_DRIVER, 1234)
        assert (w.max_payload, w.ndevices, w.ipc_timeout_ms) == (16384, 1, 1234)
        r = link.call(1, 0, 0, [5, 6, 7], [], 0)
        assert r.words == [5, 6, 7]
        assert link.decoder.garbage == len(b"boot log\r\n")
    finally:
        link.close()
        agent.close()


def test_remote_memory_reads_in_chunks_and_joins_them():
    agent = ScriptedAgent(welcome_and_echo)
    link = agent.link()
    try:
        link.hello(cat.ROLE_DRIVER, 1000)
        mem = RemoteMemory(link, 3, 0x100, 3 * CHUNK)
        a, b = mem.read([(0, 10), (5, 2 * CHUNK + 7)])
        assert a == bytes((i & 0xFF) for i in range(0x100, 0x10A))
        assert b == bytes((i & 0xFF) for i in range(0x105, 0x105 + 2 * CHUNK + 7))
        reads = [f for f in agent.seen if f.kind == cat.KIND_READ]
        assert len(reads) == mem.reads == 4  # at most CHUNK bytes per frame, in order
        assert all(sum(f.words[2::2]) <= CHUNK for f in reads)
        with pytest.raises(ValueError):
            mem.read([(3 * CHUNK - 1, 2)])
    finally:
        link.close()
        agent.close()


def test_an_event_triggers_the_local_irq():
    agent = ScriptedAgent(welcome_and_echo)
    link = agent.link()
    try:
        link.hello(cat.ROLE_DRIVER, 1000)
        from l4vctl.caps import Irq

        irq = Irq.create()
        link.irqs[42] = irq
        link.agent(cat.AGENT_OP_IRQ_CREATE)
        assert irq.wait(2.0)
        irq.close()
    finally:
        link.close()
        agent.close()


def test_a_silent_agent_times_out_and_a_closed_line_is_unavailable():
    agent = ScriptedAgent(lambda a, f: None)
    link = agent.link(timeout=0.3)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutExpired, match="no l4vagent answered"):
            link.hello(cat.ROLE_DRIVER, 1000)
        assert time.monotonic() - start < 2
        waiter = threading.Timer(0.2, agent.end.shutdown, (socket.SHUT_RDWR,))
        waiter.start()
        link.timeout = 5.0
        start = time.monotonic()
        with pytest.raises(UnavailableError, match="link was closed"):
            link.request(cat.KIND_REQUEST, 0, 0)
        assert time.monotonic() - start < 2  # not the 5 s timeout: the reader saw the end
    finally:
        link.close()
        agent.close()


# -- URLs and streams ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, message",
    [
        ("l4re:", "name the link"),
        ("l4re:unix:/x?bogus=1", "unknown option 'bogus'"),
        ("l4re:unix:/x?baud=fast", "whole numbers"),
    ],
)
def test_bad_l4re_urls_are_usage_errors(url, message):
    with pytest.raises(UsageError, match=message):
        open_backend(url)


def test_an_ipc_timeout_must_leave_room_for_the_answer(cli):
    r = cli("probe", "l4re:unix:/nonexistent.sock?dev=a&ipc-timeout=3000", "--timeout", "5")
    assert r.code == 2 and "below half of --timeout" in r.stderr


def test_links_of_unknown_kind_and_non_serial_devices_are_refused(tmp_path):
    with pytest.raises(UsageError, match="not one of"):
        open_stream("pipe:/x", 1.0)
    f = tmp_path / "plain"
    f.write_bytes(b"")
    with pytest.raises(UsageError, match="not a serial device"):
        open_stream(f"serial:{f}", 1.0)
    with pytest.raises(UsageError, match="baud"):
        open_stream(f"serial:{f}", 1.0, baud=1234)


def test_a_serial_line_carries_frames(tmp_path):
    import pty

    master, slave = pty.openpty()
    try:
        stream = open_stream(f"serial:{os.ttyname(slave)}", 1.0)
        try:
            stream.send(b"\xa5\x5a\x00\xff" * 64, 1.0)
            got = b""
            deadline = time.monotonic() + 2
            while len(got) < 256 and time.monotonic() < deadline:
                try:
                    got += os.read(master, 4096)
                except BlockingIOError:
                    time.sleep(0.01)
            assert got == b"\xa5\x5a\x00\xff" * 64  # raw: 8-bit clean, no newline translation
        finally:
            stream.close()
    finally:
        os.close(master)
        os.close(slave)


def test_backends_lists_the_l4re_scheme(cli):
    rows = {r["scheme"]: r for r in cli("backends", "--json").json()["result"]["backends"]}
    assert rows["l4re"]["available"] is True and rows["l4re"]["usage"] == "l4re:LINK?dev=NAME"


def test_an_event_for_a_closed_irq_does_not_end_the_link():
    from l4vctl.backends.l4re import RemoteIrq

    agent = ScriptedAgent(welcome_and_echo)
    link = agent.link()
    try:
        link.hello(cat.ROLE_DRIVER, 1000)
        irq = RemoteIrq(link, 42)
        irq.close()
        agent.send(cat.KIND_EVENT, 0, 0, [1], flags=42)
        assert link.call(1, 0, 0, [9], [], 0).words == [9]
        assert link.dead is None and link.events == 1
    finally:
        link.close()
        agent.close()
