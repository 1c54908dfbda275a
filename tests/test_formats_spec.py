"""Schemas against the offset tables of the protocol notes (§1, §6, §7)."""

from __future__ import annotations

import pytest
from construct import Container

from l4vctl.formats import cmd, devcfg, header, ring
from l4vctl.formats.introspect import describe

# (offset, size, name) transcribed from the protocol notes, §1.1 and §1.2.
CURRENT = [
    (0x00, 4, "magic"), (0x04, 4, "version"), (0x08, 4, "device"), (0x0C, 4, "vendor"),
    (0x10, 4, "dev_features"), (0x14, 4, "dev_features_sel"), (0x18, 8, "_res1"),
    (0x20, 4, "driver_features"), (0x24, 4, "driver_features_sel"), (0x28, 4, "num_queues"),
    (0x2C, 4, "queues_offset"), (0x30, 4, "queue_sel"), (0x34, 4, "queue_num_max"),
    (0x38, 4, "queue_num"), (0x3C, 8, "_res3"), (0x44, 4, "queue_ready"), (0x48, 8, "_res4"),
    (0x50, 4, "queue_notify"), (0x54, 12, "_res5"), (0x60, 4, "irq_status"), (0x64, 4, "irq_ack"),
    (0x68, 8, "_res6"), (0x70, 4, "status"), (0x74, 4, "cfg_driver_notify_index"),
    (0x78, 4, "cfg_device_notify_index"), (0x7C, 4, "cmd"), (0x80, 8, "queue_desc"),
    (0x88, 8, "_res8"), (0x90, 8, "queue_avail"), (0x98, 8, "_res9"), (0xA0, 8, "queue_used"),
    (0xA8, 4, "_res10"), (0xAC, 4, "shm_sel"), (0xB0, 8, "shm_len"), (0xB8, 8, "shm_base"),
    (0xC0, 24, "dev_features_map"), (0xD8, 8, "_res11"), (0xE0, 24, "driver_features_map"),
    (0xF8, 4, "_res12"), (0xFC, 4, "generation"),
]  # fmt: skip

CLASSIC = [
    (0x00, 4, "magic"), (0x04, 4, "version"), (0x08, 4, "device"), (0x0C, 4, "vendor"),
    (0x10, 4, "dev_features"), (0x14, 4, "dev_features_sel"), (0x18, 8, "_res1"),
    (0x20, 4, "driver_features"), (0x24, 4, "driver_features_sel"), (0x28, 4, "num_queues"),
    (0x2C, 4, "queues_offset"), (0x30, 4, "queue_sel"), (0x34, 4, "queue_num_max"),
    (0x38, 4, "queue_num"), (0x3C, 8, "_res3"), (0x44, 4, "queue_ready"), (0x48, 8, "_res4"),
    (0x50, 4, "queue_notify"), (0x54, 12, "_res5"), (0x60, 4, "irq_status"), (0x64, 4, "irq_ack"),
    (0x68, 8, "_res6"), (0x70, 4, "status"), (0x74, 12, "_res7"), (0x80, 8, "queue_desc"),
    (0x88, 8, "_res8"), (0x90, 8, "queue_avail"), (0x98, 8, "_res9"), (0xA0, 8, "queue_used"),
    (0xA8, 32, "dev_features_map"), (0xC8, 32, "driver_features_map"), (0xE8, 8, "_res10"),
    (0xF0, 4, "cfg_driver_notify_index"), (0xF4, 4, "cfg_device_notify_index"), (0xF8, 4, "cmd"),
    (0xFC, 4, "generation"),
]  # fmt: skip

QUEUE = [
    (0x00, 2, "num_max"), (0x02, 2, "num"), (0x04, 2, "ready"), (0x06, 2, "driver_notify_index"),
    (0x08, 8, "desc_addr"), (0x10, 8, "avail_addr"), (0x18, 8, "used_addr"),
    (0x20, 2, "device_notify_index"),
]  # fmt: skip

BLOCK_CURRENT = [
    (0x00, 8, "capacity"), (0x08, 4, "size_max"), (0x0C, 4, "seg_max"), (0x10, 4, "geometry"),
    (0x14, 4, "blk_size"), (0x18, 8, "topology"), (0x20, 1, "writeback"), (0x21, 1, "unused0"),
    (0x22, 2, "num_queues"), (0x24, 4, "max_discard_sectors"), (0x28, 4, "max_discard_seg"),
    (0x2C, 4, "discard_sector_alignment"), (0x30, 4, "max_write_zeroes_sectors"),
    (0x34, 4, "max_write_zeroes_seg"), (0x38, 1, "write_zeroes_may_unmap"), (0x39, 3, "unused1"),
    (0x3C, 4, "max_secure_erase_sectors"), (0x40, 4, "max_secure_erase_seg"),
    (0x44, 4, "secure_erase_sector_alignment"),
]  # fmt: skip

NET = [
    (0x00, 6, "mac"), (0x06, 2, "status"), (0x08, 2, "max_virtqueue_pairs"), (0x0A, 2, "mtu"),
    (0x0C, 4, "speed"), (0x10, 1, "duplex"), (0x11, 1, "rss_max_key_size"),
    (0x12, 2, "rss_max_indirection_table_length"), (0x14, 4, "supported_hash_types"),
]  # fmt: skip


