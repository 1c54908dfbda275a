"""Device-specific config structs (at 0x100 of the page) and request layouts.

Struct names follow L4Re where L4Re has one (``l4virtio_block_config_t``),
else the virtio specification's C name.  Requests and events that travel
through virtqueues live here too, next to the config of their device class.
"""

from __future__ import annotations

from typing import Any

from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from l4vctl.catalog import ABIS, DEVICE_CLASSES

# -- block ---------------------------------------------------------------------

_blk_geometry = Struct(
    "cylinders" / Int16ul * "legacy geometry: cylinders",
    "heads" / Int8ul * "legacy geometry: heads",
    "sectors" / Int8ul * "legacy geometry: sectors per track",
)

_blk_topology = Struct(
    "physical_block_exp" / Int8ul * "log2 of logical blocks per physical block",
    "alignment_offset" / Int8ul * "offset of the first aligned logical block",
    "min_io_size" / Int16ul * "suggested minimum I/O size in blocks",
    "opt_io_size" / Int32ul * "optimal (suggested maximum) I/O size in blocks",
)


def _blk_config(abi: str) -> Struct:
    middle: tuple[Any, ...]
    if abi == "current":
        middle = (
            "unused0" / Array(1, Int8ul) * "reserved",
            "num_queues" / Int16ul * "number of request queues (VIRTIO_BLK_F_MQ)",
        )
    else:
        middle = ("unused0" / Array(3, Int8ul) * "reserved (current era: num_queues at 0x22)",)
    return Struct(
        "capacity" / Int64ul * "size in 512-byte sectors",
        "size_max" / Int32ul * "largest segment in bytes (VIRTIO_BLK_F_SIZE_MAX)",
        "seg_max" / Int32ul * "most segments per request (VIRTIO_BLK_F_SEG_MAX)",
        "geometry" / _blk_geometry * "legacy geometry (VIRTIO_BLK_F_GEOMETRY)",
        "blk_size" / Int32ul * "logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE)",
        "topology" / _blk_topology * "I/O topology (VIRTIO_BLK_F_TOPOLOGY)",
        "writeback" / Int8ul * "1 = write-back cache (VIRTIO_BLK_F_CONFIG_WCE)",
        *middle,
        "max_discard_sectors" / Int32ul * "largest discard in sectors",
        "max_discard_seg" / Int32ul * "most discard segments per request",
        "discard_sector_alignment" / Int32ul * "discard alignment in sectors",
        "max_write_zeroes_sectors" / Int32ul * "largest write-zeroes in sectors",
        "max_write_zeroes_seg" / Int32ul * "most write-zeroes segments per request",
        "write_zeroes_may_unmap" / Int8ul * "1 = write-zeroes may deallocate",
        "unused1" / Array(3, Int8ul) * "reserved",
        "max_secure_erase_sectors" / Int32ul * "largest secure erase in sectors (VIRTIO_BLK_F_SECURE_ERASE)",
        "max_secure_erase_seg" / Int32ul * "most secure-erase segments per request",
        "secure_erase_sector_alignment" / Int32ul * "secure-erase alignment in sectors",
    )


l4virtio_block_config_t = {abi: _blk_config(abi) for abi in ABIS}

l4virtio_block_header_t = Struct(
    "type" / Int32ul * "IN 0, OUT 1, FLUSH 4, GET_ID 8, GET_LIFETIME 10, DISCARD 11, WRITE_ZEROES 13, ...",
    "ioprio" / Int32ul * "I/O priority (ignored by L4Re servers)",
    "sector" / Int64ul * "first sector (512 bytes) of the request",
)

virtio_blk_discard_write_zeroes = Struct(
    "sector" / Int64ul * "first sector",
    "num_sectors" / Int32ul * "number of sectors",
    "flags" / Int32ul * "bit0 UNMAP",
)

# -- net -------------------------------------------------------------------------

