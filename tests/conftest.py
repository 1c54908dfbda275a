"""Shared test helpers: run the CLI in-process with an isolated environment."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, settings

from l4vctl.cli import main

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: The environment every CLI test runs in: no colour, fixed width, no
#: settings leaking in from the developer's shell.
CLEAN_ENV = {
    "NO_COLOR": "1",
    "COLUMNS": "80",
    "FORCE_COLOR": None,
    "TERM": "dumb",
    "L4VCTL_ABI": None,
    "L4VCTL_DEBUG": None,
    "L4VCTL_DEVICE": None,
}


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes

    def json(self) -> dict:
        return json.loads(self.stdout)


def run_cli(*args: str, input: bytes | str | None = None, env: dict | None = None) -> Run:
    runner = CliRunner()
    full_env = dict(CLEAN_ENV)
    full_env.update(env or {})
    with runner.isolation(input=input, env=full_env) as (out, err, _mixed):
        code = main([str(a) for a in args])
    raw = out.getvalue()
    return Run(code, raw.decode("utf-8", "replace"), err.getvalue().decode("utf-8", "replace"), raw)


@pytest.fixture
def cli():
    return run_cli


def _children() -> set[int]:
    out: set[int] = set()
    task_dir = f"/proc/{os.getpid()}/task"
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/children") as f:
                out.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return out


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test closes the fds it opens and leaves no child process behind."""
    before_fds = _fds()
    before_children = _children()
    yield
    import gc
    import time

    gc.collect()
    deadline = time.monotonic() + 2
    while _children() - before_children and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _children() - before_children, "the test left child processes running"
    leaked = {fd: target for fd, target in _fds().items() if fd not in before_fds}
    assert not leaked, f"the test leaked file descriptors: {leaked}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a real L4Re system gets the end of that system's log in its report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for value in getattr(item, "funcargs", {}).values():
            tail = getattr(value, "tail", None)
            if callable(tail) and hasattr(value, "com1"):
                rep.sections.append((f"L4Re system log (COM1, {value.com1})", tail(60)))
