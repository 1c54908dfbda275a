"""Hex dump writer and reader."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4vctl.errors import FormatError
from l4vctl.hexdump import format_hexdump, looks_like_text, parse_hexdump


@given(st.binary(min_size=1, max_size=5000), st.lists(st.text("abc: ", max_size=20), max_size=3))
def test_round_trip(data, comments):
    text = format_hexdump(data, comments)
    assert looks_like_text(text.encode())
    back, _hints = parse_hexdump(text)
    assert back == data


@given(st.binary(min_size=1, max_size=300).map(lambda b: b * 20))
def test_round_trip_of_repetitive_data(data):
    back, _ = parse_hexdump(format_hexdump(data))
    assert back == data


def test_writer_is_hexdump_c_format():
    data = b"virt" + bytes(60)
    assert format_hexdump(data).splitlines() == [
        "00000000  76 69 72 74 00 00 00 00  00 00 00 00 00 00 00 00  |virt............|",
        "00000010  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|",
        "*",
        "00000040",
    ]


def test_abi_hint():
    _data, hints = parse_hexdump("# abi: classic\n00000000  01 02\n")
    assert hints == {"abi": "classic"}


def test_xxd_and_plain_forms():
    xxd = "00000000: 7669 7274 0200 0000  virt....\n00000008: 0100                 ..\n"
    assert parse_hexdump(xxd)[0] == b"virt\x02\x00\x00\x00\x01\x00"
    plain = "0: 76 69\n2: 72 74\n"
    assert parse_hexdump(plain)[0] == b"virt"


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("", "no hex dump data"),
        ("# only a comment\n", "no hex dump data"),
        ("00000010  01\n", "must start at offset 0"),
        ("00000000  01 02\n00000005  03\n", "offset 0x5, expected 0x2"),
        ("*\n", "without a line to repeat"),
        ("00000000  01 02\n*\n00000003\n", "does not continue the repeated lines"),
        ("00000000  01 0\n", "not hex bytes"),
        ("00000000  zz\n", "not hex bytes"),
        ("wat 01 02\n", "expected an offset"),
        ("00000000  " + "00 " * 65 + "\n", "65 bytes on one line"),
        ("00000000  01\n00000001\n00000001  02\n", "data after the end-of-dump line"),
        ("fffffffffff  01\n", "beyond"),
    ],
)
def test_bad_dumps_name_the_problem(text, fragment):
    with pytest.raises(FormatError, match=fragment):
        parse_hexdump(text)


def test_binary_is_not_text():
    assert not looks_like_text(b"virt\x02\x00")
    assert not looks_like_text(b"\x00\x01abc")
    assert not looks_like_text(b"")
    assert looks_like_text(b"00000000  01\n")
