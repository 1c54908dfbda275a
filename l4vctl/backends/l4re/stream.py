"""The byte stream to an agent: a QEMU chardev socket (unix or tcp) or a serial device."""

from __future__ import annotations

import os
import select
import time

from l4vctl.errors import TimeoutExpired, UnavailableError, UsageError

#: Link kinds and what they name.
LINKS = {
    "unix": "unix:PATH — a stream socket, e.g. QEMU's -serial unix:PATH,server=on,wait=off",
    "tcp": "tcp:HOST:PORT — a TCP stream, e.g. QEMU's -serial tcp::PORT,server=on,wait=off",
    "serial": "serial:/dev/ttyXX — a serial device (a real UART on hardware), raw 8N1 at ?baud=",
}

BAUDS = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


class Stream:
    """A non-blocking byte stream: writes wait (bounded) for room, reads take what is there."""

    def __init__(self, fd: int, name: str, owner=None):
        self.fd = fd
        self.name = name
        self._owner = owner  # a socket object that owns ``fd``, kept alive with the stream
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        """The descriptor (for poll)."""
        return self.fd

    def send(self, data: bytes, timeout: float) -> None:
        """Write all of ``data``; TimeoutExpired when the peer takes nothing for ``timeout`` s."""
        view = memoryview(data)
        p = select.poll()
        p.register(self.fd, select.POLLOUT)
        deadline = time.monotonic() + timeout
        while view:
            try:
                n = os.write(self.fd, view)
                view = view[n:]
                deadline = time.monotonic() + timeout  # progress: the peer is reading
                continue
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise UnavailableError(f"{self.name}: the link went away ({exc.strerror})") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutExpired(f"{self.name}: the link took no bytes for {timeout:g} s (stalled)")
            p.poll(max(1, int(left * 1000)))

    def read(self, n: int = 65536) -> bytes:
        """What is there (b"" at end of stream); BlockingIOError if nothing is."""
        return os.read(self.fd, n)

    def close(self) -> None:
        """Close the stream (idempotent)."""
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def open_stream(spec: str, timeout: float, baud: int = 115200) -> Stream:
    """Connect the link ``spec`` (``unix:PATH``, ``tcp:HOST:PORT``, ``serial:DEVICE``)."""
    import socket

    kind, sep, rest = spec.partition(":")
    if not sep or kind not in LINKS or not rest:
        forms = "; ".join(LINKS.values())
        raise UsageError(f"link {spec!r} is not one of: {forms}")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(rest)
        except FileNotFoundError:
            sock.close()
            raise UnavailableError(
                f"{rest}: no such socket (is QEMU running with -serial unix:{rest},server=on?)"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise UnavailableError(f"{rest}: connection refused (nothing listens there)") from None
        except OSError as exc:
            sock.close()
            raise UnavailableError(f"{rest}: {exc.strerror or exc}") from None
        return Stream(sock.fileno(), spec, sock)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if not port.isdigit():
            raise UsageError(f"link {spec!r}: expected tcp:HOST:PORT")
        try:
            sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout)
        except OSError as exc:
            raise UnavailableError(f"{spec}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Stream(sock.fileno(), spec, sock)
    return _open_serial(rest, baud)


def _open_serial(path: str, baud: int) -> Stream:
    import stat
    import termios

    if baud not in BAUDS:
        raise UsageError(f"baud {baud} is not one of {', '.join(map(str, BAUDS))}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UnavailableError(f"{path}: {exc.strerror}") from None
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode) or not os.isatty(fd):
            raise UsageError(f"{path} is not a serial device")
        attrs = termios.tcgetattr(fd)
        speed = getattr(termios, f"B{baud}")
        attrs[0] = 0  # iflag: no translation, no flow control
        attrs[1] = 0  # oflag
        attrs[2] = termios.CS8 | termios.CREAD | termios.CLOCAL  # 8N1
        attrs[3] = 0  # lflag: raw
        attrs[4] = attrs[5] = speed
        attrs[6][termios.VMIN] = 0
        attrs[6][termios.VTIME] = 0
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        termios.tcflush(fd, termios.TCIOFLUSH)
    except termios.error as exc:
        os.close(fd)
        raise UnavailableError(f"{path}: cannot set the line up: {exc}") from None
    except BaseException:
        os.close(fd)
        raise
    return Stream(fd, f"serial:{path}")
