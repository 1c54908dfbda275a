"""The emulator follows the L4Re device rules (protocol notes §5), in both eras.

Every test talks to a real emulator process (``emu:`` forks one) at the IPC
level and checks what the device does to the shared page.
"""

from __future__ import annotations

import pytest

from l4vctl import catalog as cat
from l4vctl.caps import Dataspace
from tests.emu import (
    Session,
    call,
    config_queue,
    read_queue,
    register,
    rings,
    set_status,
    wait_for,
    write_features,
    write_queue,
)

ABIS = ["classic", "current"]
ACK, DRV, FOK, DOK, NR, FAILED = 1, 2, 8, 4, 0x40, 0x80


@pytest.fixture(params=ABIS)
def abi(request):
    return request.param


def driver(abi: str, kind: str = "blk", **opts) -> Session:
    query = "&".join([f"abi={abi}"] + [f"{k}={v}" for k, v in opts.items()])
    return Session(f"emu:{kind}?{query}", abi=abi)


def to_features_ok(s: Session, bits=(cat.VERSION_1_BIT,)) -> int:
    set_status(s, 0)
    set_status(s, ACK)
    set_status(s, ACK | DRV)
    write_features(s, bits)
    return set_status(s, ACK | DRV | FOK)


def enable_queue0(s: Session, num: int = 64) -> int:
    ds = Dataspace.create("rings", 64 * 1024)
    try:
        assert register(s, ds, 0x200000) == 0
        desc, avail, used, _ = rings(num)
        write_queue(s, 0, num=num, desc_addr=desc, avail_addr=avail, used_addr=used, ready=1)
        return config_queue(s, 0)
    finally:
        ds.close()  # the device keeps its own mapping


# -- §5.1 status machine ------------------------------------------------------------------


def test_reset_restores_header_and_bumps_generation(abi):
    with driver(abi) as s:
        gen = s.get("generation")
        s._set("irq_status", 3)
        write_features(s, [cat.VERSION_1_BIT, 9])
        assert set_status(s, ACK) == ACK
        assert set_status(s, 0) == 0
        assert s.get("generation") == gen + 1
        assert s.get("irq_status") == 0
        assert s.get("magic") == cat.L4VIRTIO_MAGIC and s.get("version") == 2 and s.get("device") == 2
        assert cat.VERSION_1_BIT in s.offered()
        # driver_features_map is not touched by a reset
        assert set(cat.bits_of(s.words("driver_features_map"))) == {9, cat.VERSION_1_BIT}


def test_generation_counts_resets(abi):
    with driver(abi) as s:
        gen = s.get("generation")
        for _ in range(3):
            set_status(s, 0)
        assert s.get("generation") == gen + 3


def test_nonzero_value_with_zero_low_byte_clears_without_reset(abi):
    with driver(abi) as s:
        set_status(s, 0)
        set_status(s, ACK)
        gen = s.get("generation")
        assert set_status(s, 0x100) == 0
        assert s.get("generation") == gen  # no reset ran


@pytest.mark.parametrize("value", [DRV, ACK | FOK, ACK | DRV | DOK])
def test_ordering_violation_sets_needs_reset(abi, value):
    with driver(abi) as s:
        set_status(s, 0)
        set_status(s, ACK)
        assert set_status(s, value) == ACK | NR


def test_several_bits_in_one_write_are_allowed(abi):
    with driver(abi) as s:
        set_status(s, 0)
        assert set_status(s, ACK | DRV) == ACK | DRV


def test_fail_state_is_sticky_until_reset(abi):
    with driver(abi) as s:
        set_status(s, 0)
        set_status(s, ACK)
        assert set_status(s, ACK | DRV | FAILED) == ACK | FAILED
        assert set_status(s, ACK | DRV) == ACK | FAILED  # other bits ignored
        assert set_status(s, ACK | NR) == ACK | FAILED | NR
        assert set_status(s, 0) == 0


def test_features_ok_needs_version_1(abi):
    with driver(abi) as s:
        assert to_features_ok(s, bits=[9]) == ACK | DRV  # FEATURES_OK removed, write accepted


def test_features_ok_refuses_bits_not_offered(abi):
    with driver(abi) as s:
        assert to_features_ok(s, bits=[cat.VERSION_1_BIT, 5]) == ACK | DRV  # RO is not offered


def test_features_ok_accepts_offered_subset(abi):
    with driver(abi) as s:
        assert to_features_ok(s, bits=[cat.VERSION_1_BIT, 9, 28]) == ACK | DRV | FOK


