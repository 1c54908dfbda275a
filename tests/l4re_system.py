"""A real L4Re system under QEMU with l4vagent on COM2, for tests and benchmarks.

The prebuilt SDK (``../shared/l4re/l4re-sdk-amd64.tar.xz`` beside the
checkout, or ``$L4VCTL_L4RE_SDK``) is unpacked once into a cache directory,
the agent is built against it, and :class:`L4reSystem` boots Fiasco + L4Re
with cons (virtio console ``con0``), l4vio_switch (ports ``net0``, ``net1``)
and a block server (ahci-drv or nvme-drv serving ``disk.img`` as ``blk0``),
all handed to the agent.  COM1 (the system's log) goes to a file, COM2 (the
link) to a unix socket.  Everything is torn down by :meth:`L4reSystem.stop`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT_PKG = ROOT / "l4re" / "agent"
QEMU = "qemu-system-x86_64"

IO_CONFIG = """-- io: COM2 for l4vagent, the PCI storage controller for the block server
Io.hw_add_devices(function()
  L4VCOM2 = Io.Hw.Device(function()
    Property.hid = "L4VCTL-COM2";
    Resource.io = Io.Res.io(0x2f8, 0x2ff);
    Resource.irq = Io.Res.irq(3);
  end);
end);

local hw = Io.system_bus();

Io.add_vbusses
{
  agent = Io.Vi.System_bus(function()
    com2 = wrap(hw:match("L4VCTL-COM2"));
  end);
  blk = Io.Vi.System_bus
  {
    PCI0 = Io.Vi.PCI_bus
    {
      pci_hd = wrap(hw:match("PCI/storage"));
    }
  };
}
"""

NED_SCRIPT = """-- ned: the devices of this system, all handed to l4vagent
local L4 = require("L4");
local l = L4.default_loader;

local cons = l:new_channel();
l:start({ caps = { cons = cons:svr() }, log = L4.Env.log }, "rom/cons -a -c con0");
l.log_fab = cons;

local vbus_agent = l:new_channel();
local vbus_blk = l:new_channel();
l:start({ caps = { agent = vbus_agent:svr(), blk = vbus_blk:svr(), icu = L4.Env.icu,
                   iommu = L4.Env.iommu, sigma0 = L4.Env.sigma0 },
          log = { "io", "r" } },
        "rom/io rom/l4vctl.io");

local sw = l:new_channel();
l:start({ caps = { svr = sw:svr() }, log = { "switch", "b" } }, "rom/l4vio_switch -p 4");

local blk = l:new_channel();
l:start({ caps = { vbus = vbus_blk, svr = blk:svr() }, log = { "blk", "g" } }, "rom/@BLKDRV@");

