"""Messages of the vhost-user protocol, as far as l4vctl's front-end sends them.

A message is a 12-byte header and ``size`` bytes of payload; file
descriptors travel next to it (SCM_RIGHTS).  Payloads are a 64-bit number
(features, a queue index with :data:`~l4vctl.catalog.VHOST_USER_VRING_NOFD`),
a vring state or address, a memory table (a header and up to
:data:`~l4vctl.catalog.VHOST_USER_MAX_REGIONS` regions) or a config-space
window.  Message types and flag bits are in :mod:`l4vctl.catalog`.
"""

from __future__ import annotations

from construct import Array, Bytes, Int32ul, Int64ul, Struct

from l4vctl.catalog import (  # noqa: F401 - the vhost-user constants live in the catalog
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_FLAG_REPLY,
    VHOST_USER_MAX_REGIONS,
    VHOST_USER_REQUESTS,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_NOFD,
)

vhost_user_header = Struct(
    "request" / Int32ul * "message type (VHOST_USER_*)",
    "flags" / Int32ul * "version 1 in bits 0-1, REPLY 0x4, NEED_REPLY 0x8",
    "size" / Int32ul * "bytes of payload after the header",
)

#: A 64-bit payload: features, protocol features, a queue count, an ack, a queue index (+ NOFD).
vhost_user_u64 = Struct(
    "value" / Int64ul * "the number",
)

vhost_vring_state = Struct(
    "index" / Int32ul * "queue index",
    "num" / Int32ul * "ring size, start index or enable flag",
)

vhost_vring_addr = Struct(
    "index" / Int32ul * "queue index",
    "flags" / Int32ul * "bit 0: log used-ring writes (not used by l4vctl)",
    "desc_user_addr" / Int64ul * "descriptor table, front-end address",
    "used_user_addr" / Int64ul * "used ring, front-end address",
    "avail_user_addr" / Int64ul * "available ring, front-end address",
    "log_guest_addr" / Int64ul * "used-ring log address (not used)",
)

vhost_user_memory_hdr = Struct(
    "nregions" / Int32ul * "regions that follow (fds travel in the same order)",
    "padding" / Int32ul * "0",
)

vhost_user_memory_region = Struct(
    "guest_phys_addr" / Int64ul * "device address of the region",
    "memory_size" / Int64ul * "bytes",
    "userspace_addr" / Int64ul * "front-end address (l4vctl: the device address)",
    "mmap_offset" / Int64ul * "page-aligned offset of the region in its fd",
)

vhost_user_config_hdr = Struct(
    "offset" / Int32ul * "offset in the device config space",
    "size" / Int32ul * "bytes of config that follow",
    "flags" / Int32ul * "0: a read, or a write that is not a migration",
)


def vhost_user_memory(nregions: int) -> Struct:
    """A whole SET_MEM_TABLE payload with ``nregions`` regions."""
    return Struct(*vhost_user_memory_hdr.subcons, "regions" / Array(nregions, vhost_user_memory_region))


def vhost_user_config(size: int) -> Struct:
    """A GET_CONFIG payload carrying ``size`` bytes of config."""
    return Struct(*vhost_user_config_hdr.subcons, "payload" / Bytes(size))


#: The fixed-size pieces, by codec key (see :func:`l4vctl.formats.registry.fixed_schemas`).
FIXED = {
    "vhost_user_header": vhost_user_header,
    "vhost_user_u64": vhost_user_u64,
    "vhost_vring_state": vhost_vring_state,
    "vhost_vring_addr": vhost_vring_addr,
    "vhost_user_memory_hdr": vhost_user_memory_hdr,
    "vhost_user_memory_region": vhost_user_memory_region,
    "vhost_user_config_hdr": vhost_user_config_hdr,
}
