"""A Linux guest under QEMU (TCG) that drives vhost-user back-ends, for tests and benchmarks.

Everything comes from Debian packages and is built once per machine under
``~/.cache/l4vctl`` (a file lock keeps concurrent runs apart):

- the kernel: the ``linux-image-*-amd64`` package that ``linux-image-amd64``
  depends on, fetched with ``apt-get download`` and unpacked with
  ``dpkg-deb -x`` (never installed); the bzImage's XZ payload is
  decompressed to the ELF ``vmlinux``, which QEMU boots directly through its
  PVH entry point (no bootloader, no real-mode set-up);
- the initramfs: the static busybox of ``busybox-static`` (the installed
  ``/bin/busybox`` if it is the static one, else the package fetched the same
  way), the virtio modules the guest needs with everything they depend on
  (read from each module's ``.modinfo``: the package ships no
  ``modules.dep``), and an ``/init`` that loads them, runs the checks and
  powers off.

Each boot appends a second cpio archive holding the checks (``/checks/NN-NAME``
shell scripts) to the cached one; the kernel unpacks both.  ``/init`` prints
every check's output on the serial console between markers::

    L4VG begin NAME
    L4VG| a line of output
    L4VG end NAME rc=0

and :func:`parse` turns them into :class:`Check` results.  :meth:`Guest.boot`
always kills QEMU, and every failure carries the serial log.
"""

from __future__ import annotations