def named(schema):
    return [(f.offset, f.size, f.name) for f in describe(schema) if f.name is not None]


def test_current_header_matches_spec():
    assert named(header.l4virtio_config_hdr_current) == CURRENT
    assert header.l4virtio_config_hdr_current.sizeof() == 256


def test_classic_header_matches_spec():
    assert named(header.l4virtio_config_hdr_classic) == CLASSIC
    assert header.l4virtio_config_hdr_classic.sizeof() == 256


@pytest.mark.parametrize("stride", [40, 36])
def test_queue_entry_matches_spec(stride):
    schema = header.l4virtio_config_queue(stride)
    assert named(schema) == QUEUE
    assert schema.sizeof() == stride


def test_queue_stride_is_40_or_36():
    with pytest.raises(ValueError):
        header.l4virtio_config_queue(32)


def test_queue_array_follows_stride():
    arr = header.queue_array(3, 40)
    assert arr.sizeof() == 120
    data = bytearray(120)
    data[40:42] = (512).to_bytes(2, "little")
    assert arr.parse(bytes(data))[1].num_max == 512


def test_block_config_matches_spec():
    assert named(devcfg.l4virtio_block_config_t["current"]) == BLOCK_CURRENT
    assert devcfg.l4virtio_block_config_t["current"].sizeof() == 72
    classic = named(devcfg.l4virtio_block_config_t["classic"])
    assert (0x21, 3, "unused0") in classic and all(n != "num_queues" for _o, _s, n in classic)
    assert devcfg.l4virtio_block_config_t["classic"].sizeof() == 72


def test_net_config_matches_spec():
    assert named(devcfg.l4virtio_net_config_t) == NET
    assert devcfg.l4virtio_net_config_t.sizeof() == 24


def test_small_device_configs():
    assert named(devcfg.virtio_console_config) == [
        (0, 2, "cols"),
        (2, 2, "rows"),
        (4, 4, "max_nr_ports"),
        (8, 4, "emerg_wr"),
    ]
    assert devcfg.l4virtio_input_config_t.sizeof() == 136
    assert devcfg.l4virtio_input_absinfo_t.sizeof() == 20
    assert devcfg.l4virtio_input_devids_t.sizeof() == 8
    assert devcfg.virtio_vsock_config.sizeof() == 8
    assert devcfg.l4virtio_rng_config_t.sizeof() == 0


def test_request_layouts():
    assert named(devcfg.l4virtio_block_header_t) == [(0, 4, "type"), (4, 4, "ioprio"), (8, 8, "sector")]
    assert devcfg.virtio_blk_discard_write_zeroes.sizeof() == 16
    assert devcfg.l4virtio_net_header_t.sizeof() == 12
    assert named(devcfg.l4virtio_net_header_t)[-1] == (10, 2, "num_buffers")
    assert devcfg.virtio_console_control.sizeof() == 8
    assert devcfg.virtio_input_event.sizeof() == 8


@pytest.mark.parametrize("num", [1, 2, 128, 256, 32768])
def test_ring_sizes(num):
    assert ring.desc_table(num).sizeof() == 16 * num
    assert ring.vring_avail(num).sizeof() == 2 * num + 6
    assert ring.vring_used(num).sizeof() == 8 * num + 6


def test_ring_fields():
    assert named(ring.vring_desc) == [(0, 8, "addr"), (8, 4, "len"), (12, 2, "flags"), (14, 2, "next")]
    assert named(ring.vring_avail(4)) == [(0, 2, "flags"), (2, 2, "idx"), (4, 8, "ring"), (12, 2, "used_event")]
    assert named(ring.vring_used(4)) == [(0, 2, "flags"), (2, 2, "idx"), (4, 32, "ring"), (36, 2, "avail_event")]


def test_cmd_word_puts_command_in_top_byte():
    word = (0x01000000 | 0x0B).to_bytes(4, "little")
    parsed = cmd.cmd_word.parse(word)
    assert parsed.command == "SET_STATUS" and parsed.argument == 0x0B
    assert cmd.cmd_word.build(Container(command="NOTIFY_QUEUE", argument=3)) == (0x08000003).to_bytes(4, "little")
    assert cmd.cmd_word.parse(b"\0\0\0\0").command == "NONE"


def test_status_flags():
    flags = cmd.device_status.parse((0x4B).to_bytes(4, "little"))
    assert flags.ACKNOWLEDGE and flags.DRIVER and flags.FEATURES_OK and flags.DEVICE_NEEDS_RESET
    assert not flags.DRIVER_OK and not flags.FAILED


def test_feature_map_positions_of_spec_cross_reference():
    """VERSION_1 and CMD_CONFIG land where §1.2's cross-reference says."""
    from l4vctl import page

    for abi, v1_word_off, cmd_word_off in (("classic", 0xAC, 0xC4), ("current", 0xC4, 0xD4)):
        raw = page.build_page(abi, 2, features=[32])
        assert int.from_bytes(raw[v1_word_off : v1_word_off + 4], "little") == 1
        bit = 224 if abi == "classic" else 160
        raw = page.build_page(abi, 2, features=[bit])
        assert int.from_bytes(raw[cmd_word_off : cmd_word_off + 4], "little") == 1
