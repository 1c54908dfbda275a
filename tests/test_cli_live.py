"""Conformance: the live commands over emu: and unix:, both eras, both modes, and their exit codes."""

from __future__ import annotations

import pytest

from l4vctl import catalog as cat
from tests.conftest import run_cli
from tests.emu import Session, emulator


@pytest.fixture(params=["emu", "unix"])
def device(request, tmp_path):
    """A device URL per backend; yields a factory taking (kind, abi, cmd)."""
    started = []

    def make(kind="blk", abi="current", cmd=False, attach=None):
        if request.param == "emu":
            return f"emu:{kind}?abi={abi}" + ("&cmd_mode=1" if cmd else "") + (f"&attach={attach}" if attach else "")
        args = ["--abi", abi] + (["--cmd-mode"] if cmd else []) + (["--attach", attach] if attach else [])
        ctx = emulator(tmp_path, kind, *args, name=f"{kind}-{abi}-{int(cmd)}-{len(started)}.sock")
        url, _proc = ctx.__enter__()
        started.append(ctx)
        return url

    yield make
    for ctx in started:
        ctx.__exit__(None, None, None)


def ok(*args, **kw):
    r = run_cli(*args, "--json", **kw)
    assert r.code == 0, r.stderr
    env = r.json()
    assert env["ok"] is True and env["schema"] == 1
    return env


@pytest.mark.parametrize("abi", ["classic", "current"])
@pytest.mark.parametrize("kind", ["blk", "net", "console", "rng"])
def test_probe(device, kind, abi):
    url = device(kind, abi)
    env = ok("probe", url)
    r = env["result"]
    assert env["device"] == url and env["abi"] == abi == r["abi"]
    assert r["device"]["class"] == kind and r["vendor"]["id"] == 0x44
    assert r["magic"] == cat.L4VIRTIO_MAGIC and r["version"] == 2
    assert cat.VERSION_1_BIT in r["features"]["bits"]
    assert r["status"]["value"] == 0 and r["num_queues"] == len(r["queues"]) >= 1
    text = run_cli("probe", url)
    assert text.code == 0 and text.stderr == ""
    assert f"{r['device']['id']} {r['device']['name']} ({kind})" in text.stdout


#: The three device generations: (era, emulator --attach, how `--attach auto` attaches).
GENERATIONS = [("classic", "iface", "iface"), ("classic", "config", "config"), ("current", None, "config")]


@pytest.mark.parametrize("abi,attach,via", GENERATIONS)
@pytest.mark.parametrize("cmd", [False, True])
def test_negotiate(device, abi, attach, via, cmd):
    url = device("blk", abi, cmd, attach)
    env = ok("negotiate", url)
    r = env["result"]
    assert r["mode"] == ("cmd" if cmd else "ipc") and r["abi"] == abi and r["attach"] == via
    assert r["status"]["value"] == 0x0F
    assert [t["wrote"] for t in r["transitions"]] == [0, 1, 3, 0x0B, 0x0F]
    assert all(t["via"] == r["mode"] for t in r["transitions"])
    assert r["queues"][0]["num"] == 256
    text = run_cli("negotiate", url, "--want", "flush,indirect_desc", "--refuse", "indirect_desc")
    assert text.code == 0
    assert "VIRTIO_BLK_F_FLUSH: on" in text.stdout
    assert "VIRTIO_F_INDIRECT_DESC: off [refused]" in text.stdout
    assert "VIRTIO_BLK_F_SEG_MAX: off" in text.stdout


@pytest.mark.parametrize("abi,attach,via", GENERATIONS)
def test_probe_and_blk_io_per_generation(device, abi, attach, via, tmp_path):
    img = tmp_path / f"{abi}-{attach}.img"
    url = device("blk", abi, False, attach)
    if url.startswith("emu:"):
        url += f"&image={img}&size=1M"
    r = ok("probe", url)["result"]
    assert r["abi"] == abi and r["device"]["class"] == "blk"
    data = bytes(range(256)) * 8
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert ok("blk", "write", url, "--sector", "3", "-i", src)["result"]["bytes"] == len(data)
    back = ok("blk", "read", url, "--sector", "3", "--count", "4")["result"]
    assert bytes.fromhex(back["hex"]) == data
    other = {"iface": "config", "config": "iface"}.get(attach)
    if other:  # forcing the way this generation does not answer fails with a clear protocol error
        r = run_cli("blk", "id", url, "--attach", other)
        assert r.code == 4 and r.stderr.count("\n") == 1 and "is not implemented" in r.stderr, r.stderr
        assert run_cli("blk", "id", url, env={"L4VCTL_ATTACH": attach}).code == 0


def test_negotiate_marks_unimplemented_and_forced_features():
    url = "emu:blk?features=30,31,45,60"
    text = run_cli("negotiate", url)
    assert text.code == 0, text.stderr
    for bit in (30, 31, 45, 60):
        assert f"bit {bit}: off [not implemented]" in text.stdout
    assert "VIRTIO_BLK_F_FLUSH: on\n" in text.stdout and "[forced]" not in text.stdout
    forced = run_cli("negotiate", url, "--want", "flush,45")
    assert "bit 45: on [forced]" in forced.stdout and "VIRTIO_BLK_F_FLUSH: on\n" in forced.stdout
    assert "bit 60: off [not implemented]" in forced.stdout
    r = ok("negotiate", url, "--want", "all")["result"]
    assert r["forced"] == [30, 31, 45, 60] and {30, 31, 45, 60} <= set(r["negotiated"])
    assert ok("negotiate", url)["result"]["forced"] == []


