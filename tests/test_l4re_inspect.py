"""queue-show, --with-memory and diagnose against real L4Re servers behind the bridge: no ring memory there.

The bridge reaches the device's page and the driver's own lent memory, not
the memory a device server maps from another driver: a monitor cannot see
rings there, and says so instead of showing nothing.
"""

from __future__ import annotations

import json

import pytest

from tests.l4re_system import booted
from tests.test_l4re import l4vctl

pytestmark = pytest.mark.l4re


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with booted(tmp_path_factory, "ahci") as s:
        yield s


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


def test_diagnose_gives_page_findings_and_says_what_it_cannot_see(system):
    """cons, l4vio_switch and ahci-drv: no ring memory and no counters through the bridge."""
    for dev in ("con0", "net0", "blk0"):
        p = l4vctl("diagnose", system.url(dev), "--interval", "0.1", "--json")
        assert p.returncode in (0, 6), p.stderr.decode()
        res = json.loads(p.stdout)["result"]
        assert res["looks"] == 2
        assert res["findings"][0]["queue"] is None
        assert "ring memory: l4re: ring memory not reachable through the bridge" in res["notes"]
        assert any("monitor STATS" in n for n in res["notes"])
    p = l4vctl("queue-stats", system.url("blk0"), "--json")  # the devices are still there
    assert p.returncode == 0, p.stderr.decode()
