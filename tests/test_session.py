"""The driver-side session: handshakes in both eras and modes, negotiation, faults."""

from __future__ import annotations

import time

import pytest

from l4vctl import catalog as cat
from l4vctl.errors import (
    DeviceStateError,
    NegotiationError,
    ProtocolError,
    TimeoutExpired,
    UnavailableError,
    UsageError,
)
from l4vctl.session import Session, resolve_features
from tests.emu import emulator

KINDS = ["blk", "net", "console", "rng"]


#: The device generations: (era, how it lets drivers attach, how an auto session attaches).
GENERATIONS = [("classic", "iface", "iface"), ("classic", "both", "config"), ("classic", "config", "config"),
               ("current", "config", "config")]  # fmt: skip


@pytest.mark.parametrize("abi,attach,via", GENERATIONS)
@pytest.mark.parametrize("mode", ["ipc", "cmd"])
@pytest.mark.parametrize("kind", KINDS)
def test_handshake_reaches_driver_ok(kind, abi, attach, via, mode):
    cmd = "&cmd_mode=1" if mode == "cmd" else ""
    with Session(f"emu:{kind}?abi={abi}&attach={attach}{cmd}", mode=mode) as s:
        summary = s.handshake()
        assert s.abi == abi and s.mode == mode and s.attached_via == via
        assert s.status == 0x0F
        assert [t.wrote for t in s.transitions] == [0, 1, 3, 0x0B, 0x0F]
        assert [t.status for t in s.transitions] == [0, 1, 3, 0x0B, 0x0F]
        assert cat.VERSION_1_BIT in summary["negotiated"]
        assert (cat.CMD_CONFIG_BIT[abi] in summary["negotiated"]) == (mode == "cmd")
        negotiated = set(cat.bits_of(s.words("driver_features_map")))
        assert negotiated == set(summary["negotiated"])
        stats = s.stats()
        assert all(q["enabled"] for q in stats["queues"])
        assert [q["num"] for q in stats["queues"]] == [q.num for q in s.queues]
        assert stats["regions"] == 1


def test_auto_mode_follows_the_offer():
    with Session("emu:blk?cmd_mode=1") as s:
        s.handshake()
        assert s.mode == "cmd"
    with Session("emu:blk") as s:
        s.handshake()
        assert s.mode == "ipc"


def test_cmd_mode_needs_the_offer():
    with Session("emu:blk", mode="cmd") as s:
        with pytest.raises(NegotiationError, match="does not offer L4VIRTIO_FEATURE_CMD_CONFIG"):
            s.handshake()


def test_ipc_mode_on_a_cmd_device_does_not_accept_cmd_config():
    with Session("emu:blk?cmd_mode=1", mode="ipc") as s:
        summary = s.handshake()
        assert cat.CMD_CONFIG_BIT["current"] not in summary["negotiated"]


def test_want_require_refuse():
    with Session("emu:blk?features=event_idx") as s:
        summary = s.handshake(want=["flush", "VIRTIO_F_EVENT_IDX", "5"], require=["flush"], refuse=["event_idx"])
        assert set(summary["negotiated"]) == {9, 32}
        rows = {r["bit"]: r for r in summary["features"]}
        assert rows[29]["refused"] and rows[29]["offered"] and not rows[29]["negotiated"]
        assert rows[5]["wanted"] and not rows[5]["offered"]
        assert rows[28]["offered"] and not rows[28]["wanted"]


def test_default_want_skips_transport_features_the_driver_lacks():
    with Session("emu:blk?features=ring_packed,in_order") as s:
        summary = s.handshake()
        assert 34 not in summary["negotiated"] and 35 not in summary["negotiated"]
        assert {1, 2, 6, 9, 28, 32} <= set(summary["negotiated"])
    with Session("emu:blk?features=ring_packed") as s:
        assert 34 in s.handshake(want="all")["negotiated"]


def test_default_accepts_only_what_l4vctl_implements():
    """Bits offered beyond what the session and the class driver implement stay off unless asked for."""
    with Session("emu:blk?features=30,31,45,60,config_wce,mq,zoned") as s:
        summary = s.handshake()
        for bit in (30, 31, 45, 60, 11, 12, 17):
            assert bit not in summary["negotiated"]
        assert {1, 2, 6, 9, 13, 14, 28, 32} <= set(summary["negotiated"]) and summary["forced"] == []
        rows = {r["bit"]: r for r in summary["features"]}
        assert rows[45]["offered"] and not rows[45]["implemented"] and not rows[45]["forced"]
        assert rows[9]["implemented"] and not rows[9]["forced"]
        assert set(cat.bits_of(s.words("driver_features_map"))) == set(summary["negotiated"])
    with Session("emu:blk?features=45,60,mq") as s:
        summary = s.handshake(want=["45", "flush"], require=["mq"])
        assert set(summary["negotiated"]) == {9, 12, 32, 45} and summary["forced"] == [12, 45]
        assert set(cat.bits_of(s.words("driver_features_map"))) == {9, 12, 32, 45}
    with Session("emu:blk?features=60") as s:
        summary = s.handshake(want="all")
        assert 60 in summary["negotiated"] and summary["forced"] == [60]


