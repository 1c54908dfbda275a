"""Wire frames: the derived codec against the Construct schema, and every decode error."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.formats import wire as schema

words = st.lists(st.integers(0, (1 << 64) - 1), max_size=12)
caps = st.lists(
    st.builds(wire.Cap, st.integers(0, 2), st.integers(0, 255), st.integers(0, 7), st.integers(0, (1 << 64) - 1)),
    max_size=cat.MAX_CAPS,
)


@given(kind=st.integers(1, 4), seq=st.integers(0, (1 << 32) - 1), label=st.integers(-(1 << 31), (1 << 31) - 1),
       opcode=st.integers(-(1 << 31), (1 << 31) - 1), ws=words, cs=caps)  # fmt: skip
def test_encode_matches_schema_and_round_trips(kind, seq, label, opcode, ws, cs):
    data = wire.encode(kind, seq, label, opcode, ws, cs)
    hdr = schema.frame_header.parse(data)
    assert (hdr.magic, hdr.version, hdr.kind, hdr.length) == (b"L4VW", 1, kind, len(data))
    assert (hdr.seq, hdr.label, hdr.opcode, hdr.nwords, hdr.ncaps, hdr.flags) == (
        seq,
        label,
        opcode,
        len(ws),
        len(cs),
        0,
    )
    pos = schema.frame_header.sizeof()
    for w in ws:
        assert schema.wire_word.parse(data[pos : pos + 8]) == w
        pos += 8
    for c in cs:
        item = schema.cap_item.parse(data[pos : pos + 16])
        assert (item.type, item.rights, item.handle, item.size) == (c.type, c.rights, c.handle, c.size)
        pos += 16
    f = wire.decode(data)
    assert (f.kind, f.seq, f.label, f.opcode, f.words) == (kind, seq, label, opcode, ws)
    assert [(c.type, c.rights, c.handle, c.size) for c in f.caps] == [(c.type, c.rights, c.handle, c.size) for c in cs]


@given(st.binary(max_size=200))
def test_decode_never_crashes(data):
    try:
        wire.decode(data)
    except wire.WireError:
        pass


def test_signed_words():
    f = wire.decode(wire.encode(cat.KIND_REPLY, 1, -22, 0, [-1, 5]))
    assert f.label == -22 and [wire.signed(w) for w in f.words] == [-1, 5]


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda b: b[:10], "shorter than the 32-byte header"),
        (lambda b: b"L4VX" + b[4:], "bad frame magic"),
        (lambda b: b[:4] + struct.pack("<H", 9) + b[6:], "version 9"),
        (lambda b: b[:8] + struct.pack("<I", 99) + b[12:], "frame says 99 bytes"),
        (lambda b: b[:24] + struct.pack("<H", 2) + b[26:], "need 48 bytes"),
        (lambda b: b[:26] + struct.pack("<H", 9) + b[28:], "at most"),
    ],
)
def test_decode_errors(mutate, fragment):
    good = wire.encode(cat.KIND_REQUEST, 1, 0, 0, [7])
    with pytest.raises(wire.WireError, match=fragment):
        wire.decode(mutate(good))


def test_any_version_for_hello():
    data = bytearray(wire.encode(cat.KIND_HELLO, 1, 0, 0, [2, 2, 1, 1]))
    struct.pack_into("<H", data, 4, 2)
    assert wire.decode(bytes(data), any_version=True).words == [2, 2, 1, 1]


def test_limits_on_encode():
    with pytest.raises(ValueError):
        wire.encode(cat.KIND_REQUEST, 1, 0, 0, [0] * (cat.MAX_WORDS + 1))


def test_documented_example_bytes():
    """The SET_STATUS example of docs/wire-protocol.md."""
    data = wire.encode(cat.KIND_REQUEST, 7, 0, cat.OP_SET_STATUS, [0x0B])
    assert data.hex(" ") == (
        "4c 34 56 57 01 00 03 00 28 00 00 00 07 00 00 00 "
        "00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 "
        "0b 00 00 00 00 00 00 00"
    )
