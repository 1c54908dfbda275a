"""``emu:TYPE[?OPT=VALUE&...]`` — an emulator started for one command.

The device is built in this process (so that bad options are reported
here).  A driver gets a child process forked from this one that serves the
device over one end of a socket pair while the session talks through the
other.  The child ends when the connection closes; :meth:`EmuBackend.close`
reaps it and kills it if it does not end in time.

A monitor (probe, dump-config, queue-stats: read-only, nobody drives the
device) needs no second process: :class:`LocalChannel` hands its requests
to the emulator's own dispatcher in this process, so the page and the
monitor replies are the ones a forked emulator would send, without the fork,
the socket and the server's start-up.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from l4vctl.backends.base import Backend, CapItem, Channel, Response, parse_query
from l4vctl.errors import TimeoutExpired, UnavailableError, UsageError

#: Seconds a stopped emulator gets to exit by itself (it ends when its connection closes) before SIGKILL.
REAP_TIMEOUT = 0.5


if TYPE_CHECKING:
    import socket

    from l4vctl.backends.unix import SocketChannel
    from l4vctl.emulator.device import Device

#: Backends of this process whose emulator may still run (the CLI reaps them before a fast exit).
LIVE: weakref.WeakSet[EmuBackend] = weakref.WeakSet()


def parse_emu_target(target: str) -> tuple[str, dict[str, str]]:
    """``(type, raw options)`` of ``TYPE[?OPT=VALUE&...]``."""
    if not target.partition("?")[0]:
        raise UsageError("emu: needs a device type (emu:blk, emu:net, emu:console, emu:rng)")
    return parse_query(target, "emu", "?size=64M&abi=classic")


def build_device(kind: str, raw: dict[str, Any]) -> Device:
    """An L4-VIRTIO device of ``kind`` from raw options (see :func:`l4vctl.emulator.models.build_device`)."""
    from l4vctl.emulator.device import Device
    from l4vctl.emulator.models import build_device as build

    return build(kind, raw, Device)


class EmuBackend(Backend):
    """``emu:TYPE``: a device served for this session alone (by a child process, for a driver)."""

    scheme = "emu"
    #: Whether a monitor is served in this process (False: by a forked emulator, as a driver is).
    in_process = True

    def __init__(self, url: str, target: str):
        super().__init__(url, target)
        self.kind, self.options = parse_emu_target(target)
        self.pid: int | None = None
        self.exit_status: int | None = None
        self._used = False
        self._local: LocalChannel | None = None

    def connect(self, role: str = "driver", timeout: float = 5.0) -> Channel:
        """Build the device; serve a monitor here, fork a server for a driver (one connection only)."""
        if self._used:
            raise UnavailableError(f"{self.url}: an embedded emulator serves one connection")
        self._used = True
        device = build_device(self.kind, self.options)
        if role == "monitor" and self.in_process and not _acts_on_requests(device):
            self._local = LocalChannel(device, self.url)
            return self._local
        return self._fork(device, role, timeout)

    def _fork(self, device: Device, role: str, timeout: float) -> SocketChannel:
        """Fork the device's server and HELLO over a socket pair."""
        import socket

        from l4vctl.backends.unix import SocketChannel

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            ours.close()
            theirs.close()
            device.close()
            raise UnavailableError(f"cannot start the emulator: {exc.strerror}") from None
        if pid == 0:  # the child: serve, then leave without running the parent's cleanups
            code = 0
            try:
                ours.close()
                from l4vctl.backends.unix import OPEN_CHANNELS

                for other in list(OPEN_CHANNELS):  # the parent's other connections are not ours
                    try:
                        os.close(other.detach())
                    except OSError:
                        pass
                code = _serve_child(device, theirs)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        self.pid = pid
        LIVE.add(self)
        theirs.close()
        device.close()  # the child holds its own copies
        try:
            return SocketChannel(ours, self.url, role, timeout, self._why_dead, peer=pid)
        except BaseException:
            ours.close()
            self.close()
            raise

    def _why_dead(self) -> str | None:
        if self.pid is None:
            return None
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = None
                self.exit_status = os.waitstatus_to_exitcode(status)
                return describe_exit(self.exit_status)
            time.sleep(0.005)
        return None

    def close(self) -> None:
        """Release an in-process device; reap the emulator process (it ends when its connection closes)."""
        if self._local is not None:
            self._local.close()
            self._local = None
        LIVE.discard(self)
        if self.pid is None:
            return
        if not _wait_exit(self.pid, REAP_TIMEOUT):
            import signal

            os.kill(self.pid, signal.SIGKILL)
        _pid, status = os.waitpid(self.pid, 0)
        self.exit_status = os.waitstatus_to_exitcode(status)
        self.pid = None