@pytest.mark.parametrize("abi", ["classic", "current"])
def test_dump_config_live_and_save(device, abi, tmp_path):
    url = device("net", abi)
    env = ok("dump-config", url)
    r = env["result"]
    assert r["source"]["format"] == "live" and r["abi"] == abi
    assert r["device_config"]["fields"]["mac"] == "52:54:00:12:34:56"
    saved = tmp_path / "saved.hex"
    assert run_cli("dump-config", url, "--hex", "-o", saved).code == 0
    back = ok("dump-config", f"dump:{saved}")["result"]
    assert back["header"] == r["header"] and back["abi"] == abi


def test_queue_stats_watch_while_a_driver_runs(tmp_path):
    with emulator(tmp_path) as (url, _proc):
        with Session(url) as s:
            s.handshake()
            env = ok("queue-stats", url)
            r = env["result"]
            q = r["queues"][0]
            assert r["device_side"]["driver_attached"] is True
            assert q["ready"] == 1 and q["num"] == 256 and q["device"]["enabled"] is True
            assert q["desc_addr"] == s.queues[0].desc and q["device"]["in_flight"] == 0
            lines = run_cli("queue-stats", url, "--watch", "--count", "3", "--interval", "0.05", "--json")
            assert lines.code == 0
            samples = [__import__("json").loads(x) for x in lines.stdout.splitlines()]
            assert len(samples) == 3 and all(e["ok"] for e in samples)
            text = run_cli("queue-stats", url)
            assert "last_avail_idx" in text.stdout and "driver:       attached" in text.stdout


def test_queue_stats_over_emu_and_dump(tmp_path):
    r = ok("queue-stats", "emu:net")["result"]
    assert len(r["queues"]) == 2 and r["device_side"]["driver_attached"] is False
    from l4vctl import page

    p = tmp_path / "p.bin"
    p.write_bytes(page.build_page("current", 2))
    r = ok("queue-stats", str(p))["result"]
    assert r["device_side"] is None and "a saved page shows no ring state" in r["notes"]


def test_probe_expect_device():
    assert run_cli("probe", "emu:blk", "--expect-device", "blk").code == 0
    assert run_cli("probe", "emu:blk", "--expect-device", "BLOCK").code == 0
    r = run_cli("probe", "emu:net", "--expect-device", "blk")
    assert r.code == 5 and "expected a blk device (2), found NET (1)" in r.stderr
    assert run_cli("probe", "emu:blk", "--expect-device", "floppy").code == 2


def test_backends_listing():
    env = ok("backends")
    rows = {b["scheme"]: b for b in env["result"]["backends"]}
    assert {"emu", "unix", "dump"} <= set(rows)
    assert all(rows[s]["available"] for s in ("emu", "unix", "dump"))
    text = run_cli("backends")
    assert "unix:PATH" in text.stdout


def test_default_device_and_environment():
    assert ok("probe")["device"] == "emu:blk"
    assert ok("probe", env={"L4VCTL_DEVICE": "emu:rng"})["result"]["device"]["name"] == "RNG"
    assert ok("probe", "emu:net", env={"L4VCTL_DEVICE": "emu:rng"})["result"]["device"]["name"] == "NET"
    r = run_cli("probe", "emu:net", "-d", "emu:rng")
    assert r.code == 2 and "two devices given" in r.stderr


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["negotiate", "emu:blk?inject=refuse-features-ok"], 5, "refused FEATURES_OK"),
        (["negotiate", "emu:blk", "--require", "ro"], 5, "required feature not offered: VIRTIO_BLK_F_RO"),
        (["negotiate", "emu:blk", "--mode", "cmd"], 5, "does not offer L4VIRTIO_FEATURE_CMD_CONFIG"),
        (["negotiate", "emu:blk?inject=needs-reset-on-driver-ok"], 6, "DEVICE_NEEDS_RESET"),
        (["negotiate", "emu:blk?cmd_mode=1&inject=never-clear-cmd", "--timeout", "0.2"], 7, "did not consume cmd"),
        (["negotiate", "emu:blk?inject=no-reply=0", "--timeout", "0.2"], 7, "no reply to SET_STATUS"),
        (["negotiate", "emu:blk?inject=die-on-status=3"], 3, "closed the connection"),
        (["negotiate", "emu:blk?inject=queues-offset-outside"], 4, "does not fit the page"),
        (["probe", "emu:blk?inject=bad-magic"], 4, "bad magic"),
        (["dump-config", "emu:blk?inject=queues-offset-outside"], 4, "queue array runs past the end"),
        (["probe", "unix:/nonexistent.sock"], 3, "no such socket"),
        (["probe", "emu:gpu"], 2, "unknown device type 'gpu'"),
        (["probe", "emu:blk?size=huge"], 2, "is not a size"),
        (["probe", "emu:blk?nope=1"], 2, "unknown option 'nope'"),
        (["probe", "ftp:x"], 2, "unknown device scheme 'ftp'"),
        (["negotiate", "emu:blk", "--want", "warp"], 2, "unknown feature 'warp'"),
        (["negotiate", "emu:blk", "--require", "flush", "--refuse", "flush"], 2, "both required and refused"),
        (["dump-config", "emu:blk", "--offset", "16"], 2, "apply to saved pages"),
    ],
)
def test_faults_and_bad_input_exit_codes(args, code, fragment):
    r = run_cli(*args)
    assert r.code == code, (r.code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l4vctl: error: ") and fragment in lines[0], r.stderr
    assert r.stdout == ""
    j = run_cli(*args, "--json")
    assert j.code == code and j.json()["error"]["exit_code"] == code


def test_negotiate_on_a_saved_page(tmp_path):
    from l4vctl import page

    p = tmp_path / "p.bin"
    p.write_bytes(page.build_page("current", 2))
    r = run_cli("negotiate", str(p))
    assert r.code == 3 and "saved page" in r.stderr
