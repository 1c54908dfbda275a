"""``l4vctl check``: the conformance suite against l4vctl's emulator, faulty emulators and qemu-storage-daemon.

l4vctl's own emulator must pass every case (PASS, REJECT or not applicable)
in both ABIs, over IPC and through the cmd word, embedded (emu:) and as a
process (unix:).  Emulators with injected faults get the verdict the fault
earns on the case that meets it, and the run goes on to a summary.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import run_cli
from tests.emu import emulator

GOOD = {"pass", "reject", "not-applicable"}
RING_CASES = {"desc-loop", "head-out-of-range", "next-out-of-range", "buffer-outside-memory"}
CMD_CASES = {"cmd-unknown", "cmd-overwritten-while-pending", "cmd-in-fail-state", "cmd-queue-out-of-range"}


def check(*args: str):
    """``l4vctl check ARGS --json``: (exit status, result, {case: verdict}, {case: detail})."""
    r = run_cli("check", *args, "--json")
    assert r.stdout, r.stderr
    env = r.json()
    assert env["command"] == "check"
    if not env["ok"]:
        return r.code, env, {}, {}
    res = env["result"]
    return r.code, res, {c["name"]: c["verdict"] for c in res["cases"]}, {c["name"]: c["detail"] for c in res["cases"]}


# -- our emulator passes all of it ---------------------------------------------------------------------

CONFORMING = [
    ("emu:blk", ()),
    ("emu:blk?abi=classic", ()),
    ("emu:blk?cmd_mode=on", ("--mode", "cmd")),
    ("emu:blk?abi=classic&cmd_mode=on", ("--mode", "cmd")),
    ("emu:rng", ()),
    ("emu:net", ()),
    ("emu:console", ()),
    ("emu:console?cmd_mode=on&abi=classic", ("--mode", "cmd")),
]


@pytest.mark.parametrize("url,extra", CONFORMING, ids=[u + "".join(e) for u, e in CONFORMING])
def test_the_emulator_passes_every_case(url, extra):
    code, res, verdicts, details = check(url, "--timeout", "2", *extra)
    assert code == 0, details
    assert set(verdicts.values()) <= GOOD, {k: (v, details[k]) for k, v in verdicts.items() if v not in GOOD}
    assert res["ok"] and res["counts"]["fail"] == res["counts"]["wedged"] == res["counts"]["not-run"] == 0
    assert verdicts["handshake"] == verdicts["request"] == verdicts["driver-vanishes"] == "pass"
    # the status order and hostile rings are refused, as the spec says
    for name in ("status-driver-ok-before-features-ok", "status-features-ok-before-driver", "features-unknown-bit",
                 "register-ds-size-beyond", "register-ds-without-dataspace", *RING_CASES):  # fmt: skip
        assert verdicts[name] == "reject", (name, details[name])
    cmd = "--mode" in extra
    assert {verdicts[c] for c in CMD_CASES} == ({"pass"} if cmd else {"not-applicable"})
    # in cmd mode a bad queue leaves no trace but a disabled queue (the emulator's monitor shows it)
    if cmd:
        assert verdicts["queue-size-zero"] == "pass" and "left the queue disabled" in details["queue-size-zero"]
    else:
        assert "-L4_EINVAL" in details["queue-size-zero"]
    assert verdicts["console-rx-starvation"] == ("pass" if "console" in url else "not-applicable")
    if "console" in url:
        assert "32 bytes received" in details["console-rx-starvation"]  # the echo comes back once buffers are posted
    assert res["info"]["device_class"] == url[4:].partition("?")[0]


@pytest.mark.parametrize("abi,mode", [("current", "ipc"), ("classic", "ipc"), ("current", "cmd"), ("classic", "cmd")])
def test_a_running_emulator_passes_every_case(tmp_path, abi, mode):
    args = ["--abi", abi] + (["--cmd-mode"] if mode == "cmd" else [])
    with emulator(tmp_path, "blk", *args) as (url, proc):
        code, res, verdicts, details = check(url, "--mode", mode, "--timeout", "2")
        assert proc.poll() is None  # still serving
    assert code == 0, details
    assert set(verdicts.values()) <= GOOD
    assert res["info"]["abi"] == abi and res["info"]["cmd_config"] == (mode == "cmd")
    # not applicable: ipc: the 4 cmd cases; cmd: the 2 CONFIG_QUEUE IPC cases; both: console starvation
    assert sum(v == "not-applicable" for v in verdicts.values()) == (3 if mode == "cmd" else 5)


# -- faulty emulators: the right case, the right verdict, and the run goes on ----------------------------


def test_a_device_that_refuses_features_ok():
    code, res, verdicts, details = check("emu:blk?inject=refuse-features-ok", "--timeout", "1")
    assert code == 6
    assert verdicts["handshake"] == "fail" and "refused FEATURES_OK" in details["handshake"]
    # what needs a running device is not run; the rest still is, with its own verdicts
    assert verdicts["request"] == "not-run" and "handshake" in details["request"]
    assert verdicts["desc-loop"] == "not-run"
    assert verdicts["features-unknown-bit"] == "reject"
    assert verdicts["status-driver-ok-before-features-ok"] == "reject"
    assert verdicts["register-ds-offset-beyond"] == "reject"
    assert res["counts"]["fail"] == 1 and len(verdicts) == len(res["cases"])


def test_a_device_that_never_answers_config_queue():
    code, _res, verdicts, details = check("emu:blk?inject=no-reply=CONFIG_QUEUE", "--timeout", "0.5")
    assert code == 6
    assert verdicts["handshake"] == "wedged" and "CONFIG_QUEUE" in details["handshake"]
    assert verdicts["config-queue-before-driver"] == "wedged"
    assert verdicts["status-features-ok-before-driver"] == "reject"  # the run goes on
    assert verdicts["register-ds-base-overflow"] == "reject"


def test_a_device_that_dies_on_a_status_write():
    # 0x07 = ACKNOWLEDGE|DRIVER|DRIVER_OK: only the ordering case writes it
    code, res, verdicts, details = check("emu:blk?inject=die-on-status=7", "--timeout", "1")
    assert code == 6
    names = [c["name"] for c in res["cases"]]
    bad = names.index("status-driver-ok-before-features-ok")
    assert verdicts["handshake"] == verdicts["request"] == "pass"
    assert verdicts[names[bad]] == "fail" and "went away" in details[names[bad]]
    for later in names[bad + 1 :]:
        assert verdicts[later] == "not-run", later
        assert details[later] == "not run: the device is gone since case status-driver-ok-before-features-ok"
    assert res["counts"]["not-run"] == len(names) - bad - 1


def test_a_running_emulator_that_dies_is_reported_and_the_suite_finishes(tmp_path):
    with emulator(tmp_path, "blk", "--inject", "die-on-status=7") as (url, proc):
        r = run_cli("check", url, "--timeout", "1")
        assert proc.wait(5) is not None  # the process is gone
    assert r.code == 6 and "Traceback" not in r.stdout + r.stderr
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines() if line.split()[:1]
            and line.split()[0] in {"handshake", "request", "status-driver-ok-before-features-ok", "desc-loop",
                                    "driver-vanishes"}}  # fmt: skip
    assert rows == {"handshake": "PASS", "request": "PASS", "status-driver-ok-before-features-ok": "FAIL",
                    "desc-loop": "NOT-RUN", "driver-vanishes": "NOT-RUN"}  # fmt: skip
    assert "1 FAIL" in r.stdout and r.stdout.splitlines()[-1] == "NOT conforming"


def test_a_cmd_word_that_is_never_cleared():
    code, res, verdicts, details = check("emu:blk?cmd_mode=on&inject=never-clear-cmd", "--mode", "cmd",
                                         "--timeout", "0.5")  # fmt: skip
    assert code == 6
    assert verdicts["handshake"] == "wedged" and "did not consume cmd" in details["handshake"]
    rest = [c for c in res["cases"] if c["name"] != "handshake"]
    assert {c["verdict"] for c in rest} == {"not-run"}
    assert all(c["detail"] == "not run: the device is wedged since case handshake" for c in rest)


# -- output: JUnit, --list, --case, exit statuses ------------------------------------------------------------


def test_junit_has_one_testcase_per_case_and_the_right_counts(tmp_path):
    path = tmp_path / "check.xml"
    code, _res, verdicts, _details = check("emu:blk?inject=die-on-status=7", "--junit", str(path), "--timeout", "1")
    assert code == 6
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == list(verdicts)
    failures = sum(v in ("fail", "wedged") for v in verdicts.values())
    skipped = sum(v in ("not-run", "not-applicable") for v in verdicts.values())
    assert (int(suite.get("tests")), int(suite.get("failures")), int(suite.get("skipped"))) == (
        len(verdicts), failures, skipped)  # fmt: skip
    assert failures == 1 and skipped > 20
    by_name = {c.get("name"): c for c in cases}
    failure = by_name["status-driver-ok-before-features-ok"].find("failure")
    assert failure is not None and failure.get("type") == "fail" and "§5.1" in failure.text
    assert by_name["desc-loop"].find("skipped") is not None
    assert by_name["handshake"].find("failure") is None and by_name["handshake"].find("skipped") is None


def test_junit_of_a_conforming_device_has_no_failures(tmp_path):
    path = tmp_path / "ok.xml"
    r = run_cli("check", "emu:rng", "--junit", str(path))
    assert r.code == 0
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite.get("failures") == "0" and int(suite.get("tests")) == len(suite.findall("testcase"))


def test_list_names_every_case_with_its_rule():
    r = run_cli("check", "--list", "--json")
    assert r.code == 0
    rows = r.json()["result"]["cases"]
    names = [c["name"] for c in rows]
    assert len(names) == len(set(names)) >= 28
    assert all(c["section"].startswith("§") and c["rule"] and c["accept"] for c in rows)
    # destructive cases come last
    flags = [c["destructive"] for c in rows]
    assert flags == sorted(flags) and flags[-1]
    text = run_cli("check", "--list")
    assert text.code == 0 and "desc-loop" in text.stdout and "§5.5" in text.stdout


def test_case_globs_select_cases():
    code, _res, verdicts, _ = check("emu:blk", "--case", "queue-*", "--case", "handshake")
    assert code == 0
    assert list(verdicts) == ["handshake", "queue-size-not-power-of-two", "queue-size-zero",
                              "queue-size-above-num-max", "queue-rings-outside-memory", "queue-misaligned"]  # fmt: skip


def test_a_glob_that_matches_nothing_is_a_usage_error():
    r = run_cli("check", "emu:blk", "--case", "no-such-*")
    assert r.code == 2 and "matches no case" in r.stderr and r.stderr.count("\n") == 1


def test_nothing_listening_is_unavailable(tmp_path):
    r = run_cli("check", f"unix:{tmp_path}/none.sock")
    assert r.code == 3 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_cmd_mode_on_a_device_without_it_is_a_negotiation_error():
    r = run_cli("check", "emu:blk", "--mode", "cmd")
    assert r.code == 5 and "CMD_CONFIG" in r.stderr


def test_text_output_has_a_summary():
    r = run_cli("check", "emu:blk", "--case", "status-*")
    assert r.code == 0
    assert "status-features-ok-before-driver" in r.stdout and "REJECT" in r.stdout
    assert "4 cases in" in r.stdout and "conforming" in r.stdout.splitlines()[-1]


def test_progress_names_each_case_on_stderr():
    r = run_cli("check", "emu:rng", "--case", "handshake", "--case", "request", "--progress")
    assert r.code == 0
    assert "check: [1/2] handshake ..." in r.stderr and "check: [2/2] request: PASS" in r.stderr


# -- qemu-storage-daemon: an independent virtio-blk back-end ---------------------------------------------------


@pytest.fixture
def qsd(tmp_path):
    from tests.test_vhost_user import QSD, StorageDaemon

    if QSD is None and os.environ.get("CI") != "true":
        pytest.skip("needs qemu-storage-daemon (Debian package qemu-system-common)")
    d = StorageDaemon(tmp_path, queues=1)
    yield d
    d.stop()


def test_qemu_storage_daemon(qsd):
    code, _res, verdicts, details = check(qsd.url, "--timeout", "2")
    assert code == 0, details
    assert verdicts["handshake"] == verdicts["request"] == verdicts["driver-vanishes"] == "pass"
    # no status handshake on the vhost-user wire: those cases do not apply
    for name in ("status-driver-ok-before-features-ok", "queue-size-zero", "register-ds-size-beyond", "cmd-unknown"):
        assert verdicts[name] == "not-applicable" and "vhost-user" in details[name]
    # the back-end drops a front-end that posts a malformed chain and serves the next one
    for name in RING_CASES:
        assert verdicts[name] == "reject", (name, details[name])
        assert "ended the connection" in details[name]
    assert qsd.proc.poll() is None


def test_a_saved_page_is_refused(tmp_path):
    page = tmp_path / "page.bin"
    assert run_cli("dump-config", "emu:blk", "--raw", "-o", str(page)).code == 0
    r = run_cli("check", f"dump:{page}")
    assert r.code == 3 and "saved page" in r.stderr and r.stderr.count("\n") == 1


def test_a_device_of_unknown_class_runs_what_needs_no_request(qsd):
    # vhost-user without ?type=: the class is unknown, so no request can be built
    code, _res, verdicts, details = check(qsd.bare_url, "--timeout", "2")
    assert code == 0, details
    assert verdicts["handshake"] == "pass"
    assert verdicts["request"] == "not-applicable" and "device class unknown" in details["request"]
    assert verdicts["desc-loop"] == "not-applicable"


# -- hostile device servers (tests/hostile_device.py): replies that turn bad on cue ---------------------------


def test_a_device_server_that_exits_at_register_ds(tmp_path):
    import select
    import subprocess
    import sys

    from tests.emu import reap

    path = tmp_path / "h.sock"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "tests.hostile_device", "exit@REGISTER_DS", "blk", str(path)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert select.select([proc.stdout], [], [], 20)[0]
        assert proc.stdout.readline().strip() == f"unix:{path}"
        code, res, verdicts, details = check(f"unix:{path}", "--timeout", "2")
    finally:
        reap(proc)
    assert code == 6
    # the handshake lends its rings first: there the server goes
    assert verdicts["handshake"] == "fail" and "went away" in details["handshake"]
    rest = res["cases"][1:]
    assert {c["verdict"] for c in rest} == {"not-run"}
    assert all(c["detail"] == "not run: the device is gone since case handshake" for c in rest)


def test_a_device_server_that_never_answers_register_ds(tmp_path):
    from tests.test_hostile_device import hostile

    with hostile(tmp_path, "silent", "REGISTER_DS", "blk") as url:
        code, _res, verdicts, details = check(url, "--timeout", "0.3")
    assert code == 6
    assert verdicts["handshake"] == "wedged" and "REGISTER_DS" in details["handshake"]
    for name in ("register-ds-offset-beyond", "register-ds-size-beyond", "register-ds-base-overflow"):
        assert verdicts[name] == "wedged", (name, details[name])
    # cases without REGISTER_DS still get their own verdicts
    assert verdicts["status-driver-ok-before-features-ok"] == "reject"
    assert verdicts["config-queue-before-driver"] == "reject"
    assert verdicts["request"] == "not-run"