def _acts_on_requests(device: Device) -> bool:
    """Whether an injected fault changes how requests are answered (then a real emulator serves them)."""
    return "no-reply" in device.faults


class LocalRequest:
    """A request that does not cross a socket: what the dispatcher reads of a frame."""

    __slots__ = ("label", "opcode", "words", "caps", "fds", "kept")

    def __init__(self, label: int, opcode: int, words: Sequence[int], caps: Sequence[Any], fds: Sequence[int]):
        self.label = label
        self.opcode = opcode
        self.words = [w & 0xFFFFFFFFFFFFFFFF for w in words]  # words cross the wire modulo 2^64
        self.caps = list(caps)
        self.fds = [os.dup(fd) for fd in fds]  # as SCM_RIGHTS would: the device gets duplicates
        self.kept: list[int] = []

    def fd_of(self, cap: Any) -> int | None:
        """The descriptor a capability item refers to, if one came with the request."""
        return self.fds[cap.handle] if 0 <= cap.handle < len(self.fds) else None

    def keep(self, fd: int) -> None:
        """The device keeps this descriptor (close_fds spares it)."""
        self.kept.append(fd)

    def close_fds(self) -> None:
        """Close the descriptors the device did not keep."""
        from l4vctl.caps import close_fds

        close_fds(fd for fd in self.fds if fd not in self.kept)
        self.fds = []


class LocalChannel(Channel):
    """A monitor's channel to a device in this process: requests go straight to the emulator's
    dispatcher, replies come back as the socket would bring them (descriptors duplicated)."""

    def __init__(self, device: Device, name: str):
        from l4vctl import catalog as cat
        from l4vctl.emulator.dispatch import Dispatcher

        self.name = name
        self.device: Device | None = device
        self._role = cat.ROLE_MONITOR
        self._dispatcher = Dispatcher(device, cap_item=CapItem)

    def call(self, label: int, opcode: int, words: Sequence[int] = (), caps: Sequence[Any] = (),
             fds: Sequence[int] = (), timeout: float | None = None) -> Response:  # fmt: skip
        """One request, answered by the device as its server would answer a monitor."""
        from l4vctl.emulator.dispatch import NO_REPLY

        if self.device is None:
            raise UnavailableError(f"{self.name}: the connection to the device is closed")
        request = LocalRequest(label, opcode, words, caps, fds)
        try:
            reply = self._dispatcher.handle(request, self._role, False)
        finally:
            request.close_fds()
        if reply is NO_REPLY:
            raise TimeoutExpired(f"{self.name}: no reply (this operation is never answered)")
        return Response(reply.result, [w & 0xFFFFFFFFFFFFFFFF for w in reply.words], reply.caps, reply.fds)

    def close(self) -> None:
        """Release the device (the session's mapping of the page stays valid until it is closed)."""
        if self.device is not None:
            self.device.close()
            self.device = None


def describe_exit(code: int) -> str:
    """How the emulator process ended, from its exit code (negative: the signal that killed it)."""
    import signal

    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the emulator was killed by {name}"
    return f"the emulator exited with status {code}"


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until the process ``pid`` (our child) has exited; False on timeout."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = -1
        if fd >= 0:
            import select

            try:
                p = select.poll()
                p.register(fd, select.POLLIN)
                return bool(p.poll(int(timeout * 1000)))
            finally:
                os.close(fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.002)
    return False


def _serve_child(device: Device, conn: socket.socket) -> int:
    import signal

    from l4vctl.emulator.server import Server

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and closes the socket
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from l4vctl.emulator import log

    log.configure(os.environ.get("L4VCTL_EMU_LOG", "ERROR"), f"l4vctl emu:{device.model.KIND}")
    server = Server(device, connection=conn)
    try:
        server.serve()
    finally:
        server.close()
        device.close()
    return 0
