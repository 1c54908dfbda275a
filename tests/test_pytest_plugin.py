"""The pytest plugin (l4vctl/pytest_plugin.py), as a user's test suite meets it.

Each test writes a small test file, runs it with pytest in a subprocess
(pytester) with the plugin and nothing else loaded, and checks the outcome
and what the inner tests recorded: the emulator pids and sockets, which must
be gone afterwards however the inner test ended.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
#: Longest wait for one inner pytest run.
RUN_TIMEOUT = 180

#: Prepended to every inner test file: ``record(**facts)`` appends a JSON line to FACTS.
PRELUDE = """
import json, os, sys

import pytest

FACTS = {facts!r}


def record(**facts):
    with open(FACTS, "a") as f:
        f.write(json.dumps(facts) + "\\n")


def record_device(dev):
    record(pid=dev.pid, socket=dev.socket, url=dev.url, image=dev.image)
"""


class Inner:
    """Runs inner test files with the plugin and reads what they recorded."""

    def __init__(self, pytester: pytest.Pytester):
        self.pytester = pytester
        self.facts_path = pytester.path / "facts.jsonl"

    def write(self, source: str, name: str = "test_inner") -> None:
        self.pytester.makepyfile(**{name: PRELUDE.format(facts=str(self.facts_path)) + source})

    def run(self, *args: str, plugin: bool = True) -> pytest.RunResult:
        extra = ("-p", "l4vctl.pytest_plugin") if plugin else ()
        return self.pytester.runpytest_subprocess(*extra, "-p", "no:cacheprovider", *args, timeout=RUN_TIMEOUT)

    def facts(self) -> list[dict]:
        if not self.facts_path.exists():
            return []
        return [json.loads(line) for line in self.facts_path.read_text().splitlines()]

    def devices(self) -> list[dict]:
        return [f for f in self.facts() if "pid" in f]


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Inner:
    # only the plugin under test (and what -p names) is loaded; l4vctl comes from this checkout
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return Inner(pytester)


def running(pid: int, marker: str) -> bool:
    """Whether process ``pid`` runs (not a zombie) with ``marker`` in its command line (pids get reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return marker.encode() in cmdline and state != "Z"


def assert_gone(devices: list[dict]) -> None:
    """No emulator process of ``devices`` runs and no socket of theirs is left."""
    assert devices, "the inner tests recorded no device"
    for d in devices:
        assert d["pid"] is not None
        assert not running(d["pid"], d["socket"]), f"emulator {d['pid']} ({d['socket']}) still runs"
        assert not os.path.exists(d["socket"]), f"socket {d['socket']} was left behind"


def outcomes(result: pytest.RunResult) -> dict[str, int]:
    return result.parseoutcomes()


# -- I/O through real devices -------------------------------------------------------------------------


def test_block_io_reaches_the_image_in_both_abis_and_modes(inner):
    inner.write("""
import subprocess

from l4vctl.drivers.blk import BlkDriver


@pytest.mark.parametrize("cmd_mode", [False, True])
@pytest.mark.parametrize("abi", ["classic", "current"])
def test_io(l4v_device, abi, cmd_mode):
    dev = l4v_device("blk", size="1M", abi=abi, cmd_mode=cmd_mode)
    record_device(dev)
    assert dev.url == "unix:" + dev.socket and os.path.exists(dev.socket)
    assert os.path.getsize(dev.image) == 1 << 20 and os.path.dirname(dev.image) == str(dev.log_path.parent)
    s = dev.session(handshake=True)
    assert s.abi == abi and s.mode == ("cmd" if cmd_mode else "ipc")
    blk = BlkDriver(s)
    assert blk.capacity == 2048
    data = bytes(range(256)) * 8
    blk.write(100, data)
    blk.flush()
    with open(dev.image, "rb") as f:
        f.seek(100 * 512)
        assert f.read(len(data)) == data
    assert bytes(blk.read(100, len(data))) == data
    stats = dev.stats()  # a monitor, while the driver is attached
    assert stats["driver_attached"] == 1 and stats["queues"][0]["completed"] >= 3
    # the command line, on the same device while the session stays attached: a second driver is refused
    cmd = [sys.executable, "-m", "l4vctl", "blk", "read", dev.url, "--sector", "100", "--count", "4", "--json"]
    busy = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert busy.returncode != 0
    s.close()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["hex"] == data[:2048].hex()
""")
    result = inner.run()
    assert outcomes(result) == {"passed": 4}, result.stdout.str()
    assert_gone(inner.devices())
    assert len(inner.devices()) == 4


def test_net_console_and_rng_devices(inner):
    inner.write("""
from l4vctl.drivers.console import ConsoleDriver
from l4vctl.drivers.net import NetDriver, frame
from l4vctl.drivers.rng import RngDriver


def test_net_cable_and_loop(l4v_device):
    a = l4v_device("net", link="lab")
    b = l4v_device("net", link="lab", mac="52:54:00:00:00:02")
    loop = l4v_device("net", loop=True, abi="classic")
    for dev in (a, b, loop):
        record_device(dev)
    assert a.image is None
    # the cable's name is private to this test, the same for both ends
    name_a, name_b = (d.argv[d.argv.index("--link") + 1] for d in (a, b))
    assert name_a == name_b != "lab"
    na, nb = NetDriver(a.session(handshake=True)), NetDriver(b.session(handshake=True))
    assert nb.mac == bytes.fromhex("525400000002")
    f = frame(nb.mac, na.mac, 0x88B5, b"through the cable".ljust(46, b"."))
    na.send(f)
    assert nb.receive(5) == [f]
    nl = NetDriver(loop.session(handshake=True))
    nl.send(f)
    assert nl.receive(5) == [f]


def test_console_echoes(l4v_device):
    dev = l4v_device("console")
    record_device(dev)
    con = ConsoleDriver(dev.session(handshake=True))
    con.send(b"ping\\n")
    got = b""
    for _ in range(20):
        got += con.receive(0.5)
        if got.endswith(b"ping\\n"):
            break
    assert got == b"ping\\n"


def test_rng(l4v_device):
    dev = l4v_device("rng", abi="classic")
    record_device(dev)
    data = RngDriver(dev.session(handshake=True)).read(256)
    assert len(data) == 256 and len(set(data)) > 16
""")
    result = inner.run()
    assert outcomes(result) == {"passed": 3}, result.stdout.str()
    assert_gone(inner.devices())


# -- faults -------------------------------------------------------------------------------------------


def test_injected_faults(inner):
    inner.write("""
from l4vctl.errors import NegotiationError, ProtocolError, TimeoutExpired, UnavailableError


def test_refused_features_ok(l4v_session, l4v_device):
    with pytest.raises(NegotiationError, match="FEATURES_OK"):
        l4v_session("blk", size="1M", inject="refuse-features-ok")
    dev = l4v_device.devices[-1]
    record_device(dev)
    assert dev.inject == ["refuse-features-ok"]
    assert dev.argv[dev.argv.index("--inject") + 1] == "refuse-features-ok"
    assert dev.alive  # the device refuses; it does not die


def test_several_faults_as_a_list(l4v_device):
    dev = l4v_device("blk", size="1M", inject=["never-clear-cmd", "bad-magic"])
    record_device(dev)
    assert dev.inject == ["never-clear-cmd", "bad-magic"]
    with pytest.raises(ProtocolError, match="bad magic"):
        dev.session()


def test_a_cmd_word_never_cleared(l4v_device):
    dev = l4v_device("blk", size="1M", cmd_mode=True, inject="never-clear-cmd")
    record_device(dev)
    with pytest.raises(TimeoutExpired):
        dev.session(handshake=True, timeout=0.5)


def test_die_on_status(l4v_device):
    dev = l4v_device("blk", size="1M", inject="die-on-status=3")
    record_device(dev)
    with pytest.raises(UnavailableError):
        dev.session(handshake=True)
    assert dev.wait(10) == 70 and not dev.alive
    assert "the emulator dies now" in dev.log


def test_emu_refused_features_ok(l4v_emu):
    emu = l4v_emu("blk", size="1M", abi="classic", inject="refuse-features-ok")
    assert emu.url == "emu:blk?size=1M&abi=classic&inject=refuse-features-ok"
    with pytest.raises(NegotiationError):
        emu.session(handshake=True)
""")
    result = inner.run()
    assert outcomes(result) == {"passed": 5}, result.stdout.str()
    assert_gone(inner.devices())


def test_faults_are_listed_from_the_emulator(inner):
    from l4vctl.emulator.models.base import FAULTS

    result = inner.run("--l4v-faults")
    assert result.ret == 0
    text = result.stdout.str()
    listed = re.findall(r"^  ([a-z-]+)(?:=VALUE)?  ", text, re.M)
    assert listed == list(FAULTS)
    for name, what in FAULTS.items():
        assert what in text, name
    assert "die-on-status=VALUE" in text


# -- teardown -----------------------------------------------------------------------------------------


def test_failing_tests_are_torn_down(inner):
    inner.write("""
from l4vctl.drivers.blk import BlkDriver


def test_fails_with_sessions_open(l4v_device):
    blk = l4v_device("blk", size="1M")
    net = l4v_device("net")
    con = l4v_device("console", abi="classic", cmd_mode=True)
    for dev in (blk, net, con):
        record_device(dev)
    sessions = [dev.session(handshake=True) for dev in (blk, net, con)]
    BlkDriver(sessions[0]).write(0, b"x" * 512)
    blk.session(role="monitor")  # a monitor too
    assert False, "the user's test fails here"


def test_raises_after_killing_one(l4v_device, l4v_session):
    s = l4v_session("rng")
    alive = l4v_device("blk", size="1M")
    dead = l4v_device.devices[0]
    for dev in (dead, alive):
        record_device(dev)
    dead.kill()
    raise RuntimeError("something else went wrong")


def test_emulator_gone_before_teardown(l4v_device):
    dev = l4v_device("blk", size="1M")
    record_device(dev)
    dev.session(handshake=True)
    dev.kill()
    assert os.path.exists(dev.socket)  # a crash leaves its socket; teardown removes it


@pytest.fixture
def users_fixture(l4v_device):
    dev = l4v_device("blk", size="1M")
    record_device(dev)
    yield dev
    raise RuntimeError("the user's fixture fails at teardown")


def test_users_fixture_fails_at_teardown(users_fixture):
    users_fixture.session(handshake=True)
""")
    result = inner.run()
    assert outcomes(result) == {"failed": 2, "passed": 2, "errors": 1}, result.stdout.str()
    out = result.stdout.str()
    # each failing test's report carries the log of each of its emulators
    for name in ("blk0", "net0", "console0"):
        assert f"l4v {name} emulator log (unix:" in out
    assert "emulating console (echo) (classic ABI" in out  # an echo, not the terminal of the run
    assert_gone(inner.devices())
    assert len(inner.devices()) == 7


def test_a_device_that_dies_and_comes_back(inner):
    inner.write("""
from l4vctl.drivers.blk import BlkDriver
from l4vctl.errors import UnavailableError


def test_kill_restart_stop(l4v_device):
    dev = l4v_device("blk", size="1M")
    record_device(dev)
    first = dev.pid
    blk = BlkDriver(dev.session(handshake=True))
    blk.write(7, b"kept".ljust(512, b"\\0"))
    blk.flush()
    assert dev.kill() == -9
    assert not dev.alive and dev.process is None and dev.returncode == -9
    with pytest.raises(UnavailableError):
        blk.read(7, 512)
    assert os.path.exists(dev.socket)
    dev.restart()
    record_device(dev)
    assert dev.alive and dev.pid != first
    again = BlkDriver(dev.session(handshake=True))
    assert bytes(again.read(7, 512))[:4] == b"kept"  # the image outlives the emulator
    assert dev.log.count("emulating blk") == 2
    assert dev.stop() == 0
    assert not os.path.exists(dev.socket)  # a clean end removes the socket
    with pytest.raises(UnavailableError):
        again.read(7, 512)
    dev.restart()
    record_device(dev)
    assert dev.stats()["driver_attached"] == 0
""")
    result = inner.run()
    assert outcomes(result) == {"passed": 1}, result.stdout.str()
    devices = inner.devices()
    assert len({d["pid"] for d in devices}) == 3
    assert_gone(devices)


def test_no_emulator_outlives_a_killed_run(inner):
    inner.write(
        """
def test_k(l4v_device):
    dev = l4v_device("blk", size="1M")
    record_device(dev)
    dev.session(handshake=True)
    os.kill(os.getpid(), 9)  # the whole test run dies: no teardown, no hook
""",
        name="test_k",
    )
    result = inner.run()
    assert result.ret == -9
    devices = inner.devices()
    assert len(devices) == 1
    d = devices[0]
    deadline = time.monotonic() + 20
    while running(d["pid"], d["socket"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert_gone(devices)  # it saw the run end, stopped and removed its socket
    where = os.path.dirname(d["socket"])
    if not where.startswith(str(inner.pytester.path)):
        os.rmdir(where)  # the short directory of a long path: the run died before it could remove it


def test_emulators_run_the_l4vctl_of_the_test_run(inner, tmp_path, monkeypatch):
    # a copy of l4vctl that says where it is imported from; the emulator's environment does not name it
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "l4vctl", copy / "l4vctl", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "l4vctl" / "__init__.py"
    mark = tmp_path / "imported-from"
    init.write_text(init.read_text() + f"\nwith open({str(mark)!r}, 'a') as _f:\n    _f.write(__file__ + '\\n')\n")
    monkeypatch.setenv("PYTHONPATH", str(copy))
    inner.write(
        """
def test_copy(l4v_device, monkeypatch):
    import l4vctl

    monkeypatch.delenv("PYTHONPATH")
    dev = l4v_device("rng")
    record_device(dev)
    record(plugin=l4vctl.__file__)
    dev.session(handshake=True)
"""
    )
    result = inner.run()
    assert outcomes(result) == {"passed": 1}, result.stdout.str()
    assert_gone(inner.devices())
    expected = str(copy / "l4vctl" / "__init__.py")
    assert next(f["plugin"] for f in inner.facts() if "plugin" in f) == expected
    assert mark.read_text().splitlines() == [expected, expected]  # the test run, then its emulator


def test_long_temporary_paths_get_a_short_socket_directory(inner, tmp_path_factory):
    base = tmp_path_factory.mktemp("b" * 60) / ("deep" * 10)
    inner.write("""
from l4vctl.drivers.rng import RngDriver


def test_long(l4v_device, tmp_path):
    dev = l4v_device("rng")
    record_device(dev)
    record(short_dir=os.path.dirname(dev.socket), tmp=str(tmp_path))
    assert len(str(tmp_path / "l4v-rng0.sock")) > 100
    assert len(dev.socket) <= 100 and not dev.socket.startswith(str(tmp_path))
    assert len(RngDriver(dev.session(handshake=True)).read(8)) == 8
""")
    result = inner.run(f"--basetemp={base}")
    assert outcomes(result) == {"passed": 1}, result.stdout.str()
    assert_gone(inner.devices())
    short = next(f for f in inner.facts() if "short_dir" in f)
    assert not os.path.exists(short["short_dir"])


# -- errors -------------------------------------------------------------------------------------------


def test_bad_options_give_clear_errors(inner):
    inner.write("""
from l4vctl.pytest_plugin import L4vDeviceError


def test_caught(l4v_device, l4v_emu, tmp_path):
    with pytest.raises(L4vDeviceError, match=r"'bogus' is not an option of blk devices \\(options: .*size"):
        l4v_device("blk", bogus=1)
    with pytest.raises(L4vDeviceError, match=r"'disk'\\): not a device type \\(types: blk, net, console, rng\\)"):
        l4v_device("disk")
    with pytest.raises(L4vDeviceError, match="is not an option of rng devices"):
        l4v_device("rng", size="1M")
    with pytest.raises(L4vDeviceError, match=r"size: 'huge' is not a size"):
        l4v_device("blk", size="huge")
    with pytest.raises(L4vDeviceError, match=r"ro='maybe': 'maybe' is not a boolean"):
        l4v_device("blk", ro="maybe")
    # what only the emulator knows comes with its stderr and the command
    with pytest.raises(L4vDeviceError) as info:
        l4v_device("blk", size="1M", inject="nope")
    text = str(info.value)
    assert "the emulator exited with status 2 before it listened" in text
    assert "unknown fault 'nope' (faults: refuse-features-ok" in text
    assert "command: python -m l4vctl emulate blk --socket" in text
    with pytest.raises(L4vDeviceError, match="does not exist; give --size to create it"):
        l4v_device("blk", image=tmp_path / "missing.img")
    with pytest.raises(L4vDeviceError, match="did not listen within 0.001 s"):
        l4v_device("rng", start_timeout=0.001)
    for dev in l4v_device.devices:  # none of them is left running
        assert dev.process is None and dev.returncode is not None
    with pytest.raises(L4vDeviceError, match="max_clients: an option of emulator processes"):
        l4v_emu("blk", max_clients=3)
    with pytest.raises(L4vDeviceError, match="'bogus' is not an option of net devices"):
        l4v_emu("net", bogus=1)


def test_uncaught(l4v_device):
    l4v_device("blk", size="1M", inject="nope")
""")
    result = inner.run()
    assert outcomes(result) == {"passed": 1, "failed": 1}, result.stdout.str()
    out = result.stdout.str()
    assert "L4vDeviceError: l4v_device('blk', size='1M', inject='nope'): the emulator exited with status 2" in out
    assert "unknown fault 'nope'" in out
    assert "pytest_plugin.py:" not in out  # the plugin's own frames are hidden
    # said once, in the error (the short summary repeats the whole message when CI is set: not counted)
    failures = out.split("short test summary info")[0]
    assert failures.count("unknown fault 'nope'") == 1 and "emulator log" not in out


# -- options ------------------------------------------------------------------------------------------


def test_verbose_emulators_log_the_device_steps_into_failure_reports(inner):
    inner.write("""
def test_fails(l4v_device):
    l4v_device("blk", size="1M").session(handshake=True)
    assert False
""")
    quiet = inner.run()
    assert outcomes(quiet) == {"failed": 1}
    assert "l4v blk0 emulator log" in quiet.stdout.str()
    assert "status 0x0f" not in quiet.stdout.str()
    loud = inner.run("--l4v-verbose")
    assert outcomes(loud) == {"failed": 1}
    assert re.search(r"l4vctl emulate blk\[\d+\]: status 0x0f", loud.stdout.str())


def test_emu_devices_in_both_abis(inner):
    inner.write("""
from l4vctl.drivers.blk import BlkDriver


@pytest.mark.parametrize("abi", ["classic", "current"])
def test_emu(l4v_emu, abi):
    emu = l4v_emu("blk", size="1M", abi=abi, ro=False, features=["flush"])
    assert emu.url == f"emu:blk?size=1M&abi={abi}&ro=0&features=flush"
    s = emu.session(handshake=True)
    record(pid=s.backend.pid, socket="l4vctl")
    assert s.abi == abi
    blk = BlkDriver(s)
    blk.write(0, b"e" * 512)
    assert bytes(blk.read(0, 512)) == b"e" * 512
    other = emu.session(handshake=True)  # a new device: its own memory
    record(pid=other.backend.pid, socket="l4vctl")
    assert bytes(BlkDriver(other).read(0, 512)) == bytes(512)


def test_zz_the_forked_emulators_were_reaped():
    # while this run still lives: an emulator forked by a test and not reaped is still its child
    pids = {str(json.loads(line)["pid"]) for line in open(FACTS)}
    assert len(pids) == 4
    children = set()
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
            children.update(f.read().split())
    assert not pids & children
""")
    result = inner.run()
    assert outcomes(result) == {"passed": 3}, result.stdout.str()


# -- the plugin in every run --------------------------------------------------------------------------


def test_loading_the_plugin_imports_nothing_heavy(inner):
    code = (
        "import json, sys, pytest; before = set(sys.modules); import l4vctl.pytest_plugin; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) <= {"l4vctl", "l4vctl.pytest_plugin"}
    # in a run: tests that use no l4v_ fixture see no l4vctl module, no option and no report section change
    inner.write("""
@pytest.fixture
def device():
    return "the user's own fixture"


def test_own_fixture(device):
    assert device == "the user's own fixture"
    assert not [m for m in sys.modules if m.startswith("l4vctl.") and m != "l4vctl.pytest_plugin"]


def test_fails_without_devices():
    assert False
""")
    with_plugin = inner.run()
    without = inner.run(plugin=False)
    assert outcomes(with_plugin) == outcomes(without) == {"passed": 1, "failed": 1}
    assert "l4v" not in with_plugin.stdout.str().replace("l4vctl.pytest_plugin", "")


def test_a_leak_checking_suite_sees_no_leak(inner):
    """A suite whose autouse fixture checks each test for new descriptors and child processes (as this
    project's tests/conftest.py does) finds none in tests that use the plugin, pass or fail."""
    inner.pytester.makeconftest(
        """
import os

import pytest


def children():
    out = set()
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
            out.update(f.read().split())
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    fds, kids = set(os.listdir("/proc/self/fd")), children()
    yield
    assert children() <= kids, "child processes left"
    assert set(os.listdir("/proc/self/fd")) <= fds, "descriptors left"
"""
    )
    inner.write(
        """
from l4vctl.drivers.blk import BlkDriver


@pytest.mark.parametrize("fail", [False, True])
def test_devices(l4v_device, l4v_session, l4v_emu, fail):
    dev = l4v_device("blk", size="1M")
    record_device(dev)
    BlkDriver(dev.session(handshake=True)).write(0, b"z" * 512)
    dev.stats()
    l4v_session("rng")
    l4v_emu("console").session(handshake=True)
    dead = l4v_device("net")
    record_device(dead)
    dead.session(handshake=True)
    dead.kill()
    assert not fail
"""
    )
    result = inner.run()
    assert outcomes(result) == {"passed": 1, "failed": 1}, result.stdout.str()
    assert "assert not True" in result.stdout.str()
    assert_gone(inner.devices())


def test_l4vctl_modules_keep_plain_asserts(inner):
    # as pytest marks a package that provides a pytest11 plugin: before the plugin is loaded
    inner.pytester.makepyfile(mark_l4vctl="import pytest\n\npytest.register_assert_rewrite('l4vctl')\n")
    inner.write(
        """
def test_loader():
    import l4vctl.session
    import l4vctl.drivers.blk

    for name in ("l4vctl.session", "l4vctl.drivers.blk"):
        assert type(sys.modules[name].__loader__).__name__ != "AssertionRewritingHook", name
"""
    )
    result = inner.pytester.runpytest_subprocess(
        "-p", "mark_l4vctl", "-p", "l4vctl.pytest_plugin", "-p", "no:cacheprovider", timeout=RUN_TIMEOUT
    )
    assert outcomes(result) == {"passed": 1}, result.stdout.str()
    # and without the plugin, the same marking does rewrite them: the check above can fail
    result = inner.pytester.runpytest_subprocess("-p", "mark_l4vctl", "-p", "no:cacheprovider", timeout=RUN_TIMEOUT)
    assert outcomes(result) == {"failed": 1}, result.stdout.str()
    assert "AssertionRewritingHook" in result.stdout.str()


def test_readme_example_runs(inner):
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- pytest-plugin-example:[^>]*-->\n```python\n(.*?)```", readme, re.S)
    assert found, "README.md has no pytest plugin example"
    inner.pytester.makepyfile(test_readme_example=found.group(1))
    result = inner.run("-v")
    counts = outcomes(result)
    assert set(counts) == {"passed"}, result.stdout.str()
    assert counts["passed"] == len(re.findall(r"PASSED", result.stdout.str())) >= 4


def test_entry_point_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    value = project["entry-points"]["pytest11"]["l4vctl"]
    assert value == "l4vctl.pytest_plugin"
    import importlib

    module = importlib.import_module(value)
    for name in ("l4v_device", "l4v_session", "l4v_emu", "pytest_addoption"):
        assert hasattr(module, name), name


def _installed_from_here() -> bool:
    """Whether the l4vctl that Python finds installed is this checkout (editable or not)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("l4vctl")
    except metadata.PackageNotFoundError:
        return False
    if Path(str(dist.locate_file("l4vctl"))).resolve() == ROOT / "l4vctl":
        return True  # metadata written into this checkout (pip install -e . leaves l4vctl.egg-info here)
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct).get("url", "")
        return url.startswith("file://") and Path(url[7:]).resolve() == ROOT
    return False


# CI installs this checkout (.ci/run): there the check must run
@pytest.mark.skipif(
    not _installed_from_here() and os.environ.get("CI") != "true",
    reason="the installed l4vctl is another checkout (pip install -e .)",
)
def test_installed_entry_point_loads_the_plugin(pytester, monkeypatch):
    from importlib import metadata

    eps = metadata.entry_points(group="pytest11")
    assert [e.value for e in eps if e.name == "l4vctl"] == ["l4vctl.pytest_plugin"]
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.makepyfile(
        test_auto="""
import sys


def test_auto(l4v_device):
    assert l4v_device("rng").url
    import l4vctl.session  # a library module: not rewritten by pytest although l4vctl provides a plugin

    assert type(sys.modules["l4vctl.session"].__loader__).__name__ != "AssertionRewritingHook"
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=RUN_TIMEOUT)
    assert result.parseoutcomes() == {"passed": 1}, result.stdout.str()
