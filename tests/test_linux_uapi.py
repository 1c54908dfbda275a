"""Cross-check the standard virtio layouts and constants with the Linux UAPI headers.

Every VIRTIO_*/VRING_* macro and enumerator and every struct that the headers
of the device classes we model define is found by preprocessing them
(``gcc -E -dD``); a C program compiled against ``linux/virtio_*.h`` (Debian
package linux-libc-dev) prints their values and ``offsetof``/``sizeof``.
Each constant must be in the catalog with the same value, each struct must be
modelled with the same layout, unless an explicit list below says why not.
Constants newer than the installed headers (virtio 1.3 bits, for example) are
taken from the specification and are simply not checked here.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from l4vctl import catalog as cat
from l4vctl.formats import devcfg, ring
from l4vctl.formats.introspect import describe

HEADERS = [
    "linux/virtio_config.h", "linux/virtio_ids.h", "linux/virtio_ring.h", "linux/virtio_blk.h",
    "linux/virtio_net.h", "linux/virtio_console.h", "linux/virtio_input.h", "linux/virtio_vsock.h",
    "linux/virtio_rng.h",
]  # fmt: skip

RING_NUM = 8
FLEXIBLE = {"ring"}  # flexible array members in the C ring structs

#: C struct -> our schema, for every struct the headers define that we model.
STRUCTS = {
    "struct vring_desc": ring.vring_desc,
    "struct vring_avail": ring.vring_avail(RING_NUM),
    "struct vring_used_elem": ring.vring_used_elem,
    "struct vring_used": ring.vring_used(RING_NUM),
    "struct virtio_blk_config": devcfg.l4virtio_block_config_t["current"],
    "struct virtio_blk_geometry": devcfg._blk_geometry,
    "struct virtio_blk_outhdr": devcfg.l4virtio_block_header_t,
    "struct virtio_blk_discard_write_zeroes": devcfg.virtio_blk_discard_write_zeroes,
    "struct virtio_net_config": devcfg.l4virtio_net_config_t,
    "struct virtio_net_hdr_v1": devcfg.l4virtio_net_header_t,
    "struct virtio_net_hdr_v1_hash": devcfg.virtio_net_hdr_v1_hash,
    "struct virtio_net_ctrl_hdr": devcfg.virtio_net_ctrl_hdr,
    "struct virtio_net_ctrl_mq": devcfg.virtio_net_ctrl_mq,
    "struct virtio_net_ctrl_coal_tx": devcfg.virtio_net_ctrl_coal_tx,
    "struct virtio_net_ctrl_coal_rx": devcfg.virtio_net_ctrl_coal_rx,
    "struct virtio_console_config": devcfg.virtio_console_config,
    "struct virtio_console_control": devcfg.virtio_console_control,
    "struct virtio_input_absinfo": devcfg.l4virtio_input_absinfo_t,
    "struct virtio_input_devids": devcfg.l4virtio_input_devids_t,
    "struct virtio_input_config": devcfg.l4virtio_input_config_t,
    "struct virtio_input_event": devcfg.virtio_input_event,
    "struct virtio_vsock_config": devcfg.virtio_vsock_config,
    "struct virtio_vsock_event": devcfg.virtio_vsock_event,
    "struct virtio_vsock_hdr": devcfg.virtio_vsock_hdr,
}

# Structs of these headers that we deliberately do not model, and why.
STRUCTS_NOT_MODELLED = {
    # the driver-side bookkeeping struct of Linux (pointers), not a memory layout
    "struct vring": "pointers to the three ring parts",
    # packed virtqueues: L4Re and l4vctl use split rings only
    "struct vring_packed_desc": "packed rings",
    "struct vring_packed_desc_event": "packed rings",
    # legacy layouts (devices without VIRTIO_F_VERSION_1); L4Re devices are 1.x
    "struct virtio_scsi_inhdr": "legacy SCSI passthrough",
    "struct virtio_net_hdr": "legacy net header without num_buffers",
    "struct virtio_net_hdr_mrg_rxbuf": "legacy net header (same layout as virtio_net_hdr_v1)",
    # variable length (flexible arrays): no fixed layout to compare
    "struct virtio_net_ctrl_mac": "flexible array of MACs",
    "struct virtio_net_rss_config": "indirection table and key of variable length",
    "struct virtio_net_hash_config": "key of variable length",
}

# Our field path -> C member designator, where they differ.
RENAMES = {
    ("struct virtio_blk_config", "writeback"): "wce",
    ("struct virtio_blk_config", "unused0"): "unused",
    ("struct virtio_blk_config", "topology.physical_block_exp"): "physical_block_exp",
    ("struct virtio_blk_config", "topology.alignment_offset"): "alignment_offset",
    ("struct virtio_blk_config", "topology.min_io_size"): "min_io_size",
    ("struct virtio_blk_config", "topology.opt_io_size"): "opt_io_size",
}


# Our fields without a C member: the event words follow the flexible ring array in
# C and are reached through the vring_used_event()/vring_avail_event() macros.
NO_C_MEMBER = {("struct vring_avail", "used_event"), ("struct vring_used", "avail_event")}


def _leaves(fields, prefix=""):
    for f in fields:
        if f.name is None:
            continue
        if f.fields:
            yield from _leaves(f.fields, prefix + f.name + ".")
        else:
            yield prefix + f.name


# (our schema, our field path, C struct, C member) for every named field we model
FIELDS = [
    (schema, path, struct, RENAMES.get((struct, path), path))
    for struct, schema in STRUCTS.items()
    for path in _leaves(describe(schema))
    if (struct, path) not in NO_C_MEMBER
]
# Whole-struct sizes must agree for every modelled struct.
SIZES = [
    (schema, struct) for struct, schema in STRUCTS.items() if struct not in ("struct vring_avail", "struct vring_used")
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
    out["VIRTIO_BLK_T_BARRIER"] = cat.BLK_T_BARRIER
    out["VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP"] = cat.BLK_DISCARD_F_UNMAP
    out["VIRTIO_CONSOLE_BAD_ID"] = cat.CONSOLE_BAD_ID
    for mask, name in cat.NET_HDR_FLAGS:
        out["VIRTIO_NET_HDR_F_" + name] = mask
    for value, name in cat.NET_HDR_GSO.items():
        out["VIRTIO_NET_HDR_GSO_" + name] = value
    for mask, name in cat.NET_RSS_HASH_TYPES:
        out["VIRTIO_NET_RSS_HASH_TYPE_" + name] = mask
    for value, name in cat.NET_HASH_REPORT.items():
        out["VIRTIO_NET_HASH_REPORT_" + name] = value
    for value, name in cat.NET_CTRL_ACK.items():
        out["VIRTIO_NET_" + name] = value
    for value, (name, commands) in cat.NET_CTRL_CLASSES.items():
        out["VIRTIO_NET_CTRL_" + name] = value
        for cmd, cmd_name in commands.items():
            out[f"VIRTIO_NET_CTRL_{name}_{cmd_name}"] = cmd
    out["VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN"] = cat.NET_CTRL_MQ_VQ_PAIRS_MIN
    out["VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX"] = cat.NET_CTRL_MQ_VQ_PAIRS_MAX
    for value, name in cat.VSOCK_TYPES.items():
        out["VIRTIO_VSOCK_TYPE_" + name] = value
    for value, name in cat.VSOCK_OPS.items():
        out["VIRTIO_VSOCK_OP_" + name] = value
    for mask, name in cat.VSOCK_SHUTDOWN_BITS:
        out["VIRTIO_VSOCK_SHUTDOWN_" + name] = mask
    for mask, name in cat.VSOCK_SEQ_BITS:
        out["VIRTIO_VSOCK_SEQ_" + name] = mask
    for value, name in cat.VSOCK_EVENTS.items():
        out["VIRTIO_VSOCK_EVENT_" + name] = value
    out["VRING_DESC_ALIGN_SIZE"] = cat.DESC_ALIGN
    out["VRING_AVAIL_ALIGN_SIZE"] = cat.AVAIL_ALIGN
    out["VRING_USED_ALIGN_SIZE"] = cat.USED_ALIGN
    for name in ("DESC_F_AVAIL", "DESC_F_USED", "EVENT_FLAG_ENABLE", "EVENT_FLAG_DISABLE", "EVENT_FLAG_DESC",
                 "EVENT_F_WRAP_CTR"):  # fmt: skip
        out["VRING_PACKED_" + name] = getattr(cat, "VRING_PACKED_" + name)
    return out


# Linux macros that are other names for a constant we know: alias -> the name we know it by.
ALIASES = {
    "VIRTIO_F_IOMMU_PLATFORM": "VIRTIO_F_ACCESS_PLATFORM",  # the old name
    "VIRTIO_BLK_F_WCE": "VIRTIO_BLK_F_FLUSH",  # legacy name of the same bit
}

# Linux constants the catalog deliberately does not carry (names or prefixes), and why.
NOT_IN_CATALOG = {
    # bounds of the transport bits Linux's core keeps for itself; not a protocol value
    "VIRTIO_TRANSPORT_F_START": "Linux-internal range",
    "VIRTIO_TRANSPORT_F_END": "Linux-internal range",
    # PCI device ids of transitional devices; L4-VIRTIO has no PCI ids
    "VIRTIO_TRANS_ID_": "PCI transport",
}


def _not_in_catalog(name: str) -> bool:
    return any(name == k or (k.endswith("_") and name.startswith(k)) for k in NOT_IN_CATALOG)


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


def discover(gcc: str) -> dict[str, dict[str, list[str]]]:
    """What each header defines: its VIRTIO_*/VRING_* macros and enumerators, and its structs.

    ``gcc -E -dD`` keeps the #defines in place and marks which file each line
    comes from, so every name is attributed to the header that defines it.
    """
    src = "".join(f"#include <{h}>\n" for h in HEADERS)
    proc = subprocess.run([gcc, "-E", "-dD", "-x", "c", "-"], input=src, capture_output=True, text=True)
    assert proc.returncode == 0, f"preprocessing linux/virtio_*.h failed:\n{proc.stderr}"
    text: dict[str, list[str]] = {}
    macros: dict[str, list[str]] = {}
    current = ""
    for line in proc.stdout.splitlines():
        m = re.match(r'# \d+ "([^"]+)"', line)
        if m:
            current = m.group(1)
            continue
        header = next((h for h in HEADERS if current.endswith("/" + h)), None)
        if header is None:
            continue
        m = re.match(r"#define ((?:VIRTIO|VRING)_\w+)(\(?)", line)
        if m and not m.group(2):  # object-like macros only
            macros.setdefault(header, []).append(m.group(1))
        elif not line.startswith("#"):
            text.setdefault(header, []).append(line)
    out = {}
    for h in HEADERS:
        body = "\n".join(text.get(h, []))
        enums = [n for e in re.findall(r"\benum\s+\w*\s*\{([^}]*)\}", body)
                 for n in re.findall(r"\b((?:VIRTIO|VRING)_\w+)\b", e)]  # fmt: skip
        structs = sorted(set(re.findall(r"\bstruct\s+(\w+)\s*\{", body)))
        out[h] = {"constants": macros.get(h, []) + enums, "structs": ["struct " + n for n in structs]}
    return out


def c_program(names) -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>"]
    lines += [f"#include <{h}>" for h in HEADERS]
    lines.append("int main(void) {")
    for _schema, _ours, struct, member in FIELDS:
        sized = f"{member}[0]" if member in FLEXIBLE else member
        lines.append(f'  printf("OFF {struct}.{member} %zu %zu\\n", offsetof({struct}, {member}), '
                     f"sizeof((({struct} *)0)->{sized}));")  # fmt: skip
    for _schema, struct in SIZES:
        lines.append(f'  printf("SIZE {struct} %zu\\n", sizeof({struct}));')
    for name in names:
        lines.append(f'  printf("CONST {name} %lld\\n", (long long)({name}));')
    lines.append("  return 0;\n}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def linux(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc, "gcc is required for the Linux UAPI cross-check (.ci/run installs it)"
    found = discover(gcc)
    names = sorted({n for h in found.values() for n in h["constants"]})
    d = tmp_path_factory.mktemp("uapi")
    src = d / "uapi.c"
    src.write_text(c_program(names))
    exe = d / "uapi"
    proc = subprocess.run([gcc, "-std=gnu11", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, f"compiling against linux/virtio_*.h failed (linux-libc-dev?):\n{proc.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=30).stdout
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
    return offs, sizes, consts, found


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
    offs = linux[0]
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


def test_every_struct_of_the_headers_is_modelled_or_listed(linux):
    found = linux[3]
    structs = {s for h in found.values() for s in h["structs"]}
    unknown = structs - set(STRUCTS) - set(STRUCTS_NOT_MODELLED)
    assert not unknown, f"structs in linux/virtio_*.h that l4vctl neither models nor lists: {sorted(unknown)}"
    assert len(structs) >= 30  # the discovery really parsed the headers


def test_every_constant_of_the_headers_is_in_the_catalog(linux):
    consts, found = linux[2], linux[3]
    ours = constants()
    missing = REQUIRED - set(consts)
    assert not missing, f"linux headers lack {sorted(missing)}"
    unknown, mismatched = [], {}
    for name, value in consts.items():
        if _not_in_catalog(name):
            continue
        known = ALIASES.get(name, name)
        if known not in ours:
            unknown.append(name)
        elif ours[known] != value:
            mismatched[name] = (ours[known], value)
    assert not unknown, f"constants in linux/virtio_*.h the catalog does not know: {sorted(unknown)}"
    assert not mismatched, f"catalog value != Linux value: {mismatched}"
    per_header = {h: len(v["constants"]) for h, v in found.items()}
    assert per_header["linux/virtio_ids.h"] >= 40 and per_header["linux/virtio_net.h"] >= 80, per_header
    assert len(consts) >= 200  # the cross-check really covered the headers


def test_catalog_device_ids_match_linux_names(linux):
    consts = linux[2]
    for d in cat.DEVICE_IDS.values():
        name = "VIRTIO_ID_" + _LINUX_ID_NAMES.get(d.name, d.name)
        if name in consts:
            assert consts[name] == d.id, name


def test_discovery_attributes_names_to_their_header(linux):
    found = linux[3]
    assert "VIRTIO_ID_NET" in found["linux/virtio_ids.h"]["constants"]
    assert "VIRTIO_ID_NET" not in found["linux/virtio_net.h"]["constants"]  # included, not defined there
    assert "VIRTIO_INPUT_CFG_ABS_INFO" in found["linux/virtio_input.h"]["constants"]  # an enumerator
    assert "struct virtio_blk_config" in found["linux/virtio_blk.h"]["structs"]
