"""One home for each constant and parser: the catalog's names agree with its tables and the schemas."""

from __future__ import annotations

import json

import pytest

from l4vctl import caps
from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl.drivers import IMPLEMENTED_FEATURES
from l4vctl.errors import UsageError
from l4vctl.parsing import mac_text, parse_bool, parse_int, parse_mac, parse_size


def test_feature_constants_name_the_table_bits() -> None:
    prefixes = {"blk": "BLK_F_", "net": "NET_F_", "console": "CONSOLE_F_", "vsock": "VSOCK_F_"}
    for cls, prefix in prefixes.items():
        for bit, f in cat.DEVICE_FEATURES[cls].items():
            assert getattr(cat, f.name.removeprefix("VIRTIO_")) == bit, f.name
        named = {n for n in dir(cat) if n.startswith(prefix)}
        assert len(named) == len(cat.DEVICE_FEATURES[cls]), cls


def test_implemented_features_are_named_bits_of_their_class() -> None:
    for device_id, bits in IMPLEMENTED_FEATURES.items():
        assert bits <= set(cat.DEVICE_FEATURES[cat.device_class(device_id)]), device_id


@pytest.mark.parametrize("abi", cat.ABIS)
def test_feature_map_words_match_the_header(abi: str) -> None:
    fields = pg.header_codec(abi).fields
    assert fields["dev_features_map"][3] == cat.FEATURE_MAP_WORDS[abi]
    assert fields["driver_features_map"][3] == cat.FEATURE_MAP_WORDS[abi]


def test_capability_rights_have_one_home() -> None:
    assert (caps.RIGHT_W, caps.RIGHT_S, caps.RIGHT_R) == (cat.CAP_RIGHT_W, cat.CAP_RIGHT_S, cat.CAP_RIGHT_R)
    assert caps.RIGHTS_RO == cat.CAP_RIGHTS_RO == cat.CAP_RIGHT_R
    assert caps.RIGHTS_RW == cat.CAP_RIGHTS_RW == cat.CAP_RIGHT_R | cat.CAP_RIGHT_W


def test_feature_bit_resolution() -> None:
    names = cat.feature_names("current", cat.DEVICE_ID_BLK)
    assert cat.feature_bit("flush", names) == cat.BLK_F_FLUSH
    assert cat.feature_bit(" VIRTIO_BLK_F_RO ", names) == cat.BLK_F_RO
    assert cat.feature_bit("0x1c", names) == cat.INDIRECT_DESC_BIT
    assert cat.feature_bit(32, names) == cat.VERSION_1_BIT
    assert cat.feature_bit("0xzz", names) is None
    assert cat.feature_bit("warp", names) is None
    assert cat.resolve_features(["", "mac"], "classic", cat.DEVICE_ID_NET) == {cat.NET_F_MAC}
    with pytest.raises(UsageError, match="unknown feature '256'"):
        cat.resolve_features(["256"], "classic", cat.DEVICE_ID_NET)


def test_has_bit() -> None:
    words = pg.feature_words("current", {cat.VERSION_1_BIT, cat.BLK_F_FLUSH})
    assert cat.has_bit(words, cat.VERSION_1_BIT)
    assert cat.has_bit(words, cat.BLK_F_FLUSH)
    assert not cat.has_bit(words, cat.BLK_F_RO)
    assert not cat.has_bit(words, 32 * len(words))


def test_string_enums_are_their_strings() -> None:
    assert cat.Abi.CLASSIC == "classic" and cat.Role.MONITOR == "monitor" and cat.Mode.CMD == "cmd"
    assert cat.ABIS == ("classic", "current") and cat.MODES == ("auto", "ipc", "cmd")
    assert all(type(a) is str for a in (*cat.ABIS, *cat.MODES, cat.DEFAULT_ABI))
    assert f"{cat.Abi.CURRENT}" == "current"
    assert json.dumps({"role": cat.Role.DRIVER}) == '{"role": "driver"}'


def test_parsers() -> None:
    assert parse_size("64M") == 64 << 20 and parse_size("4KiB") == 4096 and parse_size(512) == 512
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("lots")
    assert parse_bool("on") is True and parse_bool("") is True and parse_bool("0") is False
    with pytest.raises(ValueError, match="is not a boolean"):
        parse_bool("maybe")
    assert parse_int("0x10") == 16
    assert parse_mac("52-54-00-12-34-56") == bytes.fromhex("525400123456")
    assert mac_text(parse_mac("52:54:00:12:34:56")) == "52:54:00:12:34:56"
    with pytest.raises(ValueError, match="is not a MAC address"):
        parse_mac("52:54:00")


@pytest.mark.parametrize("cls", ["blk", "net", "console", "rng"])
def test_every_driver_checks_its_class_through_the_base(cls: str) -> None:
    import importlib

    from l4vctl.drivers.base import Driver
    from l4vctl.errors import NegotiationError
    from tests.emu import Session

    name = {"blk": "BlkDriver", "net": "NetDriver", "console": "ConsoleDriver", "rng": "RngDriver"}[cls]
    driver = getattr(importlib.import_module(f"l4vctl.drivers.{cls}"), name)
    assert issubclass(driver, Driver) and cls == driver.CLASS
    other = "rng" if cls != "rng" else "blk"
    with Session(f"emu:{other}") as s:
        s.handshake()
        with pytest.raises(NegotiationError, match=f"is not .*{cls} I/O needs"):
            driver(s)
    with Session(f"emu:{cls}") as s:
        s.handshake()
        d = driver(s)
        assert d.session is s and d.timeout == s.timeout
