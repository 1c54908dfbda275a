"""Cross-check the standard virtio layouts and constants with the Linux UAPI headers.

A small C program, generated from our catalog and schemas, is compiled with
gcc against ``linux/virtio_*.h`` (Debian package linux-libc-dev) and prints
``offsetof``/``sizeof`` and macro values; every value it prints must equal
ours.  The toolchain and headers are required: ``.ci/run`` installs them.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from l4vctl import catalog as cat
from l4vctl.formats import devcfg, ring
from l4vctl.formats.introspect import describe

HEADERS = [
    "linux/virtio_config.h", "linux/virtio_ids.h", "linux/virtio_ring.h", "linux/virtio_blk.h",
    "linux/virtio_net.h", "linux/virtio_console.h", "linux/virtio_input.h", "linux/virtio_vsock.h",
]  # fmt: skip

RING_NUM = 8
FLEXIBLE = {"ring"}  # flexible array members in the C ring structs

# (our schema, our field path, C struct, C member)
FIELDS = [
    (ring.vring_desc, "addr", "struct vring_desc", "addr"),
    (ring.vring_desc, "len", "struct vring_desc", "len"),
    (ring.vring_desc, "flags", "struct vring_desc", "flags"),
    (ring.vring_desc, "next", "struct vring_desc", "next"),
    (ring.vring_avail(RING_NUM), "flags", "struct vring_avail", "flags"),
    (ring.vring_avail(RING_NUM), "idx", "struct vring_avail", "idx"),
    (ring.vring_avail(RING_NUM), "ring", "struct vring_avail", "ring"),
    (ring.vring_used_elem, "id", "struct vring_used_elem", "id"),
    (ring.vring_used_elem, "len", "struct vring_used_elem", "len"),
    (ring.vring_used(RING_NUM), "flags", "struct vring_used", "flags"),
    (ring.vring_used(RING_NUM), "idx", "struct vring_used", "idx"),
    (ring.vring_used(RING_NUM), "ring", "struct vring_used", "ring"),
]
_BLK = devcfg.l4virtio_block_config_t["current"]
for ours, theirs in [
    ("capacity", "capacity"), ("size_max", "size_max"), ("seg_max", "seg_max"),
    ("geometry.cylinders", "geometry.cylinders"), ("geometry.heads", "geometry.heads"),
    ("geometry.sectors", "geometry.sectors"), ("blk_size", "blk_size"),
    ("topology.physical_block_exp", "physical_block_exp"),
    ("topology.alignment_offset", "alignment_offset"), ("topology.min_io_size", "min_io_size"),
    ("topology.opt_io_size", "opt_io_size"), ("writeback", "wce"), ("unused0", "unused"),
    ("num_queues", "num_queues"), ("max_discard_sectors", "max_discard_sectors"),
    ("max_discard_seg", "max_discard_seg"), ("discard_sector_alignment", "discard_sector_alignment"),
    ("max_write_zeroes_sectors", "max_write_zeroes_sectors"),
    ("max_write_zeroes_seg", "max_write_zeroes_seg"),
    ("write_zeroes_may_unmap", "write_zeroes_may_unmap"), ("unused1", "unused1"),
]:  # fmt: skip
    FIELDS.append((_BLK, ours, "struct virtio_blk_config", theirs))
for name in ("mac", "status", "max_virtqueue_pairs", "mtu", "speed", "duplex"):
    FIELDS.append((devcfg.l4virtio_net_config_t, name, "struct virtio_net_config", name))
for name in ("cols", "rows", "max_nr_ports", "emerg_wr"):
    FIELDS.append((devcfg.virtio_console_config, name, "struct virtio_console_config", name))
for name in ("select", "subsel", "size", "reserved", "u"):
    FIELDS.append((devcfg.l4virtio_input_config_t, name, "struct virtio_input_config", name))
for name in ("min", "max", "fuzz", "flat", "res"):
    FIELDS.append((devcfg.l4virtio_input_absinfo_t, name, "struct virtio_input_absinfo", name))
for name in ("bustype", "vendor", "product", "version"):
    FIELDS.append((devcfg.l4virtio_input_devids_t, name, "struct virtio_input_devids", name))
for name in ("type", "code", "value"):
    FIELDS.append((devcfg.virtio_input_event, name, "struct virtio_input_event", name))
for name in ("type", "ioprio", "sector"):
    FIELDS.append((devcfg.l4virtio_block_header_t, name, "struct virtio_blk_outhdr", name))
for name in ("sector", "num_sectors", "flags"):
    FIELDS.append((devcfg.virtio_blk_discard_write_zeroes, name, "struct virtio_blk_discard_write_zeroes", name))
for name in ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset", "num_buffers"):
    FIELDS.append((devcfg.l4virtio_net_header_t, name, "struct virtio_net_hdr_v1", name))
for name in ("id", "event", "value"):
    FIELDS.append((devcfg.virtio_console_control, name, "struct virtio_console_control", name))
FIELDS.append((devcfg.virtio_vsock_config, "guest_cid", "struct virtio_vsock_config", "guest_cid"))

# Whole-struct sizes that must agree (Linux's blk/net configs are longer).
SIZES = [
    (ring.vring_desc, "struct vring_desc"),
    (ring.vring_used_elem, "struct vring_used_elem"),
    (devcfg.virtio_console_config, "struct virtio_console_config"),
    (devcfg.l4virtio_input_config_t, "struct virtio_input_config"),
    (devcfg.l4virtio_input_absinfo_t, "struct virtio_input_absinfo"),
    (devcfg.l4virtio_input_devids_t, "struct virtio_input_devids"),
    (devcfg.virtio_input_event, "struct virtio_input_event"),
    (devcfg.l4virtio_block_header_t, "struct virtio_blk_outhdr"),
    (devcfg.virtio_blk_discard_write_zeroes, "struct virtio_blk_discard_write_zeroes"),
    (devcfg.l4virtio_net_header_t, "struct virtio_net_hdr_v1"),
    (devcfg.virtio_console_control, "struct virtio_console_control"),
    (devcfg.virtio_vsock_config, "struct virtio_vsock_config"),
]

_LINUX_ID_NAMES = {"I2C": "I2C_ADAPTER"}


def constants() -> dict[str, int]:
    """Linux macro name -> our value, for every constant Linux may define."""
    out: dict[str, int] = {}
    for table in [cat.TRANSPORT_FEATURES["current"], *cat.DEVICE_FEATURES.values()]:
        for f in table.values():
            if f.name.startswith("VIRTIO_"):
                out[f.linux or f.name] = f.bit
    for d in cat.DEVICE_IDS.values():
        if d.name != "SOCK":
            out["VIRTIO_ID_" + _LINUX_ID_NAMES.get(d.name, d.name)] = d.id
    status = {"ACKNOWLEDGE": "ACKNOWLEDGE", "DRIVER": "DRIVER", "DRIVER_OK": "DRIVER_OK",
              "FEATURES_OK": "FEATURES_OK", "DEVICE_NEEDS_RESET": "NEEDS_RESET", "FAILED": "FAILED"}  # fmt: skip
    for mask, name in cat.STATUS_BITS:
        out["VIRTIO_CONFIG_S_" + status[name]] = mask
    for mask, name in cat.VRING_DESC_FLAGS:
        out["VRING_DESC_F_" + name] = mask
    out["VRING_AVAIL_F_NO_INTERRUPT"] = cat.VRING_AVAIL_F_NO_INTERRUPT
    out["VRING_USED_F_NO_NOTIFY"] = cat.VRING_USED_F_NO_NOTIFY
    for value, name in cat.BLK_REQUEST_TYPES.items():
        out["VIRTIO_BLK_T_" + name] = value
    for value, name in cat.BLK_STATUS.items():
        out["VIRTIO_BLK_S_" + name] = value
    out["VIRTIO_BLK_ID_BYTES"] = cat.BLK_ID_BYTES
    for value, name in cat.CONSOLE_EVENTS.items():
        out["VIRTIO_CONSOLE_" + name] = value
    for value, name in cat.INPUT_CFG_SELECT.items():
        out["VIRTIO_INPUT_CFG_" + name] = value
    out["VIRTIO_NET_S_LINK_UP"] = cat.NET_S_LINK_UP
    out["VIRTIO_NET_S_ANNOUNCE"] = cat.NET_S_ANNOUNCE
    return out


# Constants that must be present in any linux-libc-dev new enough for the
# test to mean something (Linux >= 5.x).
REQUIRED = {
    "VIRTIO_F_VERSION_1", "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_F_ACCESS_PLATFORM", "VIRTIO_F_RING_PACKED", "VIRTIO_BLK_F_FLUSH", "VIRTIO_BLK_F_RO",
    "VIRTIO_BLK_F_DISCARD", "VIRTIO_BLK_F_WRITE_ZEROES", "VIRTIO_NET_F_MAC", "VIRTIO_NET_F_MQ",
    "VIRTIO_NET_F_SPEED_DUPLEX", "VIRTIO_CONSOLE_F_MULTIPORT", "VIRTIO_ID_BLOCK", "VIRTIO_ID_INPUT",
    "VIRTIO_ID_VSOCK", "VIRTIO_CONFIG_S_NEEDS_RESET", "VRING_DESC_F_INDIRECT", "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_T_WRITE_ZEROES", "VIRTIO_CONSOLE_PORT_NAME", "VIRTIO_INPUT_CFG_ABS_INFO",
}  # fmt: skip



def c_program() -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>"]
    lines += [f"#include <{h}>" for h in HEADERS]
    lines.append("int main(void) {")
    for _schema, _ours, struct, member in FIELDS:
        sized = f"{member}[0]" if member in FLEXIBLE else member
        lines.append(f'  printf("OFF {struct}.{member} %zu %zu\\n", offsetof({struct}, {member}), '
                     f"sizeof((({struct} *)0)->{sized}));")  # fmt: skip
    for _schema, struct in SIZES:
        lines.append(f'  printf("SIZE {struct} %zu\\n", sizeof({struct}));')
    for name in constants():
        enum = name.startswith("VIRTIO_INPUT_CFG_")  # an enum in C, not a macro
        if not enum:
            lines.append(f"#ifdef {name}")
        lines.append(f'  printf("CONST {name} %lld\\n", (long long)({name}));')
        if not enum:
            lines.append("#endif")
    lines.append("  return 0;\n}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def linux(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc, "gcc is required for the Linux UAPI cross-check (.ci/run installs it)"
    d = tmp_path_factory.mktemp("uapi")
    src = d / "uapi.c"
    src.write_text(c_program())
    exe = d / "uapi"
    proc = subprocess.run([gcc, "-std=gnu11", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, f"compiling against linux/virtio_*.h failed (linux-libc-dev?):\n{proc.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    offs, sizes, consts = {}, {}, {}
    for line in out.splitlines():
        kind, rest = line.split(" ", 1)
        if kind == "OFF":
            name, off, size = rest.rsplit(" ", 2)
            offs[name] = (int(off), int(size))
        elif kind == "SIZE":
            name, size = rest.rsplit(" ", 1)
            sizes[name] = int(size)
        else:
            name, value = rest.split(" ")
            consts[name] = int(value)
    return offs, sizes, consts


def _ours(schema, path: str) -> tuple[int, int]:
    fields = describe(schema)
    parts = path.split(".")
    base = 0
    while True:
        f = next(f for f in fields if f.name == parts[0])
        if len(parts) == 1:
            return f.offset - base, f.size
        fields, parts = f.fields, parts[1:]


@pytest.mark.parametrize("schema,ours,struct,member", FIELDS, ids=[f"{s}.{m}" for _a, _b, s, m in FIELDS])
def test_field_offset_and_size(linux, schema, ours, struct, member):
    offs, _sizes, _consts = linux
    linux_off, linux_size = offs[f"{struct}.{member}"]
    our_off, our_size = _ours(schema, ours)
    assert our_off == linux_off
    if member in FLEXIBLE:  # C gives the element size of a flexible array
        assert our_size == linux_size * RING_NUM
    else:
        assert our_size == linux_size


@pytest.mark.parametrize("schema,struct", SIZES, ids=[s for _a, s in SIZES])
def test_struct_size(linux, schema, struct):
    assert schema.sizeof() == linux[1][struct]


def test_constants_agree(linux):
    consts = linux[2]
    ours = constants()
    missing = REQUIRED - set(consts)
    assert not missing, f"linux headers lack {sorted(missing)}"
    mismatched = {n: (ours[n], consts[n]) for n in consts if ours[n] != consts[n]}
    assert not mismatched
    assert len(consts) >= 80  # the cross-check really covered the catalog
