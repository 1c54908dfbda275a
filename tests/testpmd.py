"""DPDK testpmd as a real vhost-user net back-end, for tests.

testpmd (Debian package dpdk-dev, with the vhost and mempool drivers of
librte-net-vhost23 and librte-mempool-ring23; .ci/run installs them) runs
without hugepages and without PCI devices.  Each ``net_vhost`` port is a
vhost-user server socket; testpmd forwards what one port receives:

* one port, ``--port-topology=loop``, ``--forward-mode=macswap``: every frame
  comes back to its sender with source and destination swapped;
* two ports, ``--port-topology=paired``, ``--forward-mode=io``: what port 0
  receives leaves port 1 unchanged, and the other way round.

testpmd is interactive: its stdin is a pipe held here (``stats()`` writes
``show port stats all`` to it and parses the answer; ``stop()`` writes
``quit``, then terminates and kills it if it lingers).  Its runtime files
(``--file-prefix``) are removed when it stops.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.emu import listening

TESTPMD = shutil.which("dpdk-testpmd")
#: Seconds to wait for testpmd's sockets and for its answers.
START_TIMEOUT = 30.0


def require_testpmd() -> str:
    """testpmd's path; fail under CI (it installs testpmd), skip elsewhere."""
    if TESTPMD:
        return TESTPMD
    if os.environ.get("CI") == "true":
        pytest.fail("dpdk-testpmd is missing (.ci/run installs dpdk-dev, librte-net-vhost23, librte-mempool-ring23)")
    pytest.skip("dpdk-testpmd is not installed (Debian package dpdk-dev)")


def runtime_dirs(prefix: str) -> list[Path]:
    """Where DPDK keeps the runtime files of ``--file-prefix=prefix``."""
    bases = [Path("/var/run/dpdk")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        bases.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "dpdk")
    bases.append(Path("/tmp/dpdk"))
    return [b / prefix for b in bases]


class Testpmd:
    """One testpmd process serving ``ports`` vhost-user sockets in ``directory``."""

    __test__ = False  # a helper, not a test class

    def __init__(self, directory, *, ports: int = 1, queues: int = 1, mode: str = "macswap"):
        exe = require_testpmd()
        self.prefix = f"l4vctl-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.socks = [Path(directory) / f"vhost{i}.sock" for i in range(ports)]
        self.urls = [f"vhost-user:{s}?type=net" for s in self.socks]
        topology = "loop" if ports == 1 else "paired"
        cmd = ["stdbuf", "-oL", exe, "--no-huge", "-m", "512", "--no-pci", "--no-shconf", "-l", "0-1",
               f"--file-prefix={self.prefix}", "--log-level=user1,info"]  # fmt: skip
        for i, sock in enumerate(self.socks):
            cmd += ["--vdev", f"net_vhost{i},iface={sock},queues={queues},client=0"]
        cmd += ["--", "-i", f"--port-topology={topology}", f"--forward-mode={mode}", "--auto-start",
                "--total-num-mbufs=2048", f"--rxq={queues}", f"--txq={queues}"]  # fmt: skip
        self.output: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not all(listening(s) for s in self.socks):
                if self.proc.poll() is not None:
                    raise RuntimeError("testpmd exited: " + self.text()[-2000:])
                if time.monotonic() > deadline:
                    raise RuntimeError("testpmd did not listen on its sockets: " + self.text()[-2000:])
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.output.append(line)

    def text(self) -> str:
        """Everything testpmd printed so far."""
        with self._lock:
            return "".join(self.output)

    def command(self, line: str) -> None:
        """Write one command to testpmd's prompt."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stats(self) -> dict[int, dict[str, int]]:
        """``show port stats all``: RX/TX packet counts per port."""
        mark = len(self.text())
        self.command("show port stats all")
        deadline = time.monotonic() + START_TIMEOUT
        pattern = re.compile(r"NIC statistics for port (\d+).*?RX-packets:\s+(\d+).*?TX-packets:\s+(\d+)", re.S)
        while time.monotonic() < deadline:
            found = pattern.findall(self.text()[mark:])
            if len(found) >= len(self.socks):
                return {int(p): {"rx": int(rx), "tx": int(tx)} for p, rx, tx in found}
            time.sleep(0.02)
        raise RuntimeError("testpmd did not answer 'show port stats all': " + self.text()[-2000:])

    def stop(self) -> None:
        """Quit testpmd (killing it if it lingers) and remove its runtime files and sockets."""
        if self.proc.poll() is None:
            try:
                self.command("quit")
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        for d in runtime_dirs(self.prefix):
            shutil.rmtree(d, ignore_errors=True)
        for s in self.socks:
            try:
                s.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> Testpmd:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