def test_driver_ok_without_required_queue_needs_reset(abi):
    with driver(abi) as s:
        to_features_ok(s)
        assert set_status(s, ACK | DRV | FOK | DOK) == ACK | DRV | FOK | NR


def test_driver_ok_with_queue_runs(abi):
    with driver(abi) as s:
        to_features_ok(s)
        assert enable_queue0(s) == 0
        assert set_status(s, 0x0F) == 0x0F


def test_extra_unknown_bits_bypass_the_queue_check(abi):
    with driver(abi) as s:
        to_features_ok(s)
        assert set_status(s, 0x1F) == 0x1F  # s != 0x0F exactly: no queue check


def test_features_ok_and_driver_ok_together_skip_the_feature_check(abi):
    with driver(abi) as s:
        set_status(s, 0)
        set_status(s, ACK | DRV)
        write_features(s, [5])  # not offered, no VERSION_1
        enable_queue0(s)
        assert set_status(s, 0x0F) == 0x0F


def test_cmd_config_bit_position_per_era(abi):
    with driver(abi, cmd_mode=1) as s:
        assert cat.CMD_CONFIG_BIT[abi] in s.offered()
        other = cat.CMD_CONFIG_BIT["current" if abi == "classic" else "classic"]
        assert other not in s.offered()


# -- §5.3 queue configuration ---------------------------------------------------------------


def queue_ready_to_configure(s: Session):
    set_status(s, 0)
    set_status(s, ACK | DRV)
    ds = Dataspace.create("rings", 64 * 1024)
    assert register(s, ds, 0x200000) == 0
    return ds


@pytest.mark.parametrize(
    "fields,why",
    [
        ({"num": 0}, "num 0"),
        ({"num": 48}, "not a power of two"),
        ({"num": 512}, "above num_max"),
        ({"desc_addr": 0x200008}, "desc not 16-aligned"),
        ({"avail_addr": 0x200401}, "avail not 2-aligned"),
        ({"used_addr": 0x200602}, "used not 4-aligned"),
        ({"desc_addr": 0x100000}, "desc outside every region"),
        ({"used_addr": 0x200000 + 64 * 1024 - 8}, "used runs past the region"),
    ],
)
def test_queue_validation_rejects(abi, fields, why):
    with driver(abi) as s:
        ds = queue_ready_to_configure(s)
        try:
            desc, avail, used, _ = rings(64)
            entry = dict(num=64, desc_addr=desc, avail_addr=avail, used_addr=used, ready=1)
            entry.update(fields)
            write_queue(s, 0, **entry)
            assert config_queue(s, 0) == -cat.L4_EINVAL, why
            assert read_queue(s, 0)["ready"] == 1  # the device does not clear ready
            assert s.stats()["queues"][0]["enabled"] == 0
        finally:
            ds.close()


def test_queue_used_ring_must_be_writable(abi):
    with driver(abi) as s:
        set_status(s, 0)
        set_status(s, ACK | DRV)
        rw = Dataspace.create("rw", 16 * 1024)
        ro = Dataspace.create("ro", 16 * 1024)
        try:
            assert register(s, rw, 0x200000) == 0
            assert register(s, ro, 0x400000, rights=cat.CAP_RIGHT_R) == 0
            write_queue(s, 0, num=64, desc_addr=0x200000, avail_addr=0x200400, used_addr=0x400000, ready=1)
            assert config_queue(s, 0) == -cat.L4_EINVAL
            # descriptors and available ring may live in read-only memory
            write_queue(s, 0, desc_addr=0x400000, avail_addr=0x400400, used_addr=0x200000)
            assert config_queue(s, 0) == 0
        finally:
            rw.close()
            ro.close()


def test_queue_disable_with_ready_0(abi):
    with driver(abi) as s:
        ds = queue_ready_to_configure(s)
        try:
            desc, avail, used, _ = rings(64)
            write_queue(s, 0, num=64, desc_addr=desc, avail_addr=avail, used_addr=used, ready=1)
            assert config_queue(s, 0) == 0 and s.stats()["queues"][0]["enabled"] == 1
            write_queue(s, 0, ready=0)
            assert config_queue(s, 0) == 0 and s.stats()["queues"][0]["enabled"] == 0
        finally:
            ds.close()


def test_queue_index_out_of_range(abi):
    with driver(abi) as s:
        set_status(s, 0)
        set_status(s, ACK | DRV)
        assert config_queue(s, 1) == -cat.L4_ERANGE
        assert config_queue(s, 0xFFFFFFFF) == -cat.L4_ERANGE


