"""``emu:TYPE[?OPT=VALUE&...]`` — an emulator started for one command.

The device is built in this process (so that bad options are reported
here), then a child process forked from this one serves it over one end of
a socket pair while the session talks through the other.  The child ends
when the connection closes; :meth:`EmuBackend.close` reaps it and kills it
if it does not end in time.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from l4vctl.backends.base import Backend, parse_query
from l4vctl.backends.unix import SocketChannel
from l4vctl.errors import UnavailableError, UsageError

#: Seconds a stopped emulator gets to exit by itself (it ends when its connection closes) before SIGKILL.
REAP_TIMEOUT = 0.5


if TYPE_CHECKING:
    from l4vctl.emulator.device import Device


def parse_emu_target(target: str) -> tuple[str, dict[str, str]]:
    """``(type, raw options)`` of ``TYPE[?OPT=VALUE&...]``."""
    if not target.partition("?")[0]:
        raise UsageError("emu: needs a device type (emu:blk, emu:net, emu:console, emu:rng)")
    return parse_query(target, "emu", "?size=64M&abi=classic")


def build_device(kind: str, raw: dict[str, Any]) -> Device:
    """Model and device from a type and raw options; usage errors for bad ones.

    Option values are strings (from a device URL) or values the option
    parsers take as they are (ints and bools from the command line).
    """
    from l4vctl.emulator.device import Device
    from l4vctl.emulator.models import model_class, parse_options

    options = parse_options(kind, raw)
    try:
        model = model_class(kind)(options)
    except ValueError as exc:
        raise UsageError(f"{kind}: {exc}") from None
    if model.num_queues() < model.MIN_QUEUES:
        model.close()
        raise UsageError(f"{kind}: needs at least {model.MIN_QUEUES} queues")
    try:
        return Device(model)
    except ValueError as exc:
        model.close()
        raise UsageError(f"{kind}: {exc}") from None


class EmuBackend(Backend):
    """``emu:TYPE``: a device served by a child process for this session alone."""

    scheme = "emu"

    def __init__(self, url: str, target: str):
        super().__init__(url, target)
        self.kind, self.options = parse_emu_target(target)
        self.pid: int | None = None
        self.exit_status: int | None = None
        self._used = False

    def connect(self, role: str = "driver", timeout: float = 5.0) -> SocketChannel:
        """Build the device, fork its server, HELLO over a socket pair (one connection only)."""
        if self._used:
            raise UnavailableError(f"{self.url}: an embedded emulator serves one connection")
        self._used = True
        device = build_device(self.kind, self.options)
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
        """Reap the emulator process (it ends when its connection closes)."""
        if self.pid is None:
            return
        if not _wait_exit(self.pid, REAP_TIMEOUT):
            os.kill(self.pid, signal.SIGKILL)
        _pid, status = os.waitpid(self.pid, 0)
        self.exit_status = os.waitstatus_to_exitcode(status)
        self.pid = None


def describe_exit(code: int) -> str:
    """How the emulator process ended, from its exit code (negative: the signal that killed it)."""
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
