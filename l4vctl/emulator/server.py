"""The emulator's socket server: frames in, device calls, replies out.

One event loop serves a listening socket (or one pre-connected socket for an
embedded emulator), its clients, the device's kick IRQ and a wake-up pipe for
signals.  One client at a time may be the driver; monitors may watch.
Malformed input is answered with the L4 error the protocol names, or the
client is closed; the loop itself never dies of a client's behaviour.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import stat
import time

from l4vctl import catalog as cat
from l4vctl.emulator import log
from l4vctl import wire
from l4vctl.barrier import full_barrier
from l4vctl.caps import close_fds
from l4vctl.emulator.device import EMSGTOOSHORT
from l4vctl.emulator.dispatch import EBADPROTO, NO_REPLY, Dispatcher, Reply


EBUSY = -cat.L4_EBUSY
EMSGTOOLONG = -cat.L4_EMSGTOOLONG
#: Seconds to keep polling a client for its next request before sleeping.
REQUEST_SPIN = 200e-6


class Client:
    __slots__ = ("sock", "id", "role")

    def __init__(self, sock: socket.socket, cid: int):
        self.sock = sock
        self.id = cid
        self.role: int | None = None


class Server:
    """Serve one device over Unix sockets."""

    def __init__(self, device, *, listener: socket.socket | None = None, path: str | None = None,
                 connection: socket.socket | None = None):  # fmt: skip
        self.device = device
        self.listener = listener
        self.path = path
        self.selector = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self.driver: Client | None = None
        self.next_id = 1
        self.running = False
        self.single = connection is not None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.selector.register(device.kick_irq.fd, selectors.EVENT_READ, "kick")
        if listener is not None:
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, "accept")
        if connection is not None:
            self._add_client(connection)
        device.server = self
        self.dispatcher = Dispatcher(device)
        for fd, callback in device.model.watch():
            try:
                self.selector.register(fd, selectors.EVENT_READ, ("model", callback))
            except OSError as exc:  # e.g. /dev/null or a regular file as stdin: nothing to wait for
                log.info("input fd %d cannot be watched (%s): no input from it", fd, exc.strerror)

    # -- life cycle -------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT end the loop cleanly (the socket file is removed)."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        log.info("signal %d: shutting down", signum)
        self.running = False

    def stop(self) -> None:
        self.running = False
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def serve(self) -> None:
        self.running = True
        while self.running:
            for key, _events in self.selector.select():
                what = key.data
                if what == "kick":
                    self._kicked()
                elif what == "accept":
                    self._accept()
                elif isinstance(what, tuple):
                    self._model_event(what[1])
                elif what == "wake":
                    try:
                        while os.read(self._wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    self._readable(what)
                if not self.running:
                    break
            if self.single and not self.clients:
                self.running = False

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client, "emulator shutting down")
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            close_fds([fd])

    # -- connections ----------------------------------------------------------------------

    def unwatch(self, fd: int) -> None:
        """Stop watching a model's input (it reached its end)."""
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _model_event(self, callback) -> None:
        """Input for the model (console input, a frame from the link)."""
        from l4vctl.emulator.ring import BadChain

        try:
            callback()
        except BadChain as exc:
            self.device.device_error(str(exc))
        except Exception:  # noqa: BLE001 - a model bug must not take the device down
            log.exception("model input handling failed")
        self._poll()

    def _kicked(self) -> None:
        if self.device.kick_irq.drain():
            self.device.kicked()
        self._poll()

    def _poll(self) -> None:
        """Keep serving the driver, its kicks and the rings without sleeping for a while.

        Waking a sleeping process on another CPU costs tens of microseconds;
        while the driver is busy, polling is cheaper.  Drivers are told that
        kicks are not needed meanwhile (NO_NOTIFY or avail_event); before the
        server sleeps again it says otherwise and looks at the rings once more,
        so nothing published in between is missed.
        """
        dev = self.device
        dev.poll_mode(True)
        end = time.perf_counter() + REQUEST_SPIN
        while time.perf_counter() < end:
            busy = False
            if dev.kick_irq.drain():
                dev.kicks += 1
                busy = True
            if dev.service():
                busy = True
            driver = self.driver
            if driver is not None and self._handle_one(driver, 0):
                busy = True
            if busy:
                end = time.perf_counter() + REQUEST_SPIN
        while True:  # say "kick me" again, then make sure nothing slipped in meanwhile
            dev.poll_mode(False)
            full_barrier()
            if not dev.service():
                break

    def _accept(self) -> None:
        try:
            conn, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._add_client(conn)

    def _add_client(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        client = Client(conn, self.next_id)
        self.next_id += 1
        self.clients[client.id] = client
        self.selector.register(conn, selectors.EVENT_READ, client)
        log.info("client %d connected", client.id)

    def _drop(self, client: Client, why: str) -> None:
        if client.id not in self.clients:
            return
        del self.clients[client.id]
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        log.info("client %d closed: %s", client.id, why)
        if client is self.driver:
            self.driver = None
            self.device.driver_left()
            log.info("driver left: device reset for the next one")

    def _readable(self, client: Client) -> None:
        """Handle the client's frame, then keep polling for a while."""
        self._handle_one(client, None)
        if client is self.driver:
            self._poll()

    def _handle_one(self, client: Client, timeout: float | None) -> bool:
        """Receive and answer one frame; False if none was waiting (timeout 0)."""
        try:
            frame = wire.recv(client.sock, timeout, any_version=client.role is None)
        except TimeoutError:
            return False
        except wire.Closed:
            self._drop(client, "peer closed the connection")
            return False
        except wire.WireError as exc:
            if client.role is None or exc.seq is None:
                self._drop(client, f"malformed frame: {exc}")
            else:
                code = EMSGTOOLONG if "longer" in str(exc) or "more than" in str(exc) else EMSGTOOSHORT
                log.warning("client %d: malformed frame: %s: %s", client.id, exc, cat.l4_error_name(code))
                self._send(client, cat.KIND_REPLY, exc.seq, code, 0, Reply(code))
            return True
        except OSError as exc:
            self._drop(client, f"receive failed: {exc}")
            return False
        try:
            if client.role is None:
                self._hello(client, frame)
            elif frame.kind != cat.KIND_REQUEST:
                log.warning("client %d sent a %s frame: -L4_EBADPROTO", client.id, cat.KINDS.get(frame.kind, frame.kind))
                self._send(client, cat.KIND_REPLY, frame.seq, EBADPROTO, frame.opcode, Reply(EBADPROTO))
            else:
                try:
                    reply = self._request(client, frame)
                except Exception:  # noqa: BLE001 - a bug must not take the device down
                    log.exception("request label %d opcode %d failed inside the emulator: -L4_EIO",
                                  frame.label, frame.opcode)  # fmt: skip
                    reply = Reply(-cat.L4_EIO)
                if reply is not NO_REPLY:
                    self._send(client, cat.KIND_REPLY, frame.seq, reply.result, frame.opcode, reply)
        finally:
            frame.close_fds()
        return True

    def _send(self, client: Client, kind: int, seq: int, label: int, opcode: int, reply: Reply) -> None:
        data = wire.encode(kind, seq, label, opcode, reply.words, reply.caps)
        try:
            wire.send(client.sock, data, reply.fds)
        except OSError as exc:
            self._drop(client, f"send failed: {exc}")
        finally:
            close_fds(reply.fds)

    def _hello(self, client: Client, frame: wire.Frame) -> None:
        if frame.kind != cat.KIND_HELLO:
            self._drop(client, "first frame is not HELLO")
            return
        lo, hi, role, profile = (frame.words + [cat.WIRE_VERSION, cat.WIRE_VERSION, cat.ROLE_DRIVER, cat.PROFILE_FD])[:4]
        result = 0
        if not lo <= cat.WIRE_VERSION <= hi:
            log.warning("client %d speaks wire versions %d..%d, not %d", client.id, lo, hi, cat.WIRE_VERSION)
            result = EBADPROTO
        elif profile != cat.PROFILE_FD or role not in cat.ROLES:
            result = EBADPROTO
        elif role == cat.ROLE_DRIVER and self.driver is not None:
            log.warning("client %d: a driver is already attached: -L4_EBUSY", client.id)
            result = EBUSY
        self._send(client, cat.KIND_WELCOME, frame.seq, result, 0,
                   Reply(result, [cat.WIRE_VERSION, role, cat.MAX_FRAME, self.device.model.DEVICE_ID]))  # fmt: skip
        if result:
            self._drop(client, f"HELLO refused ({cat.l4_error_name(result)})")
            return
        client.role = role
        if role == cat.ROLE_DRIVER:
            self.driver = client
        log.info("client %d is a %s", client.id, cat.ROLES[role])

    # -- requests ---------------------------------------------------------------------------

    def _request(self, client: Client, f: wire.Frame):
        return self.dispatcher.handle(f, client.role, self.driver is not None)


def listen(path: str) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at ``path`` with mode 0600.

    A stale socket file (nobody listening) is replaced; a live one or a file
    that is not a socket is an error.
    """
    from l4vctl.errors import UnavailableError

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise UnavailableError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise UnavailableError(f"{path}: {exc.strerror}") from None
            os.unlink(path)
        else:
            raise UnavailableError(f"{path} is in use by a running emulator")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        size = len(os.fsencode(path))
        if exc.errno is None and size >= 108:  # "AF_UNIX path too long": sun_path holds 107 bytes and a NUL
            from l4vctl.errors import UsageError

            raise UsageError(f"cannot listen on {path}: a socket path has at most 107 bytes, this one {size}",
                             hint="choose a shorter --socket path") from None  # fmt: skip
        raise UnavailableError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(8)
    return sock
