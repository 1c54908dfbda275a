"""queue-show and --with-memory against real L4Re servers behind the bridge: no ring memory there, exit 3.

The bridge reaches the device's page and the driver's own lent memory, not
the memory a device server maps from another driver: a monitor cannot see
rings there, and says so instead of showing nothing.
"""

from __future__ import annotations

import json

import pytest

from tests.test_l4re import boot, l4vctl

pytestmark = pytest.mark.l4re


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    s = boot(tmp_path_factory, "ahci")
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("dev", ["con0", "blk0"])
def test_queue_show_says_why_it_cannot_look(system, dev, tmp_path):
    p = l4vctl("queue-show", system.url(dev), "--queue", "0", "--json")
    assert p.returncode == 3, p.stderr.decode()
    err = json.loads(p.stdout)["error"]
    assert err["message"] == "l4re: ring memory not reachable through the bridge"
    p = l4vctl("dump-config", system.url(dev), "--with-memory", "-o", tmp_path / "x.l4vm")
    assert p.returncode == 3 and b"not reachable through the bridge" in p.stderr
    assert not (tmp_path / "x.l4vm").exists()
    # the device is still there for the next command
    p = l4vctl("queue-stats", system.url(dev), "--json")
    assert p.returncode == 0, p.stderr.decode()
