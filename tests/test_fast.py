"""The fast codecs decode every input exactly as the Construct schemas do."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from construct import Container, ListContainer
from hypothesis import given
from hypothesis import strategies as st

from l4vctl.formats import fast, ring
from l4vctl.formats.registry import fixed_schemas

SCHEMAS = fixed_schemas()
STRUCT_KEYS = [k for k, s in SCHEMAS.items() if not isinstance(fast.derive(s), str)]


def plain(value):
    """Construct's parse result as plain dicts/lists, padding and _io dropped."""
    if isinstance(value, Container):
        return {k: plain(v) for k, v in value.items() if not k.startswith("_io") and v is not None}
    if isinstance(value, ListContainer | list):
        return [plain(v) for v in value]
    return value


def test_generated_layouts_are_current():
    """_derived.py equals a fresh derivation from the schemas."""
    proc = subprocess.run([sys.executable, "-m", "l4vctl.formats.fast", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_fixed_schema_is_derived():
    from l4vctl.formats._derived import LAYOUTS

    assert set(LAYOUTS) == set(SCHEMAS)
    for key, schema in SCHEMAS.items():
        layout = LAYOUTS[key]
        if isinstance(layout, str):
            continue
        assert fast.codec(key).size == schema.sizeof(), key


@pytest.mark.parametrize("key", STRUCT_KEYS)
@given(data=st.data())
def test_codec_unpack_equals_construct_parse(key, data):
    schema = SCHEMAS[key]
    c = fast.codec(key)
    raw = data.draw(st.binary(min_size=c.size, max_size=c.size))
    assert c.unpack(raw) == plain(schema.parse(raw))


@pytest.mark.parametrize("key", STRUCT_KEYS)
@given(data=st.data())
def test_codec_pack_equals_construct_build(key, data):
    schema = SCHEMAS[key]
    c = fast.codec(key)
    raw = data.draw(st.binary(min_size=c.size, max_size=c.size))
    value = c.unpack(raw)
    built = schema.build(schema.parse(raw))
    assert c.pack(value) == built
    buf = bytearray(c.size + 8)
    c.pack_into(buf, 8, value)
    assert bytes(buf[8:]) == built


def test_codec_field_offsets_match_schema():
    from l4vctl.formats.introspect import describe

    for key in STRUCT_KEYS:
        c = fast.codec(key)
        for f in describe(SCHEMAS[key]):
            if f.name is None:
                continue
            assert c.fields[f.name][:2] == (f.offset, f.size), (key, f.name)


def test_pack_rejects_wrong_array_length():
    c = fast.codec("l4virtio_config_hdr_t@current")
    value = c.unpack(bytes(256))
    value["dev_features_map"] = [0] * 5
    with pytest.raises(ValueError, match="dev_features_map"):
        c.pack(value)


@given(num_exp=st.integers(0, 8), data=st.data())
def test_ring_decoders_equal_construct(num_exp, data):
    num = 1 << num_exp
    r = fast.ring()
    desc = data.draw(st.binary(min_size=16 * num, max_size=16 * num))
    parsed = ring.desc_table(num).parse(desc)
    assert r.descriptors(desc, num) == [(d.addr, d.len, d.flags, d.next) for d in parsed]

    avail = data.draw(st.binary(min_size=r.avail_size(num), max_size=r.avail_size(num)))
    assert r.avail(avail, num) == plain(ring.vring_avail(num).parse(avail))

    used = data.draw(st.binary(min_size=r.used_size(num), max_size=r.used_size(num)))
    p = ring.vring_used(num).parse(used)
    got = r.used(used, num)
    assert (got["flags"], got["idx"], got["avail_event"]) == (p.flags, p.idx, p.avail_event)
    assert got["ring"] == [(e.id, e.len) for e in p.ring]


@given(pad=st.integers(0, 7), num_exp=st.integers(0, 6), data=st.data())
def test_ring_decoders_at_unaligned_offsets(pad, num_exp, data):
    num = 1 << num_exp
    r = fast.ring()
    body = data.draw(st.binary(min_size=r.avail_size(num), max_size=r.avail_size(num)))
    buf = bytes(pad) + body
    assert r.avail(buf, num, pad) == plain(ring.vring_avail(num).parse(body))


def test_ring_geometry_matches_schemas_and_spec():
    r = fast.ring()
    for num in (1, 2, 64, 128, 256, 32768):
        assert r.desc_size(num) == ring.desc_table(num).sizeof()
        assert r.avail_size(num) == ring.vring_avail(num).sizeof()
        assert r.used_size(num) == ring.vring_used(num).sizeof()
    # The protocol notes' §6.3 examples.
    assert r.simple_layout(128) == {"desc": 0, "avail": 0x800, "used": 0x908, "total": 3342}
    assert r.simple_layout(256) == {"desc": 0, "avail": 0x1000, "used": 0x1208, "total": 6670}


def test_ring_decoders_refuse_short_buffers():
    r = fast.ring()
    with pytest.raises(ValueError):
        r.descriptors(bytes(31), 2)
    with pytest.raises(ValueError):
        r.avail(bytes(9), 2)
    with pytest.raises(ValueError):
        r.used(bytes(21), 2)


def test_derive_refuses_what_it_cannot_express():
    from construct import Int16ub, Int32ul, PrefixedArray, Struct

    with pytest.raises(TypeError):
        fast.derive(Struct("x" / Int16ub))
    with pytest.raises(TypeError):
        fast.derive(Struct("x" / PrefixedArray(Int32ul, Int32ul)))


def test_hot_modules_do_not_import_construct():
    code = (
        "import sys, l4vctl.page, l4vctl.formats.fast as f; f.ring(); "
        "l4vctl.page.build_page('current', 2); print('construct' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_generated_module_is_in_package():
    assert (pathlib.Path(fast.__file__).with_name("_derived.py")).is_file()