def test_net_default_leaves_offloads_and_merged_buffers_off():
    from l4vctl.drivers.net import NetDriver

    url = "emu:net?features=csum,guest_csum,guest_tso4,guest_tso6,guest_ufo,mrg_rxbuf,ctrl_vq,mq&mtu=100&loop=1"
    with Session(url) as s:
        summary = s.handshake()
        assert set(summary["negotiated"]) == {3, 5, 16, 32}, summary["negotiated"]
        drv = NetDriver(s)
        assert drv.max_frame == 114
        with pytest.raises(UsageError, match="larger than 114 .the device's MTU"):
            drv.send(bytes(115))
        drv.send(bytes(114))
        drv.flush()


def test_console_and_rng_defaults():
    with Session("emu:console?features=multiport,emerg_write&io=null") as s:
        assert set(s.handshake()["negotiated"]) == {0, 32}
    with Session("emu:rng?features=event_idx,ring_packed") as s:
        assert set(s.handshake()["negotiated"]) == {28, 29, 32}


def test_required_feature_missing_fails_and_sets_failed():
    with Session("emu:blk") as s:
        with pytest.raises(NegotiationError, match="VIRTIO_BLK_F_RO"):
            s.handshake(require=["ro"])
        assert s.status & cat.STATUS_FAILED
        assert s.transitions[-1].wrote & cat.STATUS_FAILED


def test_refused_features_ok():
    with Session("emu:blk?inject=refuse-features-ok") as s:
        with pytest.raises(NegotiationError, match="refused FEATURES_OK"):
            s.handshake()
        assert s.status == 0x83  # ACK|DRIVER, then FAILED from the driver


def test_version_1_cannot_be_refused():
    with Session("emu:blk") as s:
        with pytest.raises(NegotiationError, match="cannot be refused"):
            s.handshake(refuse=["version_1"])


def test_unknown_feature_name_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown feature 'warp'"):
        resolve_features(["warp"], "current", 2)
    assert resolve_features(["flush", "VIRTIO_BLK_F_RO", "0x1c", "32"], "current", 2) == {9, 5, 28, 32}
    assert resolve_features(["cmd_config"], "classic", 2) == {224}
    with pytest.raises(UsageError):
        resolve_features(["200"], "current", 2)  # beyond the 192-bit map


def test_driver_ok_refused_is_a_device_error():
    with Session("emu:blk?inject=needs-reset-on-driver-ok") as s:
        with pytest.raises(DeviceStateError, match="DEVICE_NEEDS_RESET"):
            s.handshake()


def test_no_queues_means_driver_ok_refused_by_blk():
    with Session("emu:blk") as s:
        with pytest.raises(DeviceStateError):
            s.handshake(queues=False)


def test_queue_size_is_a_power_of_two_within_num_max():
    with Session("emu:net?num_max=100") as s:
        s.handshake(queue_size=1000)
        assert [q.num for q in s.queues] == [64, 64]
    with Session("emu:blk") as s:
        s.handshake(queue_size=48)
        assert s.queues[0].num == 32


def test_never_cleared_cmd_times_out_fast():
    t = time.monotonic()
    with Session("emu:blk?cmd_mode=1&inject=never-clear-cmd", timeout=0.3) as s:
        with pytest.raises(TimeoutExpired, match="did not consume cmd 0x01000000"):
            s.handshake()
    assert time.monotonic() - t < 3


def test_no_reply_times_out():
    with Session("emu:blk?inject=no-reply=1", timeout=0.3) as s:
        with pytest.raises(TimeoutExpired, match="no reply to CONFIG_QUEUE"):
            s.handshake()


def test_emulator_dies_mid_handshake():
    with Session("emu:blk?inject=die-on-status=11") as s:
        with pytest.raises(UnavailableError, match="closed the connection.*exited with status 70"):
            s.handshake()


def test_bad_magic_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="bad magic"):
        with Session("emu:blk?inject=bad-magic"):
            pass


def test_queue_array_outside_the_page():
    with Session("emu:blk?inject=queues-offset-outside") as s:
        with pytest.raises(ProtocolError, match="does not fit the page"):
            s.handshake()
        assert s.status & cat.STATUS_FAILED


def test_saved_page_cannot_handshake(tmp_path):
    from l4vctl import page

    path = tmp_path / "p.bin"
    path.write_bytes(page.build_page("current", 2))
    with Session(str(path)) as s:
        assert s.get("device") == 2 and not s.live
        with pytest.raises(UnavailableError, match="saved page"):
            s.handshake()


def test_close_resets_a_driven_device_unless_kept(tmp_path):
    with emulator(tmp_path) as (url, _proc):
        with Session(url) as s:
            s.handshake()
            s.close(reset=False)
        with Session(url, role="monitor") as mon:
            # the driver left, so the emulator reset anyway; but without --keep
            # the session itself wrote 0 first: both paths end at status 0
            assert mon.status == 0


def test_session_arguments():
    with pytest.raises(UsageError):
        Session("emu:blk", mode="fast")
    with pytest.raises(UsageError, match="attach must be"):
        Session("emu:blk", attach="magic")
    with pytest.raises(UsageError):
        Session("emu:blk", timeout=0)
    with pytest.raises(UsageError, match="unknown device scheme 'tcp'"):
        Session("tcp:host:1")
    with pytest.raises(UsageError, match="unknown device type 'gpu'"):
        Session("emu:gpu").open()


def test_unix_path_missing():
    with pytest.raises(UnavailableError, match="no such socket"):
        Session("unix:/nonexistent/dev.sock").open()
