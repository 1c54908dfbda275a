"""Hostile pages through the library: only l4vctl.errors exceptions may escape.

Saved pages (raw and hex dumps) that are short, not a multiple of 4 bytes
long, mutated or plain garbage go through the dump: backend, every
page-reading call of a Session and the l4vctl.page functions.  Each call
either answers or raises an :class:`l4vctl.errors.L4vError`; nothing else.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4vctl import catalog as cat
from l4vctl import hexdump
from l4vctl import page as pg
from l4vctl.backends.dump import load_source
from l4vctl.errors import FormatError, L4vError, UsageError
from l4vctl.session import Session
from tests.pages import CLASS_PAGES, device_page

KINDS = ("blk", "net", "console", "rng")
ABIS = ("classic", "current")
_counter = itertools.count()

#: Every page-reading call of a Session over a saved page.
SESSION_CALLS = (
    ("offered", lambda s: s.offered()),
    ("device_config", lambda s: s.device_config()),
    ("header", lambda s: s.header()),
    ("status", lambda s: s.status),
    ("dev_features_map", lambda s: s.words("dev_features_map")),
    ("driver_features_map", lambda s: s.words("driver_features_map")),
    ("fields", lambda s: [s.get(name) for name in s.hc.fields]),
    ("decode", lambda s: s.decode().result),
    ("stats", lambda s: s.stats()),
    ("handshake", lambda s: s.handshake()),
)


@pytest.fixture(scope="module")
def pagedir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile-pages")


@st.composite
def hostile_pages(draw):
    """Bytes that claim to be a config page: real pages cut, padded, mutated, or garbage."""
    how = draw(st.sampled_from(["truncate", "pad", "mutate", "garbage", "device"]))
    if how == "garbage":
        return draw(st.binary(min_size=0, max_size=5000))
    kind = draw(st.sampled_from(KINDS))
    base = bytearray(device_page(draw(st.sampled_from(ABIS)), kind, **CLASS_PAGES[kind]))
    if how == "truncate":
        return bytes(base[: draw(st.integers(0, len(base)))])
    if how == "pad":
        return bytes(base + draw(st.binary(min_size=1, max_size=7)))
    if how == "device":  # a device id whose config does not fit a short page
        base[8:12] = draw(st.sampled_from([1, 2, 3, 4, 18, 0xFFFFFFFF])).to_bytes(4, "little")
        return bytes(base[: draw(st.integers(0x100, 0x1A0))])
    for off, value in draw(st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=40)):
        base[off] = value
    return bytes(base[: draw(st.integers(0, len(base)))])


def _only_library_errors(call, *args):
    try:
        return call(*args)
    except L4vError:
        return None


def _through_session(path, abi: str, check: bool) -> None:
    try:
        s = Session(f"dump:{path}", abi=abi, check=check, role="monitor")
        s.open()
    except L4vError:
        return
    try:
        for _name, call in SESSION_CALLS:
            _only_library_errors(call, s)
    finally:
        s.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=hostile_pages(), as_hex=st.booleans(), abi=st.sampled_from(["auto", *ABIS]), check=st.booleans())
def test_saved_pages_through_the_session(pagedir, data, as_hex, abi, check):
    path = pagedir / f"page-{next(_counter)}.{'hex' if as_hex else 'bin'}"
    path.write_bytes(hexdump.format_hexdump(data).encode() if as_hex else data)
    _only_library_errors(load_source, str(path), "auto")
    _through_session(path, abi, check)


@settings(max_examples=300, deadline=None)
@given(data=hostile_pages(), abi=st.sampled_from(["auto", *ABIS]), hint=st.sampled_from([None, "classic", "bogus"]),
       stride=st.sampled_from([cat.QUEUE_ENTRY_STRIDE, cat.QUEUE_ENTRY_STRIDE_I386]))  # fmt: skip
def test_page_functions(data, abi, hint, stride):
    _only_library_errors(pg.check_size, data)
    pg.detect_abi(data)
    choice = pg.choose_abi(data, abi, {"abi": hint} if hint else {})
    _only_library_errors(lambda: pg.decode_page(data, choice, stride=stride))
    _only_library_errors(hexdump.parse_hexdump, data.decode("latin-1"))


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="0123456789abcdefABCDEF xX:|*#\n\t.-+g", max_size=3000))
def test_hex_dump_text(text):
    _only_library_errors(hexdump.parse_hexdump, text)


# -- the cases found by fuzzing, each on its own ------------------------------------------------------------------


@pytest.mark.parametrize("extra", [1, 2, 3])
def test_page_length_not_a_multiple_of_4(tmp_path, extra):
    """Session.offered() raised TypeError on such a page; now it reads the header as usual."""
    data = device_page("current", "blk", **CLASS_PAGES["blk"])[: 0x200 + extra]
    path = tmp_path / "odd.bin"
    path.write_bytes(data)
    with Session(f"dump:{path}") as s:
        assert cat.VERSION_1_BIT in s.offered() and s.words("dev_features_map")[1] & 1
        assert s.device_config()["capacity"] == 131072


def test_short_page_device_config_gives_the_fields_that_fit(tmp_path):
    """Session.device_config() raised struct.error on a page cut inside the device config."""
    path = tmp_path / "short.bin"
    path.write_bytes(device_page("current", "blk")[:0x110])
    with Session(f"dump:{path}") as s:
        assert s.get("device") == 2
        cfg = s.device_config()
        assert set(cfg) == {"capacity", "size_max", "seg_max"}


def test_decode_page_of_a_short_buffer_is_a_format_error():
    with pytest.raises(FormatError, match="too short"):
        pg.decode_page(b"virt", pg.AbiChoice("current", "explicit", ""))
    with pytest.raises(UsageError, match="unknown ABI"):
        pg.choose_abi(bytes(256), "modern")


def test_bad_arguments_and_calls_after_close(tmp_path):
    for kw in ({"abi": "modern"}, {"mode": "fast"}, {"attach": "both"}, {"role": "spy"}):
        with pytest.raises(UsageError):
            Session("emu:blk", **kw)
    path = tmp_path / "p.bin"
    path.write_bytes(device_page("classic", "net"))
    s = Session(f"dump:{path}")
    s.open()
    with pytest.raises(UsageError, match="no header field 'warp'"):
        s.get("warp")
    s.close()
    for _name, call in SESSION_CALLS[:7]:
        with pytest.raises(UsageError, match="not open"):
            call(s)
