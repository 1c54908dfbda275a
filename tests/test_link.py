"""The remote profile's link layer: whole frames out of a noisy byte stream."""

from __future__ import annotations

import os
import time
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.errors import UsageError
from l4vctl.formats.fast import codec
from l4vctl.formats.link import link_header
from l4vctl.link import HEADER_SIZE, Decoder, encode


def chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = max(1, sizes[i % len(sizes)]) if sizes else len(data)
        out.append(data[pos : pos + n])
        pos += n
        i += 1
    return out


def test_header_layout_matches_the_schema_and_the_docs():
    raw = encode(b"hello")
    parsed = link_header.parse(raw[:HEADER_SIZE])
    assert HEADER_SIZE == 14 == link_header.sizeof()
    assert raw[:2] == b"\xa5\x5a" and parsed.sync == cat.LINK_SYNC
    assert parsed.type == cat.LINK_T_WIRE and parsed.version == cat.LINK_VERSION and parsed.length == 5
    assert parsed.payload_crc == zlib.crc32(b"hello")
    assert parsed.header_check == zlib.crc32(raw[:12]) & 0xFFFF
    assert codec("link_header").unpack(raw)["length"] == 5


def test_a_wire_frame_round_trips():
    frame = wire.encode(cat.KIND_REQUEST, 7, cat.L4VIRTIO_PROTOCOL, cat.OP_DEVICE_CONFIG, [1, 2, 3])
    (got,) = Decoder().feed(encode(frame))
    assert got.type == cat.LINK_T_WIRE and wire.decode(got.payload).words == [1, 2, 3]


payloads = st.lists(st.binary(max_size=300), max_size=8)
garbage = st.binary(max_size=200)


@given(payloads, st.lists(garbage, min_size=9, max_size=9), st.lists(st.integers(1, 97), max_size=5))
def test_frames_survive_garbage_between_them_in_any_chunking(items, junk, sizes):
    stream = junk[0] + b"".join(encode(p) + junk[i + 1] for i, p in enumerate(items))
    d = Decoder()
    got = [f.payload for piece in chunks(stream, sizes) for f in d.feed(piece)]
    assert got == items
    assert d.pending <= HEADER_SIZE + max((len(p) for p in items), default=0) + 1


@given(st.lists(st.binary(min_size=1, max_size=200), min_size=3, max_size=6), st.data())
def test_a_damaged_frame_is_dropped_and_the_rest_arrive(items, data):
    victim = data.draw(st.integers(0, len(items) - 1))
    frames = [bytearray(encode(p)) for p in items]
    pos = data.draw(st.integers(0, len(frames[victim]) - 1))
    frames[victim][pos] ^= data.draw(st.integers(1, 255))
    d = Decoder()
    got = [f.payload for f in d.feed(b"".join(bytes(f) for f in frames))]
    assert got == items[:victim] + items[victim + 1 :]
    assert d.garbage >= 1  # the damaged frame was thrown away as such


def test_boot_log_before_the_first_frame_is_skipped():
    log = b"L4 Bootstrapper\r\n  Build: #1\r\nMOE: Hello world\r\n" * 20 + b"\xa5 \xa5\x5a stray marker\r\n"
    d = Decoder()
    got = d.feed(log + encode(b"hello, host"))
    assert [f.payload for f in got] == [b"hello, host"]
    assert d.garbage >= len(log) - 1 and d.bad_headers >= 1


def test_a_header_claiming_too_much_is_not_trusted():
    d = Decoder(max_payload=64)
    big = encode(b"x" * 65)
    got = d.feed(big + encode(b"small"))
    assert [f.payload for f in got] == [b"small"] and d.bad_headers == 1
    assert d.pending == 0


def test_a_stalled_frame_is_held_and_completed_later():
    frame = encode(b"slow line" * 10)
    d = Decoder()
    assert d.feed(frame[:5]) == [] and d.feed(frame[5:40]) == []
    assert [f.payload for f in d.feed(frame[40:])] == [b"slow line" * 10]
    assert d.pending == 0


def test_other_link_versions_are_skipped_not_delivered():
    raw = bytearray(encode(b"future"))
    raw[3] = cat.LINK_VERSION + 1
    raw[12:14] = (zlib.crc32(raw[:12]) & 0xFFFF).to_bytes(2, "little")
    d = Decoder()
    assert [f.payload for f in d.feed(bytes(raw) + encode(b"now"))] == [b"now"]
    assert d.unknown_version == 1


def test_a_flood_of_garbage_is_linear_and_bounded():
    noise = os.urandom(4 << 20) + b"\xa5\x5a" * 200_000  # random bytes, then half-markers galore
    d = Decoder()
    t0 = time.perf_counter()
    for i in range(0, len(noise), 65536):
        assert d.feed(noise[i : i + 65536]) == []
        assert d.pending <= HEADER_SIZE + cat.LINK_MAX_PAYLOAD
    assert [f.payload for f in d.feed(encode(b"still here"))][-1:] == [b"still here"]
    assert time.perf_counter() - t0 < 20


def test_limits_are_usage_errors():
    with pytest.raises(UsageError):
        encode(b"x" * (cat.LINK_MAX_PAYLOAD + 1))
    with pytest.raises(UsageError):
        Decoder(max_payload=cat.LINK_MAX_PAYLOAD + 1)


def test_a_frame_that_ends_in_the_first_sync_byte_is_not_counted_as_garbage():
    from l4vctl.link import Decoder, encode

    d = Decoder()
    frames = d.feed(encode(b"xyz\xa5"))
    assert [f.payload for f in frames] == [b"xyz\xa5"]
    assert (d.garbage, d.pending) == (0, 0)