import contextlib
import fcntl
import lzma
import os
import re
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"
META = "linux-image-amd64"
#: The modules the guest loads (by name), before their dependencies are added.
WANTED = ("virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "virtio-rng")
#: Bump when the initramfs layout or /init changes: a new cache entry is built.
LAYOUT = 3
MARK = "L4VG"
#: The kernel command line: the serial console, quiet, and a TSC frequency given (TCG on a busy
#: machine cannot calibrate it against the PIT, and microvm has no HPET).
CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off tsc_early_khz=2000000 tsc=reliable"

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
    insmod /lib/modules/$m.ko 2>/tmp/insmod || echo "@M@ insmod $m failed: $(cat /tmp/insmod)"
done
n=0
while [ ! -e /dev/vda ] && [ ! -e /sys/class/net/eth0 ] && [ ! -e /dev/hwrng ] && [ $n -lt 50 ]; do
    sleep 0.02; n=$((n+1))
done
mdev -s 2>/dev/null
dmesg -n 1
echo "@M@ ready $(uname -r)"
failed=0
for f in /checks/*; do
    [ -f "$f" ] || continue
    name=${f##*/}; name=${name#*-}
    echo "@M@ begin $name"
    timeout -s KILL "${L4VG_CHECK_TIMEOUT:-20}" sh "$f" >/tmp/out 2>&1
    rc=$?
    sed 's/^/@M@| /' /tmp/out
    [ -z "$(tail -c 1 /tmp/out)" ] || echo
    echo "@M@ end $name rc=$rc"
    [ $rc = 0 ] || failed=1
done
if [ $failed = 1 ]; then echo "@M@ dmesg"; dmesg | tail -n 40; fi
echo "@M@ done"
sync
poweroff -f
""".replace("@M@", MARK)


class Missing(Exception):
    """Something the guest needs is not on this machine (the message names it)."""


# -- the cache ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "l4vctl"


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 300) -> str:
    try:
        out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise Missing(f"{argv[0]} ({e})") from None
    except subprocess.TimeoutExpired:
        raise Missing(f"{' '.join(argv)} did not finish in {timeout:g} s") from None
    if out.returncode != 0:
        raise Missing(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return out.stdout


def kernel_package() -> str:
    """The versioned kernel package ``linux-image-amd64`` depends on (from the apt lists)."""
    out = _run(["apt-cache", "depends", META], timeout=60)
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise Missing(f"{META} in the apt lists (run apt-get update)")


def download(package: str, dest: Path) -> Path:
    """``apt-get download PACKAGE`` into ``dest``, unpacked there with ``dpkg-deb -x``; the tree."""
    dl = dest / "deb"
    dl.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", "-q", package], cwd=dl)
    debs = sorted(dl.glob(f"{package}_*.deb"))
    if not debs:
        raise Missing(f"apt-get download {package} left no .deb")
    tree = dest / "tree"
    _run(["dpkg-deb", "-x", str(debs[-1]), str(tree)])
    for deb in debs:
        deb.unlink()
    return tree


def is_static_elf(path: Path) -> bool:
    """Whether ``path`` is an ELF executable without a program interpreter."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            phoff, = struct.unpack_from("<Q", head, 32)  # fmt: skip
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def busybox(dest: Path) -> Path:
    """The static busybox: the installed one if it is static, else fetched from ``busybox-static``."""
    installed = Path("/bin/busybox")
    if is_static_elf(installed):
        return installed
    tree = download("busybox-static", dest / "busybox")
    binary = tree / "bin" / "busybox"
    if not is_static_elf(binary):
        raise Missing("a static busybox in the busybox-static package")
    return binary


def vmlinux_from_bzimage(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage (its XZ, gzip or zstd payload, decompressed)."""
    i = bzimage.find(b"\xfd7zXZ\x00")
    if i >= 0:
        out = lzma.LZMADecompressor().decompress(bzimage[i:])
    else:
        i = bzimage.find(b"\x1f\x8b\x08")
        if i < 0:
            raise Missing("an XZ or gzip payload in the kernel image")
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(bzimage[i:])
    if out[:4] != b"\x7fELF":
        raise Missing("an ELF vmlinux in the kernel image's payload")
    return out


def modinfo(ko: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of a kernel module (an ELF64 relocatable) as key -> value."""
    shoff, = struct.unpack_from("<Q", ko, 40)  # fmt: skip
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 58)

    def section(n: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", ko, shoff + n * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, str] = {}
    for n in range(shnum):
        name, off, size = section(n)
        end = ko.index(b"\0", stroff + name)
        if ko[stroff + name : end] == b".modinfo":
            for entry in ko[off : off + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
    return info


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    return data


def module_closure(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """``wanted`` modules and their dependencies, dependencies first: (name, module bytes)."""
    files: dict[str, Path] = {}
    for p in moddir.rglob("*.ko*"):
        name = p.name.split(".ko")[0]
        files[name.replace("-", "_")] = p
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        for line in bfile.read_text().split():
            builtin.add(line.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_"))
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen or key in builtin:
            return
        seen.add(key)
        if key not in files:
            raise Missing(f"kernel module {name} in {moddir}")
        data = _read_module(files[key])
        for dep in filter(None, modinfo(data).get("depends", "").split(",")):
            add(dep)
        order.append((key, data))

    for w in wanted:
        add(w)
    return order


def cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data) entries (mode includes the file type bits)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        out += b"070701" + "".join(f"{v:08X}" for v in fields).encode() + nb
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


DIR, FILE, LINK = 0o040755, 0o100755, 0o120777


def build_initramfs(busybox_bin: Path, modules: list[tuple[str, bytes]]) -> bytes:
    entries: list[tuple[str, int, bytes]] = [(d, DIR, b"") for d in ("bin", "dev", "lib", "lib/modules", "checks")]
    entries.append(("bin/busybox", FILE, busybox_bin.read_bytes()))
    entries.append(("bin/sh", LINK, b"busybox"))
    entries.append(("init", FILE, INIT.encode()))
    entries.append(("modules.order", 0o100644, "".join(f"{n}\n" for n, _ in modules).encode()))
    entries += [(f"lib/modules/{n}.ko", 0o100644, data) for n, data in modules]
    return cpio(entries)


@dataclass
class Image:
    """The cached kernel and initramfs of one kernel package."""

    vmlinux: Path
    initramfs: Path
    release: str


def image() -> Image:
    """The guest's kernel (ELF vmlinux) and base initramfs, built once per kernel package."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise Missing(f"{tool} (a Debian system)")
    try:
        package = kernel_package()
    except Missing:  # no apt lists (offline): an image built before will do
        built = sorted(cache_dir().glob(f"linux-guest-*-{LAYOUT}/.done"), key=lambda p: p.stat().st_mtime)
        if not built:
            raise
        package = built[-1].parent.name[len("linux-guest-") : -len(f"-{LAYOUT}")]
    dest = cache_dir() / f"linux-guest-{package}-{LAYOUT}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".linux-guest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / ".done").exists():
            shutil.rmtree(dest, ignore_errors=True)
            work = dest / "work"
            tree = download(package, work)
            releases = sorted(p.name for p in (tree / "lib" / "modules").iterdir())
            if not releases:
                raise Missing(f"kernel modules in {package}")
            release = releases[-1]
            bz = tree / "boot" / f"vmlinuz-{release}"
            (dest / "vmlinux").write_bytes(vmlinux_from_bzimage(bz.read_bytes()))
            modules = module_closure(tree / "lib" / "modules" / release, WANTED)
            initrd = build_initramfs(busybox(work), modules)
            (dest / "initramfs.cpio").write_bytes(initrd)
            (dest / "release").write_text(release + "\n")
            shutil.rmtree(work)
            (dest / ".done").write_text("ok\n")
    return Image(dest / "vmlinux", dest / "initramfs.cpio", (dest / "release").read_text().strip())


def check_host() -> None:
    if shutil.which(QEMU) is None:
        raise Missing(f"{QEMU} (apt-get install qemu-system-x86)")


# -- a boot ---------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    rc: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


@dataclass
class Result:
    """What one boot printed: the checks by name, the whole serial log, how long it took."""

    checks: dict[str, Check]
    log: str
    seconds: float
    exit_code: int | None
    done: bool = False
    errors: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Check:
        if name not in self.checks:
            raise AssertionError(f"check {name!r} did not run\n--- guest serial log ---\n{self.tail()}")
        return self.checks[name]

    def ok(self, name: str) -> Check:
        """The check ``name``, asserting that it exited 0 (the serial log in the message if not)."""
        c = self[name]
        if c.rc != 0:
            raise AssertionError(f"check {name!r} exited {c.rc}:\n{c.text}\n--- guest serial log ---\n{self.tail()}")
        return c

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    @contextlib.contextmanager
    def explained(self) -> Iterator[Result]:
        """Assertion failures inside get the end of the serial log appended."""
        try:
            yield self
        except AssertionError as e:
            if "--- guest serial log ---" in str(e):
                raise
            raise AssertionError(f"{e}\n--- guest serial log ---\n{self.tail()}") from e


def parse(log: str) -> tuple[dict[str, Check], bool, list[str]]:
    """The checks in a serial log, whether ``/init`` got to the end, and its error lines."""
    checks: dict[str, Check] = {}
    current: Check | None = None
    done = False
    errors = []
    for raw in log.splitlines():
        line = raw.rstrip("\r")
        if line.startswith(f"{MARK}| ") and current is not None:
            current.lines.append(line[len(MARK) + 2 :])
        elif line.startswith(f"{MARK}|") and current is not None:
            current.lines.append("")
        elif line.startswith(f"{MARK} begin "):
            current = Check(line.split(" ", 2)[2], -1, [])
        elif (m := re.match(rf"{MARK} end (\S+) rc=(\d+)$", line)) and current is not None:
            current.rc = int(m.group(2))
            checks[current.name] = current
            current = None
        elif line == f"{MARK} done":
            done = True
        elif line.startswith(f"{MARK} insmod "):
            errors.append(line)
    return checks, done, errors


class GuestError(AssertionError):
    """The guest did not boot, hung or did not finish; the message holds the serial log."""


class Guest:
    """Boots the cached kernel with a set of vhost-user devices and checks.

    ``devices`` are QEMU arguments (see :func:`blk`, :func:`net`, :func:`rng`);
    ``checks`` maps a name to a shell script run by busybox ``sh`` in the guest.
    """

    def __init__(self, img: Image, workdir: Path, mem_mb: int = 256, machine: str = "microvm"):
        self.img = img
        self.workdir = workdir
        self.mem_mb = mem_mb
        self.machine = machine
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "guest-serial.log"

    def command(self, devices: list[str], initrd: Path, append: str = "") -> list[str]:
        mem = f"{self.mem_mb}M"
        if self.machine == "microvm":
            machine = "microvm,acpi=on,pcie=on,rtc=on,pit=on,pic=off,isa-serial=on,memory-backend=mem"
        else:
            machine = "q35,memory-backend=mem"
        cmdline = f"{CMDLINE} {append}".strip()
        return [QEMU, "-machine", machine, "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", mem,
                "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
                "-serial", f"file:{self.log_path}", "-no-reboot",
                "-kernel", str(self.img.vmlinux), "-initrd", str(initrd), "-append", cmdline,
                *devices]  # fmt: skip

    def boot(self, checks: dict[str, str], devices: list[str], timeout: float = 60, append: str = "",
             files: dict[str, bytes] | None = None) -> Result:  # fmt: skip
        """Boot, run ``checks`` in order, wait for the power-off (at most ``timeout`` s); QEMU is always killed.

        ``files`` are put at ``/data/NAME`` in the guest (inputs for the checks).
        """
        initrd = self.workdir / "guest-initrd.cpio"
        entries = [("data", DIR, b"")] + [(f"data/{name}", 0o100644, data) for name, data in (files or {}).items()]
        entries += [
            (f"checks/{i:02d}-{name}", 0o100644, script.encode()) for i, (name, script) in enumerate(checks.items())
        ]
        extra = cpio(entries)
        initrd.write_bytes(self.img.initramfs.read_bytes() + extra)
        self.log_path.write_bytes(b"")
        cmd = self.command(devices, initrd, append)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            try:
                out, _ = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise GuestError(f"the guest did not power off within {timeout:g} s\n{self._log_tail()}") from None
        finally:
            self.kill()
        seconds = time.monotonic() - t0
        log = self.log_path.read_text(errors="replace")
        found, done, errors = parse(log)
        qemu_out = out.decode(errors="replace").strip() if out else ""
        if not done:
            raise GuestError(
                f"the guest stopped before the end of its checks (QEMU exit {self.proc.returncode})"
                f"{': ' + qemu_out if qemu_out else ''}\n--- guest serial log ---\n{log[-6000:]}"
            )
        if errors:
            raise GuestError("\n".join(errors) + f"\n--- guest serial log ---\n{log[-6000:]}")
        return Result(found, log, seconds, self.proc.returncode, done, errors)

    def _log_tail(self) -> str:
        try:
            return "--- guest serial log ---\n" + self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def blk(sock: str | os.PathLike, n: int = 0, queues: int = 1) -> list[str]:
    """QEMU arguments for a vhost-user-blk device on the back-end at ``sock``."""
    return ["-chardev", f"socket,id=blk{n},path={sock}",
            "-device", f"vhost-user-blk-pci,chardev=blk{n},num-queues={queues}"]  # fmt: skip


def net(sock: str | os.PathLike, n: int = 0, mac: str = "52:54:00:12:34:56") -> list[str]:
    """QEMU arguments for a virtio-net device whose back-end is the vhost-user socket ``sock``.

    ``vectors=0``: QEMU 7.2 under TCG crashes in vhost_net_start (setting up the
    MSI-X vector notifiers) with any vhost-user net back-end, DPDK's testpmd as
    well; with INTx it does not.
    """
    return ["-chardev", f"socket,id=net{n},path={sock}", "-netdev", f"vhost-user,id=n{n},chardev=net{n}",
            "-device", f"virtio-net-pci,netdev=n{n},mac={mac},vectors=0"]  # fmt: skip


def rng(sock: str | os.PathLike, n: int = 0) -> list[str]:
    """QEMU arguments for a vhost-user-rng device on the back-end at ``sock``."""
    return ["-chardev", f"socket,id=rng{n},path={sock}", "-device", f"vhost-user-rng-pci,chardev=rng{n}"]


def guest(workdir: Path, machine: str = "microvm") -> Guest:
    """A :class:`Guest` whose files go to ``workdir`` (building the image if needed); raises :class:`Missing`."""
    check_host()
    return Guest(image(), workdir, machine=machine)