local caps = { vbus = vbus_agent };
local args = "rom/l4vagent";
local function add(name, cap) caps[name] = cap; args = args .. " " .. name; end
add("con0", cons:create(1, "con0", "g"));
add("net0", sw:create(0, "ds-max=64", "name=net0"));
add("net1", sw:create(0, "ds-max=64", "name=net1"));
local ok, vblk = pcall(function() return blk:create(0, "ds-max=256", "device=@BLKDEV@") end);
if ok then add("blk0", vblk); else print("ned: no block device: " .. tostring(vblk)); end
l:start({ caps = caps, log = { "agent", "c" } }, args);
"""


class Missing(Exception):
    """Something the real system needs is not on this machine (the message names it)."""


def sdk_tarball() -> Path:
    """The SDK tarball: $L4VCTL_L4RE_SDK, or ../shared/l4re/ beside the checkout."""
    env = os.environ.get("L4VCTL_L4RE_SDK")
    candidates = [Path(env)] if env else [ROOT.parent / "shared" / "l4re" / "l4re-sdk-amd64.tar.xz",
                                          Path("/work/shared/l4re/l4re-sdk-amd64.tar.xz")]  # fmt: skip
    for c in candidates:
        if c.is_file():
            return c
    raise Missing(f"the L4Re SDK tarball (looked at {', '.join(map(str, candidates))}; set L4VCTL_L4RE_SDK)")


def check_host() -> None:
    """Raise Missing naming the first host tool the system needs that is absent."""
    for tool in (QEMU, "g++", "make", "gawk", "perl"):
        if shutil.which(tool) is None:
            raise Missing(f"{tool} (apt-get install qemu-system-x86 g++ make gawk perl)")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "l4vctl"


def sdk() -> Path:
    """The unpacked, set-up SDK (unpacked once per tarball, under a lock)."""
    tar = sdk_tarball()
    st = tar.stat()
    key = hashlib.sha256(f"{tar.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / f"l4re-sdk-{key}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        root = dest / "l4re-sdk"
        if not (dest / ".done").exists():
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            with tarfile.open(tar) as t:
                t.extractall(dest, filter="tar") if hasattr(tarfile, "tar_filter") else t.extractall(dest)
            subprocess.run(["sh", str(root / "setup.sh")], check=True, capture_output=True, timeout=60)
            (dest / ".done").write_text("ok\n")
    return root


def build_agent(root: Path, dest: Path) -> Path:
    """Build l4vagent against the SDK (under the cache's lock: checkouts share the object tree)
    and copy it to ``dest``; the copy's path."""
    with open(root.parent.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = subprocess.run(["make", "-s", "-C", str(AGENT_PKG), f"L4DIR={root / 'l4'}", f"O={root / 'obj'}"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        binary = root / "obj" / "bin" / "amd64_gen" / "l4f" / "l4vagent"
        if out.returncode != 0 or not binary.exists():
            raise RuntimeError(f"building l4vagent failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        shutil.copyfile(binary, dest / "l4vagent")
    return dest / "l4vagent"


def disk_pattern(size: int) -> bytes:
    """The initial contents of the test disk: each 512-byte sector names its number."""
    out = bytearray(size)
    for s in range(size // 512):
        tag = f"sector {s:08d} ".encode()
        out[s * 512 : s * 512 + 512] = (tag * (512 // len(tag) + 1))[:512]
    return bytes(out)


class L4reSystem:
    """One booted system; ``link`` is the agent's ``l4re:`` link spec."""

    def __init__(self, workdir: Path, disk: str = "ahci", disk_size: int = 4 << 20):
        check_host()
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root = sdk()
        self.agent = build_agent(self.root, self.dir)
        self.disk_if = disk
        self.disk = self.dir / "disk.img"
        self.disk.write_bytes(disk_pattern(disk_size))
        self.com1 = self.dir / "com1.log"
        self.com1_sock = self.dir / "com1.sock"  # the system's console: input for con0
        self.com2 = self.dir / "com2.sock"
        self._com1: socket.socket | None = None
        self.link = f"unix:{self.com2}"
        self.proc: subprocess.Popen | None = None

    def url(self, dev: str) -> str:
        """The device URL of one of the agent's devices."""
        return f"l4re:{self.link}?dev={dev}"

    def start(self, timeout: float = 60.0) -> L4reSystem:
        """Boot and wait until the agent says it is ready on COM1."""
        boot = self.root / "boot"
        blkdrv, blkdev = ("nvme-drv", "L4BLK0:n1") if self.disk_if == "nvme" else ("ahci-drv -A", "L4BLK0")
        ned = self.dir / "l4vctl.lua"
        ned.write_text(NED_SCRIPT.replace("@BLKDRV@", blkdrv).replace("@BLKDEV@", blkdev))
        io = self.dir / "l4vctl.io"
        io.write_text(IO_CONFIG)
        mods = [f"{boot / 'fiasco'} -serial_esc", str(boot / "sigma0"), f"{boot / 'moe'} rom/l4vctl.lua",
                str(boot / "l4re"), str(boot / "ned"), str(ned), str(io), str(boot / "io"), str(boot / "cons"),
                str(boot / "l4vio_switch"), str(boot / blkdrv.split()[0]), str(self.agent)]  # fmt: skip
        if self.disk_if == "nvme":
            disk = ["-drive", f"file={self.disk},format=raw,if=none,id=d0", "-device", "nvme,serial=L4BLK0,drive=d0"]
        else:
            disk = ["-drive", f"file={self.disk},format=raw,if=none,id=d0",
                    "-device", "ide-hd,drive=d0,bus=ide.0,serial=L4BLK0"]  # fmt: skip
        for p in (self.com1, self.com1_sock, self.com2):
            p.unlink(missing_ok=True)
        cmd = [QEMU, "-machine", "q35", "-m", "512", "-cpu", "max", "-display", "none", "-monitor", "none",
               "-no-reboot", "-nodefaults", "-vga", "none",
               "-chardev", f"socket,id=com1,path={self.com1_sock},server=on,wait=off,logfile={self.com1}",
               "-serial", "chardev:com1", "-serial", f"unix:{self.com2},server=on,wait=off",
               *disk, "-kernel", str(boot / "bootstrap"), "-append", "bootstrap -modaddr 0x01100000",
               "-initrd", ",".join(mods)]  # fmt: skip
        with open(self.dir / "qemu.out", "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}: {self.tail()}")
            if b"l4vagent: ready" in self.log_bytes():
                self._connect_com1()
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the agent did not come up within {timeout:g} s: {self.tail()}")

    def _connect_com1(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.com1_sock))
        self._com1 = sock
        threading.Thread(target=self._drain, args=(sock,), daemon=True).start()

    def type_in(self, data: bytes) -> None:
        """Send ``data`` to the system's console (cons hands it to con0); what comes back is drained."""
        assert self._com1 is not None, "the system is not running"
        self._com1.sendall(data)

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass

    def log_bytes(self) -> bytes:
        try:
            return self.com1.read_bytes()
        except FileNotFoundError:
            return b""

    def log(self) -> str:
        """COM1 so far, colour codes removed."""
        import re

        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_bytes().decode("utf-8", "replace"))

    def tail(self, lines: int = 25) -> str:
        """The end of the log, for failure messages."""
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Kill QEMU at once (the system dies with it)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def pause(self) -> None:
        """Stop QEMU (the link stalls)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]

    def resume(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]

    def stop(self) -> None:
        """End QEMU and remove the link socket."""
        if self._com1 is not None:
            self._com1.close()
            self._com1 = None
        if self.proc is not None:
            self.resume()
            self.kill()
            self.proc = None
        self.com2.unlink(missing_ok=True)
        self.com1_sock.unlink(missing_ok=True)

    def __enter__(self) -> L4reSystem:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def boot(tmp_path_factory, disk: str) -> L4reSystem:
    """A booted system with ``disk`` (ahci or nvme); fails in CI and skips elsewhere when a piece is missing."""
    try:
        system = L4reSystem(tmp_path_factory.mktemp(f"l4re-{disk}"), disk=disk)
    except Missing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the L4Re tests are mandatory in CI, and this machine lacks {exc}")
        pytest.skip(f"needs {exc}")
    return system.start()


@contextlib.contextmanager
def booted(tmp_path_factory, disk: str) -> Iterator[L4reSystem]:
    """:func:`boot`, stopped at the end of the ``with`` block (a module fixture's body)."""
    system = boot(tmp_path_factory, disk)
    try:
        yield system
    finally:
        system.stop()
