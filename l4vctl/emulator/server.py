"""The emulator's socket server: frames in, device calls, replies out.

One event loop serves a listening socket (or one pre-connected socket for an
embedded emulator), its clients, the device's kick IRQ and a wake-up pipe for
signals.  One client at a time may be the driver; monitors may watch.
Malformed input is answered with the L4 error the protocol names, or the
client is closed; the loop itself never dies of a client's behaviour.
A :class:`Hub` runs the servers of several devices in one loop and process.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import selectors
import signal
import socket
import stat
import time

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.barrier import full_barrier
from l4vctl.caps import close_fds
from l4vctl.emulator import log
from l4vctl.emulator.device import EMSGTOOSHORT
from l4vctl.emulator.dispatch import EBADPROTO, NO_REPLY, Dispatcher, Reply
from l4vctl.waiting import Spin, peer_pid

EBUSY = -cat.L4_EBUSY
EAGAIN = -cat.L4_EAGAIN
EMSGTOOLONG = -cat.L4_EMSGTOOLONG
#: Longest poll for the driver's next request before sleeping (see l4vctl.waiting).
REQUEST_SPIN = 200e-6
#: Longest stretch of polling one driver's rings before the event loop looks at everyone else.
POLL_SLICE = 5e-3
#: Connections served at once (drivers and monitors); more are refused with -L4_EAGAIN.
MAX_CLIENTS = 128
#: Refused connections kept until they have read their refusal; past that they are closed at once.
MAX_REFUSED = 16
#: Seconds a new connection has to send its HELLO, and a client may leave replies unread.
CLIENT_TIMEOUT = 5.0
#: ioctl: bytes of a socket's send queue its peer has not read (linux/sockios.h; TIOCOUTQ's number)
SIOCOUTQ = 0x5411
#: Replies queued for a client that does not read; one more drops it.
MAX_QUEUED = 64
#: Seconds between sweeps for clients past their deadlines.
SWEEP_INTERVAL = 0.25
#: Listen backlog (the kernel caps it at net.core.somaxconn).
BACKLOG = 512


class Client:
    """One connection: its socket, role once it said HELLO, and replies waiting to be sent."""

    __slots__ = ("sock", "id", "role", "out", "since", "last", "refused")

    def __init__(self, sock: socket.socket, cid: int, now: float, refused: bool = False):
        self.sock = sock
        self.id = cid
        self.role: int | None = None
        self.out: collections.deque = collections.deque()  # (bytes, fds) not yet sent
        self.since = now  # when it connected, or when its oldest unsent reply was queued
        self.last = now  # when it last sent a frame
        self.refused = refused  # over the connection cap: answer HELLO with -L4_EAGAIN, then close


class _Loop:
    """What a serving loop and the hub of several share: ``running``, a wake-up pipe, signals."""

    running: bool
    _wake_w: int

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT end the loop cleanly (the socket files are removed)."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        log.info("signal %d: shutting down", signum)
        self.running = False

    def stop(self) -> None:
        """End the loop, also from another thread: the loop is woken to see it."""
        self.running = False
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass


class Server(_Loop):
    """Serve one device over Unix sockets (several share a process through a :class:`Hub`)."""

    def __init__(self, device, *, listener: socket.socket | None = None, path: str | None = None,
                 connection: socket.socket | None = None, max_clients: int = MAX_CLIENTS,
                 idle_timeout: float = 0.0, client_timeout: float = CLIENT_TIMEOUT,
                 socket_id: tuple[int, int] | None = None):  # fmt: skip
        self.device = device
        self.listener = listener
        self.path = path
        #: (st_dev, st_ino) of the socket file this server made: only that one is removed at the end
        self.socket_id = socket_id
        self.selector = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self.driver: Client | None = None
        self.next_id = 1
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.client_timeout = client_timeout
        # True from the start: a signal that comes before serve() must still end it
        self.running = True
        self._next_sweep = 0.0
        self._sweep_every = min(
            SWEEP_INTERVAL, client_timeout / 4, idle_timeout / 4 if idle_timeout else SWEEP_INTERVAL
        )
        self._accept_paused_until = 0.0
        self._warned: dict[str, float] = {}
        self._reserve_fd = _reserve_fd()
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

    def serve(self) -> None:
        """Serve until stopped (a signal, :meth:`stop`, or the one connection closing)."""
        while self.running:
            self.step(self.wait_time())

    def wait_time(self) -> float | None:
        """How long the loop may sleep before this server needs it again (None: until an event)."""
        timeout = self._sweep_every if (self.clients or self._accept_paused_until) else None
        if self._accept_paused_until:  # wake up when accepting resumes, not a sweep later
            timeout = max(0.0, min(self._sweep_every, self._accept_paused_until - time.monotonic()))
        return timeout

    def sweep_due(self, now: float) -> bool:
        """Whether a client deadline or the end of an accept pause needs a look at ``now``."""
        return bool(self.clients or self._accept_paused_until) and now >= self._next_sweep

    def step(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for events, handle them, then sweep if it is time."""
        for key, events in self.selector.select(timeout):
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
            elif events & selectors.EVENT_WRITE:
                self._flush(what)
            else:
                self._readable(what)
            if not self.running:
                break
        if time.monotonic() >= self._next_sweep:
            self._sweep()
        if self.single and not self.clients:
            self.running = False

    def close(self) -> None:
        """Drop every client, close the listener, remove the socket file this server made."""
        try:
            for client in list(self.clients.values()):
                self._drop(client, "emulator shutting down")
            if self.listener is not None:
                if not self._accept_paused_until:  # a pause has unregistered it already
                    self.selector.unregister(self.listener)
                self.listener.close()
                self.listener = None
        finally:
            if self.path:
                remove_socket(self.path, self.socket_id)
        self.selector.close()
        for fd in (self._wake_r, self._wake_w, self._reserve_fd):
            if fd >= 0:
                close_fds([fd])
        self._reserve_fd = -1

    # -- connections ----------------------------------------------------------------------

    def unwatch(self, fd: int) -> None:
        """Stop watching a model's input (it reached its end)."""
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _model_event(self, callback) -> None:
        """Input for the model (console input, a frame from the link)."""
        model_input(self.device, callback)
        self._poll()

    def _kicked(self) -> None:
        if self.device.kick_irq.drain():
            self.device.kicked()
            if self.idle_timeout and self.driver is not None:
                self.driver.last = time.monotonic()  # a driver doing ring I/O is not idle
        self._poll()

    #: How long _poll waits for more work (made on first use), the driver whose process it was told
    #: (by client id) and when _poll last found work (0: never).
    _spin: Spin | None = None
    _spin_for = 0
    _busy_at = 0.0

    def _poll(self) -> None:
        """Keep serving the driver, its kicks and the rings without sleeping for a while.

        Waking a sleeping process costs tens of microseconds; while the driver
        is busy, polling is cheaper, as long as the driver answers within the
        spin and runs on another CPU (:class:`l4vctl.waiting.Spin` decides).
        Drivers are told that kicks are not needed meanwhile (NO_NOTIFY or
        avail_event); before the server sleeps again it says otherwise and
        looks at the rings once more, so nothing published in between is missed.
        """
        dev = self.device
        spin = self._spin
        if spin is None:
            spin = self._spin = Spin(REQUEST_SPIN)
        driver = self.driver
        if driver is not None and driver.id != self._spin_for:
            self._spin_for = driver.id
            spin.peer = peer_pid(driver.sock)
        now = time.perf_counter()
        if self._busy_at:  # the wait for this work, which came after the server went to sleep
            spin.observe(now - self._busy_at)
        dev.poll_mode(True)
        limit = now + POLL_SLICE  # then let other clients and events in, busy or not

        def one_pass() -> bool | None:
            busy = False
            if dev.kick_irq.drain():
                dev.kicks += 1
                busy = True
            if dev.service():
                busy = True
            driver = self.driver
            if driver is not None and self._handle_one(driver, 0):
                busy = True
            return True if busy else None

        while spin.run(one_pass):  # work came within the spin: wait for more
            now = time.perf_counter()
            if now >= limit:
                break
        self._busy_at = now
        # say "kick me" again, then make sure nothing slipped in meanwhile
        dev.poll_mode(False)
        full_barrier()
        if dev.service():
            # still busy: come back to it right after the others had their turn
            dev.kick_irq.trigger()

    def _warn_once(self, key: str, msg: str, *args) -> None:
        """A warning at most once a second per kind (a flood of bad clients must not flood the log)."""
        now = time.monotonic()
        if now - self._warned.get(key, -10.0) >= 1.0:
            self._warned[key] = now
            log.warning(msg, *args)

    def _accept(self) -> None:
        listener = self.listener
        assert listener is not None  # "accept" events come only from a registered listener
        for _ in range(64):  # a burst of connects, but leave time for the others
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._out_of_fds(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                self._warn_once("accept", "accept failed: %s", exc.strerror or exc)
                return
            self._add_client(conn)
            if self._accept_paused_until:
                return

    def _out_of_fds(self, exc: OSError) -> None:
        """No descriptor left for a new connection: refuse it instead of ending or spinning."""
        self._warn_once("emfile", "cannot accept a connection (%s): closing it; %d clients connected",
                        exc.strerror, len(self.clients))  # fmt: skip
        listener = self.listener
        assert listener is not None  # called from _accept only
        if self._reserve_fd >= 0:
            close_fds([self._reserve_fd])
            self._reserve_fd = -1
            try:
                conn, _addr = listener.accept()
                conn.close()  # the client sees the connection closed during HELLO
            except OSError:
                pass
            self._reserve_fd = _reserve_fd()
            if self._reserve_fd >= 0:
                return
        # no spare descriptor at all: stop accepting for a moment
        self._pause_accept(0.1)

    def _pause_accept(self, seconds: float) -> None:
        if self.listener is not None and not self._accept_paused_until:
            self.selector.unregister(self.listener)
        self._accept_paused_until = time.monotonic() + seconds
        self._next_sweep = min(self._next_sweep, self._accept_paused_until)

    def _add_client(self, conn: socket.socket) -> None:
        now = time.monotonic()
        refused = len(self.clients) >= self.max_clients
        if refused:
            if sum(1 for c in self.clients.values() if c.refused) >= MAX_REFUSED:
                # enough refusals in flight: the rest wait in the listen queue until these are answered
                self._warn_once("cap", "too many connections (%d): new ones wait", len(self.clients))
                self._pause_accept(0.05)
            self._warn_once("cap", "%d connections, the maximum: refusing new ones with -L4_EAGAIN",
                            self.max_clients)  # fmt: skip
        conn.setblocking(False)
        client = Client(conn, self.next_id, now, refused)
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
        while client.out:
            close_fds(client.out.popleft()[1])
        log.info("client %d closed: %s", client.id, why)
        if client is self.driver:
            self.driver = None
            self.device.driver_left()
            log.info("driver left: device reset for the next one")

    def _sweep(self) -> None:
        """Drop clients past their deadlines; resume accepting after a pause."""
        now = time.monotonic()
        self._next_sweep = now + self._sweep_every
        if self._reserve_fd < 0:
            self._reserve_fd = _reserve_fd()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            if self.listener is not None:
                self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        for client in list(self.clients.values()):
            if client.out and now - client.since > self.client_timeout:
                self._drop(client, f"it left replies unread for {self.client_timeout:g} s")
            elif client.role is None and now - client.since > self.client_timeout:
                self._drop(client, f"no HELLO within {self.client_timeout:g} s")
            elif self.idle_timeout and client.role is not None and now - client.last > self.idle_timeout:
                self._drop(client, f"idle for {self.idle_timeout:g} s")

    def _readable(self, client: Client) -> None:
        """Handle the client's frame, then keep polling for a while."""
        self._handle_one(client, None)
        if client is self.driver:
            self._poll()

    def _handle_one(self, client: Client, timeout: float | None) -> bool:
        """Receive and answer one frame; False if none was waiting.

        A client with replies still queued is not read from until it has
        taken them (so one that never reads cannot make the server queue
        without bound); the sockets never block.
        """
        if client.out:
            return False
        try:
            frame = wire.recv(client.sock, 0, any_version=client.role is None)
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
        if self.idle_timeout:
            client.last = time.monotonic()
        try:
            if client.role is None:
                self._hello(client, frame)
            elif frame.kind != cat.KIND_REQUEST:
                log.warning(
                    "client %d sent a %s frame: -L4_EBADPROTO", client.id, cat.KINDS.get(frame.kind, frame.kind)
                )
                self._send(client, cat.KIND_REPLY, frame.seq, EBADPROTO, frame.opcode, Reply(EBADPROTO))
            else:
                try:
                    reply = self._request(client, frame)
                except Exception:
                    log.exception("request label %d opcode %d failed inside the emulator: -L4_EIO",
                                  frame.label, frame.opcode)  # fmt: skip
                    reply = Reply(-cat.L4_EIO)
                if reply is not NO_REPLY:
                    self._send(client, cat.KIND_REPLY, frame.seq, reply.result, frame.opcode, reply)
        finally:
            frame.close_fds()
        return True

    def _send(self, client: Client, kind: int, seq: int, label: int, opcode: int, reply: Reply) -> None:
        """Send a frame, or queue it while the client's socket is full (the queue owns the fds)."""
        data = wire.encode(kind, seq, label, opcode, reply.words, reply.caps)
        fds = list(reply.fds)
        if client.id not in self.clients:
            close_fds(fds)
            return
        if client.out:
            self._queue(client, data, fds)
            return
        try:
            wire.send(client.sock, data, fds)
        except (BlockingIOError, InterruptedError):
            self._queue(client, data, fds)
            return
        except OSError as exc:
            close_fds(fds)
            self._drop(client, f"send failed: {exc.strerror or exc}")
            return
        close_fds(fds)

    def _queue(self, client: Client, data: bytes, fds: list[int]) -> None:
        if len(client.out) >= MAX_QUEUED:
            close_fds(fds)
            self._drop(client, f"it does not read its replies ({MAX_QUEUED} queued)")
            return
        if not client.out:
            client.since = time.monotonic()
            self.selector.modify(client.sock, selectors.EVENT_WRITE, client)
            log.debug("client %d: its socket is full; replies queued", client.id)
        client.out.append((data, fds))

    def _flush(self, client: Client) -> None:
        """The client's socket has room again: send what was queued, then read it again."""
        while client.out:
            data, fds = client.out[0]
            try:
                wire.send(client.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                return  # still full: ``since`` keeps the time of the last progress
            except OSError as exc:
                self._drop(client, f"send failed: {exc.strerror or exc}")
                return
            client.out.popleft()
            client.since = time.monotonic()
            close_fds(fds)
        self.selector.modify(client.sock, selectors.EVENT_READ, client)
        if client.role is None:  # its HELLO was refused; the answer is out now
            self._drop(client, "HELLO refused")
        elif self._handle_one(client, 0) and client is self.driver:  # requests that waited meanwhile
            self._poll()

    def _hello(self, client: Client, frame: wire.Frame) -> None:
        if frame.kind != cat.KIND_HELLO:
            self._drop(client, "first frame is not HELLO")
            return
        lo, hi, role, profile = [*frame.words, cat.WIRE_VERSION, cat.WIRE_VERSION, cat.ROLE_DRIVER, cat.PROFILE_FD][:4]
        result = 0
        if not lo <= cat.WIRE_VERSION <= hi:
            log.warning("client %d speaks wire versions %d..%d, not %d", client.id, lo, hi, cat.WIRE_VERSION)
            result = EBADPROTO
        elif profile != cat.PROFILE_FD or role not in cat.ROLES:
            result = EBADPROTO
        elif client.refused:
            result = EAGAIN
        elif role == cat.ROLE_DRIVER and self.driver is not None:
            log.warning("client %d: a driver is already attached: -L4_EBUSY", client.id)
            result = EBUSY
        if not result:
            # attach before WELCOME goes out: if the client is gone by then, dropping it
            # also detaches it (and resets the device), so nobody is locked out
            client.role = role
            if role == cat.ROLE_DRIVER:
                self.driver = client
            log.info("client %d is a %s", client.id, cat.ROLES[role])
        self._send(client, cat.KIND_WELCOME, frame.seq, result, 0,
                   Reply(result, [cat.WIRE_VERSION, role, cat.MAX_FRAME, self.device.model.DEVICE_ID]))  # fmt: skip
        if result and client.id in self.clients and not client.out:
            self._drop(client, f"HELLO refused ({cat.l4_error_name(result)})")

    # -- requests ---------------------------------------------------------------------------

    def _request(self, client: Client, f: wire.Frame):
        assert client.role is not None  # requests are read only after HELLO set the role
        if f.label == cat.L4VCTL_PROTO_MONITOR and f.opcode == cat.MONITOR_OP_READ and _unread(client.sock):
            # Each READ answers with a fresh copy of up to 64 MiB that lives as long as its reply is
            # unread: a monitor that sends READs without taking the replies gets no second copy.
            log.warning("client %d: READ while its earlier replies are unread: -L4_EBUSY", client.id)
            return Reply(-cat.L4_EBUSY)
        return self.dispatcher.handle(f, client.role, self.driver is not None)


class Hub(_Loop):
    """One event loop for several servers in one process, one server per device.

    Each server keeps what is its own: its listener and socket file, its
    clients and their reply queues, its connection cap, timeouts and spare
    descriptor, its kick IRQ and model inputs, all in its own selector.  The
    hub waits on those selectors at once (an epoll descriptor is itself
    readable while it holds events) and on a wake-up pipe for signals, then
    lets every server with events, or with a deadline due, handle them.
    Signals end every server; :meth:`close` removes every socket file.
    """

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.names: dict[Server, str] = {}
        self.selector = selectors.DefaultSelector()
        # True from the start: a signal that comes before serve() must still end it
        self.running = True
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    def add(self, server: Server, name: str) -> None:
        """Serve ``server`` too; ``name`` prefixes its log lines."""
        self.selector.register(server.selector.fileno(), selectors.EVENT_READ, server)
        self.servers.append(server)
        self.names[server] = name

    def serve(self) -> None:
        """Serve every device until stopped (a signal or :meth:`stop`)."""
        base = log.prefix()
        try:
            while self.running:
                ready = set()
                for key, _events in self.selector.select(self._wait_time()):
                    if key.data is None:
                        try:
                            while os.read(self._wake_r, 512):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        ready.add(key.data)
                now = time.monotonic()
                for server in self.servers:
                    if not self.running:
                        break
                    if server in ready or server.sweep_due(now):
                        log.set_prefix(f"{base} {self.names[server]}")
                        server.step(0)
        finally:
            log.set_prefix(base)

    def _wait_time(self) -> float | None:
        """Until the first server needs the loop without an event (None: none does)."""
        now = time.monotonic()
        waits = []
        for server in self.servers:
            wait = server.wait_time()
            if wait is not None:
                waits.append(max(0.0, min(wait, server._next_sweep - now)))
        return min(waits) if waits else None

    def close(self) -> None:
        """Close every server (each removes its own socket file), then the loop."""
        for server in self.servers:
            try:
                self.selector.unregister(server.selector.fileno())
            except (KeyError, ValueError, OSError):
                pass
            try:
                server.close()
            except Exception:
                log.exception("closing the server of %s failed", self.names[server])
        self.servers.clear()
        self.selector.close()
        close_fds([self._wake_r, self._wake_w])


def model_input(device, callback) -> None:
    """Run a model's input handler: a malformed chain is the device's error, any other failure is logged."""
    from l4vctl.emulator.ring import BadChain

    try:
        callback()
    except BadChain as exc:
        device.device_error(str(exc))
    except Exception:
        log.exception("model input handling failed")


def _unread(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its peer has not read yet (SIOCOUTQ); 0 when it cannot be told."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(sock.fileno(), SIOCOUTQ, buf)
    except OSError:
        return 0
    return int.from_bytes(buf, "little")


def _reserve_fd() -> int:
    """A spare descriptor, given up to accept (and close) a connection when none are left."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


class _DirLock:
    """An exclusive flock on a socket's directory while its file is checked, replaced or removed.

    Emulators started on one path at once take turns, so a stale socket is
    replaced once and exactly one of them ends up listening.
    """

    def __init__(self, path: str):
        self.fd = -1
        try:
            self.fd = os.open(os.path.dirname(os.path.abspath(path)) or "/", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # no lock where the directory cannot be opened; the checks still run

    def __enter__(self):
        if self.fd >= 0:
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break  # a stuck holder must not stop us for good
                    time.sleep(0.002)
                except OSError:
                    break
        return self

    def __exit__(self, *exc):
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1


def remove_socket(path: str, socket_id: tuple[int, int] | None) -> None:
    """Remove the socket file at ``path`` if it is still the one ``socket_id`` names."""
    with _DirLock(path):
        try:
            st = os.lstat(path)
        except OSError:
            return
        if socket_id is not None and (st.st_dev, st.st_ino) != socket_id:
            log.info("%s is another emulator's socket now: left in place", path)
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def listen(
    path: str, backlog: int = BACKLOG, kind: int = socket.SOCK_SEQPACKET
) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at ``path`` with mode 0600, and its file's (dev, inode).

    ``kind`` is SOCK_SEQPACKET (the L4-VIRTIO wire) or SOCK_STREAM (vhost-user).

    A stale socket file (nobody listening) is replaced; a live one or a file
    that is not a socket is an error.  Pass the identity to :class:`Server`
    so that it removes only the file it made.
    """
    from l4vctl.errors import UnavailableError, UsageError

    limit = len(os.fsencode(path))
    if limit >= 108:  # sizeof(sun_path), with its terminating NUL
        raise UsageError(f"cannot listen on {path}: a socket path has at most 107 bytes, this one {limit}")
    with _DirLock(path):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise UnavailableError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise UnavailableError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
            probe.setblocking(False)
            try:
                probe.connect(path)
            except BlockingIOError:
                # a full backlog: somebody is listening
                raise UnavailableError(f"{path} is in use by a running emulator") from None
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    raise UnavailableError(f"{path}: {exc.strerror or exc}") from None
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            else:
                raise UnavailableError(f"{path} is in use by a running emulator")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            st = os.lstat(path)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise UnavailableError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
    return sock, (st.st_dev, st.st_ino)