l4virtio_net_config_t = Struct(
    "mac" / Bytes(6) * "MAC address (VIRTIO_NET_F_MAC)",
    "status" / Int16ul * "bit0 LINK_UP, bit1 ANNOUNCE (VIRTIO_NET_F_STATUS)",
    "max_virtqueue_pairs" / Int16ul * "receive/transmit queue pairs (VIRTIO_NET_F_MQ)",
    "mtu" / Int16ul * "maximum MTU (VIRTIO_NET_F_MTU)",
    "speed" / Int32ul * "link speed in Mbit/s (VIRTIO_NET_F_SPEED_DUPLEX)",
    "duplex" / Int8ul * "0x01 full, 0x00 half duplex",
    "rss_max_key_size" / Int8ul * "longest RSS key in bytes (VIRTIO_NET_F_RSS, HASH_REPORT)",
    "rss_max_indirection_table_length" / Int16ul * "most RSS indirection table entries (VIRTIO_NET_F_RSS)",
    "supported_hash_types" / Int32ul * "hash types the device computes (bit0 IPv4 ... bit8 UDP_EX)",
)

l4virtio_net_header_t = Struct(
    "flags" / Int8ul * "bit0 NEEDS_CSUM, bit1 DATA_VALID",
    "gso_type" / Int8ul * "NONE 0, TCPV4 1, UDP 3, TCPV6 4, ECN 0x80",
    "hdr_len" / Int16ul * "length of the headers to copy per segment",
    "gso_size" / Int16ul * "segment size",
    "csum_start" / Int16ul * "where checksumming starts",
    "csum_offset" / Int16ul * "where to store the checksum, from csum_start",
    "num_buffers" / Int16ul * "buffers merged into this packet (VIRTIO_NET_F_MRG_RXBUF)",
)

virtio_net_hdr_v1_hash = Struct(
    "hdr" / l4virtio_net_header_t * "the net header",
    "hash_value" / Int32ul * "packet hash (VIRTIO_NET_F_HASH_REPORT)",
    "hash_report" / Int16ul * "hash type: NONE 0, IPv4 1 ... UDPv6_EX 9",
    "padding" / Int16ul * "reserved",
)

virtio_net_ctrl_hdr = Struct(
    "class" / Int8ul * "control class: RX 0, MAC 1, VLAN 2, ANNOUNCE 3, MQ 4, ...",
    "cmd" / Int8ul * "command within the class",
)

virtio_net_ctrl_mq = Struct(
    "virtqueue_pairs" / Int16ul * "queue pairs to use (MQ VQ_PAIRS_SET)",
)

virtio_net_ctrl_coal_tx = Struct(
    "tx_max_packets" / Int32ul * "packets before a TX notification",
    "tx_usecs" / Int32ul * "microseconds before a TX notification",
)

virtio_net_ctrl_coal_rx = Struct(
    "rx_max_packets" / Int32ul * "packets before an RX notification",
    "rx_usecs" / Int32ul * "microseconds before an RX notification",
)

# -- console -------------------------------------------------------------------------

virtio_console_config = Struct(
    "cols" / Int16ul * "columns (VIRTIO_CONSOLE_F_SIZE)",
    "rows" / Int16ul * "rows (VIRTIO_CONSOLE_F_SIZE)",
    "max_nr_ports" / Int32ul * "most ports (VIRTIO_CONSOLE_F_MULTIPORT)",
    "emerg_wr" / Int32ul * "emergency write register (VIRTIO_CONSOLE_F_EMERG_WRITE)",
)

virtio_console_control = Struct(
    "id" / Int32ul * "port number",
    "event" / Int16ul * "DEVICE_READY 0, PORT_ADD 1 ... PORT_NAME 7",
    "value" / Int16ul * "event argument",
)

# -- input ---------------------------------------------------------------------------

l4virtio_input_absinfo_t = Struct(
    "min" / Int32ul * "minimum value",
    "max" / Int32ul * "maximum value",
    "fuzz" / Int32ul * "noise filter",
    "flat" / Int32ul * "dead zone",
    "res" / Int32ul * "resolution",
)