@pytest.mark.parametrize("status", [0, ACK, ACK | DRV | FAILED])
def test_config_queue_gate(abi, status):
    with driver(abi) as s:
        set_status(s, 0)
        if status:
            set_status(s, ACK)
            set_status(s, status)
        assert config_queue(s, 0) == -cat.L4_EIO


def test_reset_reinitialises_queues_but_keeps_addresses(abi):
    with driver(abi) as s:
        to_features_ok(s)
        assert enable_queue0(s, num=32) == 0
        before = read_queue(s, 0)
        set_status(s, 0)
        after = read_queue(s, 0)
        assert (after["num"], after["ready"], after["num_max"]) == (0, 0, 256)
        assert after["desc_addr"] == before["desc_addr"] and after["used_addr"] == before["used_addr"]
        assert s.stats()["queues"][0]["enabled"] == 0
        assert s.stats()["regions"] == 1  # registrations survive resets


# -- §5.4 cmd processing --------------------------------------------------------------------


def test_cmd_set_status_and_cfg_queue(abi):
    with driver(abi, cmd_mode=1) as s:
        s.mode = "cmd"
        for value in (0, ACK, ACK | DRV):
            s.send_cmd(cat.cmd_word(cat.CMD_SET_STATUS, value))
            assert s.status == value and s.get("cmd") == 0
        ds = Dataspace.create("rings", 64 * 1024)
        try:
            assert register(s, ds, 0x200000) == 0
            desc, avail, used, _ = rings(64)
            write_queue(s, 0, num=64, desc_addr=desc, avail_addr=avail, used_addr=used, ready=1)
            s.send_cmd(cat.cmd_word(cat.CMD_CFG_QUEUE, 0))
            assert s.stats()["queues"][0]["enabled"] == 1
        finally:
            ds.close()


def test_cmd_cfg_queue_skips_the_status_gate(abi):
    with driver(abi, cmd_mode=1) as s:
        s.mode = "cmd"
        s.send_cmd(cat.cmd_word(cat.CMD_SET_STATUS, 0))
        ds = Dataspace.create("rings", 64 * 1024)
        try:
            assert register(s, ds, 0x200000) == 0
            desc, avail, used, _ = rings(64)
            write_queue(s, 0, num=64, desc_addr=desc, avail_addr=avail, used_addr=used, ready=1)
            assert config_queue(s, 0) == -cat.L4_EIO  # the IPC path checks the status
            s.send_cmd(cat.cmd_word(cat.CMD_CFG_QUEUE, 0))  # the cmd path does not
            assert s.stats()["queues"][0]["enabled"] == 1
        finally:
            ds.close()


def test_unknown_cmd_is_consumed_and_ignored(abi):
    with driver(abi, cmd_mode=1) as s:
        s.send_cmd(cat.cmd_word(cat.CMD_SET_STATUS, 0))
        s.send_cmd(0x10000001)
        assert s.get("cmd") == 0 and s.status == 0
        s.send_cmd(cat.cmd_word(cat.CMD_NOTIFY_QUEUE, 0))  # current era: a kick; classic: unknown
        assert s.get("cmd") == 0


def test_cmd_is_ignored_without_cmd_mode(abi):
    with driver(abi) as s:
        word = cat.cmd_word(cat.CMD_SET_STATUS, ACK)
        s._set("cmd", word)
        s.device_irq.trigger()
        # the kick was handled but the cmd left alone
        assert wait_for(lambda: s.stats()["kicks"] >= 1, 5)
        assert s.get("cmd") == word and s.status == 0


def test_irq_status_is_cleared_by_reset(abi):
    with driver(abi) as s:
        s._set("irq_status", cat.IRQ_STATUS_CONFIG)
        set_status(s, 0)
        assert s.get("irq_status") == 0


# -- §5.2 publication -------------------------------------------------------------------------


def test_features_are_rewritten_from_the_private_copy_on_reset(abi):
    with driver(abi) as s:
        off = s.hc.fields["dev_features_map"][0]
        s._w32[off >> 2] = 0xFFFFFFFF  # a driver scribbles on the offered map
        set_status(s, 0)
        assert s.words("dev_features_map")[0] != 0xFFFFFFFF
        assert cat.VERSION_1_BIT in s.offered()


def test_queue_array_that_does_not_fit_publishes_no_queues(abi):
    with driver(abi, queues=200) as s:  # 200 x 40 bytes do not fit behind 0x140
        assert s.get("num_queues") == 0 and s.get("queues_offset") == 0
        assert call(s, cat.L4VIRTIO_PROTOCOL, cat.OP_SET_STATUS, [0])[0] == 0