l4virtio_input_devids_t = Struct(
    "bustype" / Int16ul * "bus type",
    "vendor" / Int16ul * "vendor id",
    "product" / Int16ul * "product id",
    "version" / Int16ul * "version",
)

l4virtio_input_config_t = Struct(
    "select" / Int8ul * "W: what to query (ID_NAME 1 ... ABS_INFO 0x12)",
    "subsel" / Int8ul * "W: sub-selector (event type, axis)",
    "size" / Int8ul * "R: bytes of valid data in u",
    "reserved" / Array(5, Int8ul) * "reserved",
    "u" / Bytes(128) * "R: string, bitmap, absinfo or devids, by select",
)

virtio_input_event = Struct(
    "type" / Int16ul * "event type",
    "code" / Int16ul * "event code",
    "value" / Int32ul * "event value",
)

# -- vsock and rng -----------------------------------------------------------------------

virtio_vsock_config = Struct(
    "guest_cid" / Int64ul * "context id of this end",
)

virtio_vsock_hdr = Struct(
    "src_cid" / Int64ul * "source context id",
    "dst_cid" / Int64ul * "destination context id",
    "src_port" / Int32ul * "source port",
    "dst_port" / Int32ul * "destination port",
    "len" / Int32ul * "payload bytes",
    "type" / Int16ul * "STREAM 1, SEQPACKET 2",
    "op" / Int16ul * "REQUEST 1 ... CREDIT_REQUEST 7",
    "flags" / Int32ul * "SHUTDOWN or SEQ bits, by op",
    "buf_alloc" / Int32ul * "receive buffer space",
    "fwd_cnt" / Int32ul * "bytes consumed",
)

virtio_vsock_event = Struct(
    "id" / Int32ul * "TRANSPORT_RESET 0",
)

#: The rng device has no config; its (empty) C++ struct still counts as 1 byte.
l4virtio_rng_config_t = Struct()


#: Device class -> C struct name and schema per ABI era.
DEVICE_CONFIGS = {
    "blk": ("l4virtio_block_config_t", l4virtio_block_config_t),
    "net": ("l4virtio_net_config_t", {abi: l4virtio_net_config_t for abi in ABIS}),
    "console": ("virtio_console_config", {abi: virtio_console_config for abi in ABIS}),
    "input": ("l4virtio_input_config_t", {abi: l4virtio_input_config_t for abi in ABIS}),
    "vsock": ("virtio_vsock_config", {abi: virtio_vsock_config for abi in ABIS}),
    "rng": ("l4virtio_rng_config_t", {abi: l4virtio_rng_config_t for abi in ABIS}),
}
assert set(DEVICE_CONFIGS) == set(DEVICE_CLASSES)

#: Structures that travel through virtqueues, by C name.
REQUESTS = {
    "l4virtio_block_header_t": l4virtio_block_header_t,
    "virtio_blk_discard_write_zeroes": virtio_blk_discard_write_zeroes,
    "l4virtio_net_header_t": l4virtio_net_header_t,
    "virtio_net_hdr_v1_hash": virtio_net_hdr_v1_hash,
    "virtio_net_ctrl_hdr": virtio_net_ctrl_hdr,
    "virtio_net_ctrl_mq": virtio_net_ctrl_mq,
    "virtio_net_ctrl_coal_tx": virtio_net_ctrl_coal_tx,
    "virtio_net_ctrl_coal_rx": virtio_net_ctrl_coal_rx,
    "virtio_console_control": virtio_console_control,
    "l4virtio_input_absinfo_t": l4virtio_input_absinfo_t,
    "l4virtio_input_devids_t": l4virtio_input_devids_t,
    "virtio_input_event": virtio_input_event,
    "virtio_vsock_hdr": virtio_vsock_hdr,
    "virtio_vsock_event": virtio_vsock_event,
}
