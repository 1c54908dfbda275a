"""The vhost-user transport of the emulator: l4vctl's device models served to vhost-user front-ends.

``l4vctl emulate TYPE --vhost-user PATH`` listens on a stream socket at
PATH; a front-end (QEMU's vhost-user-blk-pci, ``-netdev vhost-user``,
vhost-user-rng, or l4vctl's own ``vhost-user:`` URL) connects, negotiates
features, sends its memory table and sets the rings up; the same models
that serve L4-VIRTIO drivers (blk, net, rng, console) then serve its rings,
walked by the same :class:`~l4vctl.emulator.ring.DeviceRing` with every
bound checked.  One front-end at a time: when it goes away, the device is
reset and the next one is served.

Rules for what a front-end sends (it is not trusted):

* a message with a bad version, a payload longer than any message has, or
  a connection that stops in the middle of a message for the client
  timeout ends that front-end (one log line); so does a message that does
  not have the payload size its type needs;
* a request the device refuses (an unknown type, a region that cannot be
  mapped, an fd of the wrong kind, vring addresses outside the memory
  table) is logged once and answered with a non-zero ack when the front-end
  asked for one (REPLY_ACK, NEED_REPLY);
* a hostile ring (a head out of range, a loop, a buffer outside the memory
  table) puts the device into an error state: every ring stops, the
  front-end's error eventfds (SET_VRING_ERR) are signalled, the reason is
  logged; the rings serve again once the front-end sets them up anew.

Memory regions must be memfds sealed against shrinking (QEMU's
``memory-backend-memfd`` seals them by default): a peer that truncates
shared memory under the mapping would kill the device with SIGBUS.

Message layouts are the schemas of :mod:`l4vctl.formats.vhost_user`
(through their derived codecs); this module shares no code with the
front-end in :mod:`l4vctl.backends.vhost_user`.
"""

from __future__ import annotations

import array
import itertools
import mmap
import os
import selectors
import socket
import time

from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl.barrier import full_barrier
from l4vctl.caps import PAGE, Irq, close_fds, dataspace_problem
from l4vctl.emulator import log
from l4vctl.emulator.device import Device, Queue, Region
from l4vctl.emulator.ring import BadChain, DeviceRing
from l4vctl.emulator.server import CLIENT_TIMEOUT, _Loop, model_input, remove_socket
from l4vctl.errors import FormatError
from l4vctl.formats.fast import codec
from l4vctl.formats.fast import ring as ring_geometry

_HEADER = codec("vhost_user_header").struct
_U64 = codec("vhost_user_u64").struct
_STATE = codec("vhost_vring_state").struct
_ADDR = codec("vhost_vring_addr").struct
_MEM_HDR = codec("vhost_user_memory_hdr").struct
_REGION = codec("vhost_user_memory_region").struct
_CONFIG_HDR = codec("vhost_user_config_hdr").struct
HEADER_SIZE = _HEADER.size

# Message types the back-end answers beyond those the catalog names for the front-end
# (numbers from the vhost-user specification).
RESET_OWNER = 4
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_ERR = 14
SET_CONFIG = 25
RESET_DEVICE = 34
REQUEST_NAMES = {
    **cat.VHOST_USER_REQUESTS, RESET_OWNER: "RESET_OWNER", SET_LOG_BASE: "SET_LOG_BASE", SET_LOG_FD: "SET_LOG_FD",
    SET_VRING_ERR: "SET_VRING_ERR", SET_CONFIG: "SET_CONFIG", RESET_DEVICE: "RESET_DEVICE",
}  # fmt: skip
#: Protocol features offered: several queues, acks, the config space.
PROTOCOL_FEATURES = (
    (1 << cat.VHOST_USER_PROTOCOL_F_MQ)
    | (1 << cat.VHOST_USER_PROTOCOL_F_REPLY_ACK)
    | (1 << cat.VHOST_USER_PROTOCOL_F_CONFIG)
)
#: The largest device config window (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG = 256
#: Longest payload a message may carry (the largest real one, a full memory table, is 264 bytes).
MAX_PAYLOAD = cat.VHOST_USER_MAX_PAYLOAD
#: File descriptors a message may carry.
MAX_FDS = cat.VHOST_USER_MAX_REGIONS
#: Messages handled per readable event before the loop looks at kicks and the others again.
BATCH = 64
#: Reply bytes queued for a front-end that does not read them; more drops it.
MAX_OUT = 64 * 1024
#: How often queues without a kick fd (NOFD) are looked at.
POLL_INTERVAL = 1e-3
#: Longest stretch of serving one queue before the loop looks at the others (it comes back at once).
SLICE = 5e-3
_ANC = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class Drop(Exception):
    """The front-end broke the protocol: the connection ends (the device is reset for the next one)."""


class Refused(Exception):
    """The device refuses a request (logged; a non-zero ack if the front-end asked for one)."""


def request_name(request: int) -> str:
    """The name of a message type, or its number."""
    return REQUEST_NAMES.get(request, f"request {request}")


class VhostQueue(Queue):
    """A queue as vhost-user sets it up: size, base, front-end addresses, kick/call/err eventfds."""

    __slots__ = ("user_addrs", "num_set", "base", "kick", "call", "err", "started", "ring_enabled", "polled", "failed")

    def __init__(self, index: int):
        self.kick: Irq | None = None
        self.call: Irq | None = None
        self.err: Irq | None = None
        super().__init__(index)
        self.forget()

    def forget(self) -> None:
        """Back to what a new front-end finds: nothing set up, no fds."""
        self.disable()
        self.user_addrs: tuple[int, int, int] | None = None  # desc, used, avail (front-end addresses)
        self.num_set = 0  # SET_VRING_NUM
        self.base = 0
        self.started = False  # a kick fd (or NOFD) came: the ring runs
        self.ring_enabled = False
        self.polled = False
        self.failed = False
        for irq in (self.kick, self.call, self.err):
            if irq is not None:
                irq.close()
        self.kick = self.call = self.err = None


class MappedRegion(Region):
    """A memory-table region: guest-physical ``base`` (for descriptors), the front-end's own address
    (for SET_VRING_ADDR) and the mapping (``mmap_offset`` into the fd)."""

    __slots__ = ("user",)

    def __init__(self, base: int, size: int, user: int, mm: mmap.mmap):
        super().__init__(base, size, True, mm)
        self.user = user
        self.view = self.view[:size]  # the mapping is rounded up to whole pages


class VhostDevice:
    """One device model behind the vhost-user protocol.

    It offers what the DeviceRing walker and the models expect of a device
    (negotiated features, regions, fault countdowns, ``queues``) and keeps
    the vhost-user state: features, protocol features, memory table, rings.
    """

    # The address lookups of the L4-VIRTIO device work on the same region list.
    _region = Device._region
    region_of = Device._region
    last_region = Device.last_region
    translate = Device.translate
    translate_any = Device.translate_any
    negotiated_bit = Device.negotiated_bit

    def __init__(self, model, kind: str):
        self.model = model
        model.device = self
        self.kind = kind
        opts = model.options
        self.abi = cat.Abi.CURRENT
        self.attach = "vhost-user"
        self.cmd_mode = False
        self.faults = dict(opts["inject"])
        self.max_regions = min(opts["max_regions"], cat.VHOST_USER_MAX_REGIONS)
        self.num_max = model.num_max()
        self.num_queues = model.num_queues()
        self.offered = self._offered_bits()
        #: the vhost-user feature word: the device's bits and PROTOCOL_FEATURES
        self.features_word = sum(1 << b for b in self.offered) | (1 << cat.VHOST_USER_F_PROTOCOL_FEATURES)
        self.config_bytes = self._config_bytes()
        self.server: VhostUserServer | None = None
        self.queues = [VhostQueue(i) for i in range(self.num_queues)]
        self.regions: list[MappedRegion] = []
        self._last_region: MappedRegion | None = None
        self.kicks = self.irqs_sent = self.device_errors = 0
        self.last_error = ""
        self.polling = False
        self.more = False  # service() stopped with requests left (the server calls it again at once)
        self._arm_faults()
        self.forget()

    def _arm_faults(self) -> None:
        """Start the countdowns of the injected faults (again for every front-end)."""
        f = self.faults
        self.completions_left: int | None = f.get("stop-completing")
        self.irqs_left: int | None = f.get("drop-irqs")
        self.reset_at: int | None = f.get("needs-reset-at")

    def _offered_bits(self) -> set[int]:
        m = self.model
        # EVENT_IDX and INDIRECT_DESC: the ring walker handles both, and QEMU's front-ends (vhost-user-rng)
        # pass the guest's acceptance of them on without asking the back-end first
        bits = set(m.features()) | {cat.VERSION_1_BIT, cat.EVENT_IDX_BIT, cat.INDIRECT_DESC_BIT}
        by_name = cat.feature_names(cat.Abi.CURRENT, m.DEVICE_ID)
        for item in m.options["features"]:
            bit = cat.feature_bit(item, by_name)
            if bit is None or bit >= 64:
                raise ValueError(f"unknown feature {item!r} for a {m.KIND} device")
            bits.add(bit)
        return bits

    def _config_bytes(self) -> bytes:
        """The device config space as the model describes it (the virtio layout)."""
        m = self.model
        dc = pg.device_config_codec(m.DEVICE_ID, cat.Abi.CURRENT)
        if dc is None or not dc.size:
            return b""
        profile = m.profile
        config = {**m.config(), **(profile.config if profile is not None else {})}
        page = pg.build_page(cat.Abi.CURRENT, m.DEVICE_ID, device_config=config, num_queues=0)
        return bytes(page[pg.HEADER_SIZE : pg.HEADER_SIZE + dc.size])

    # -- state --------------------------------------------------------------------------

    def forget(self) -> None:
        """A new front-end: nothing negotiated, no memory, no rings, the model reset."""
        for q in self.queues:
            q.forget()
        self.model.reset()
        self.unmap()
        self.negotiated: set[int] = set()
        self.acked = 0  # the feature word of SET_FEATURES
        self.protocol = 0  # protocol features agreed on
        self.owner = False
        self._arm_faults()

    def unmap(self) -> None:
        """Drop the memory table (the rings that use it stop first)."""
        for region in self.regions:
            region.close()
        self.regions = []
        self._last_region = None

    def has_protocol(self, bit: int) -> bool:
        """True if protocol feature ``bit`` was agreed on."""
        return bool(self.protocol >> bit & 1)

    def has_acked_protocol(self) -> bool:
        """True if the front-end kept PROTOCOL_FEATURES in SET_FEATURES (rings then start disabled)."""
        return bool(self.acked >> cat.VHOST_USER_F_PROTOCOL_FEATURES & 1)

    def notify(self, bits: int) -> bool:
        """A device-wide interrupt: vhost-user has none without a back-end channel."""
        return False

    def queue_notifier(self, queue: VhostQueue):
        """How the ring walker interrupts the front-end for ``queue``: its call eventfd."""

        def interrupt() -> bool:
            call = queue.call
            if call is None:
                return False
            call.trigger()
            self.irqs_sent += 1
            return True

        return interrupt

    # -- rings ----------------------------------------------------------------------------

    def user_view(self, addr: int, length: int) -> memoryview | None:
        """The bytes at front-end address ``addr`` if one region of the table holds them all."""
        for region in self.regions:
            if region.user <= addr and addr + length <= region.user + region.size:
                start = addr - region.user
                return region.view[start : start + length]
        return None

    def start_ring(self, q: VhostQueue) -> None:
        """Map the rings of a started queue through the memory table (Refused if they do not fit)."""
        self.stop_views(q)
        if q.user_addrs is None:
            raise Refused(f"queue {q.index}: started before SET_VRING_ADDR")
        num = q.num_set
        if num == 0 or num > self.num_max or num & (num - 1):
            raise Refused(f"queue {q.index}: size {num} is not a power of two in 1..{self.num_max}")
        desc, used, avail = q.user_addrs
        if desc % cat.DESC_ALIGN or avail % cat.AVAIL_ALIGN or used % cat.USED_ALIGN:
            raise Refused(f"queue {q.index}: misaligned rings desc={desc:#x} avail={avail:#x} used={used:#x}")
        r = ring_geometry()
        dv = self.user_view(desc, r.desc_size(num))
        av = self.user_view(avail, r.avail_size(num))
        uv = self.user_view(used, r.used_size(num))
        for what, addr, size, view in (("descriptor table", desc, r.desc_size(num), dv),
                                       ("available ring", avail, r.avail_size(num), av),
                                       ("used ring", used, r.used_size(num), uv)):  # fmt: skip
            if view is None:
                raise Refused(f"queue {q.index}: {what} {addr:#x}+{size:#x} is not inside one region of the "
                              f"memory table")  # fmt: skip
        assert dv is not None and av is not None and uv is not None
        q.num = num
        q.views = r.views_of(num, dv, av, uv)
        q.next_avail = q.base
        q.enabled = True
        q.ring = DeviceRing(self, q)
        q.signalled = q.views.used_idx[0]
        q.ring.suppress_kicks(False)  # kicks wanted from next_avail on (avail_event with EVENT_IDX)
        log.info("queue %d running: num %d base %d desc %#x avail %#x used %#x", q.index, num, q.base, desc, avail,
                 used)  # fmt: skip

    def stop_views(self, q: VhostQueue) -> None:
        """Forget a queue's ring views (publishing what the model completed first)."""
        ring = q.ring
        if ring is not None and ring.pending:
            try:
                ring.publish()
            except Exception:  # the memory may be gone; the completions go with it
                pass
        views = q.views
        base = q.next_avail
        q.disable()
        q.next_avail = base
        if views is not None:
            views.release()

    def remap_running(self) -> None:
        """A new memory table: map the rings of running queues again (an error state for those that no longer fit)."""
        for q in self.queues:
            if q.started and not q.failed:
                base = q.next_avail if q.ring is not None else q.base
                q.base = base
                try:
                    self.start_ring(q)
                except Refused as exc:
                    self.queue_error(q, str(exc))

    def queue_error(self, q: VhostQueue, reason: str) -> None:
        """Queue ``q`` cannot run: logged, stopped, the front-end's error eventfd signalled."""
        log.warning("queue %d error: %s", q.index, reason)
        self.last_error = reason
        self.queue_failed(q)

    def queue_failed(self, q: VhostQueue) -> None:
        """Queue ``q`` cannot run (the caller logs why): stopped, the front-end's error eventfd signalled."""
        self.stop_views(q)
        q.failed = True
        if q.err is not None:
            q.err.trigger()

    def device_error(self, reason: str) -> None:
        """A hostile ring: every ring stops (an error state until the front-end sets them up again)."""
        self.device_errors += 1
        self.last_error = reason
        log.warning("device error: %s: every ring stopped until the front-end sets them up again", reason)
        self.model.reset()
        for q in self.queues:
            if q.started:
                self.stop_views(q)
                q.failed = True
                if q.err is not None:
                    q.err.trigger()

    def service(self) -> bool:
        """Serve every running, enabled queue; True if there was work."""
        busy = False
        faults = self.faults
        if faults and faults.get("ignore-kicks"):
            return False
        event_idx = cat.EVENT_IDX_BIT in self.negotiated
        self.more = False
        limit = time.perf_counter() + SLICE
        for q in self.queues:
            ring = q.ring
            if ring is None or not q.ring_enabled:
                continue
            try:
                while True:
                    before = q.next_avail
                    if ring.available():
                        self.model.process(q, ring)
                    if ring.pending or ring.unsignalled is not None:
                        ring.publish()
                        busy = True
                    elif q.next_avail != before:
                        busy = True
                    if not event_idx:
                        break
                    # EVENT_IDX: ask for a kick at the next new request, then look once more for
                    # requests published before the driver could see that
                    ring.suppress_kicks(False)
                    full_barrier()
                    if q.next_avail == before or not ring.available():
                        break
                    if time.perf_counter() > limit:  # more work: the server comes back at once
                        self.more = True
                        break
            except BadChain as exc:
                self.device_error(str(exc))
                return True
        return busy

    def close(self) -> None:
        """Release rings, fds, memory and the model."""
        for q in self.queues:
            q.forget()
        self.unmap()
        self.model.close()


class Connection:
    """The front-end's connection: a message being read, replies not yet sent."""

    __slots__ = ("sock", "head", "body", "size", "fds", "since", "out", "out_since", "id")

    def __init__(self, sock: socket.socket, cid: int):
        self.sock = sock
        self.id = cid
        self.head = bytearray()
        self.body = bytearray()
        self.size = -1  # payload size, once the header is complete
        self.fds: list[int] = []
        self.since = 0.0  # when the message being read began (0: none)
        self.out = bytearray()
        self.out_since = 0.0


def _fds_of(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _payload(body: bytes, struct, name: str):
    if len(body) != struct.size:
        raise Drop(f"{name} with a {len(body)}-byte payload (it has {struct.size})")
    return struct.unpack(body)


class VhostUserServer(_Loop):
    """Serve one device to vhost-user front-ends on a stream socket (one at a time)."""

    def __init__(self, device: VhostDevice, listener: socket.socket, path: str,
                 socket_id: tuple[int, int] | None = None, client_timeout: float = CLIENT_TIMEOUT):  # fmt: skip
        self.device = device
        device.server = self
        self.listener: socket.socket | None = listener
        self.path = path
        self.socket_id = socket_id
        self.client_timeout = client_timeout
        self.selector = selectors.DefaultSelector()
        self.running = True
        self.conn: Connection | None = None
        self.next_id = 1
        self._next_sweep = 0.0
        self._warned: dict[str, float] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, ("accept", None))
        self.handlers = {
            cat.VHOST_USER_GET_FEATURES: self._get_features,
            cat.VHOST_USER_SET_FEATURES: self._set_features,
            cat.VHOST_USER_SET_OWNER: self._set_owner,
            RESET_OWNER: self._reset_owner,
            RESET_DEVICE: self._reset_owner,
            cat.VHOST_USER_GET_PROTOCOL_FEATURES: self._get_protocol_features,
            cat.VHOST_USER_SET_PROTOCOL_FEATURES: self._set_protocol_features,
            cat.VHOST_USER_GET_QUEUE_NUM: self._get_queue_num,
            cat.VHOST_USER_SET_MEM_TABLE: self._set_mem_table,
            cat.VHOST_USER_SET_VRING_NUM: self._set_vring_num,
            cat.VHOST_USER_SET_VRING_BASE: self._set_vring_base,
            cat.VHOST_USER_SET_VRING_ADDR: self._set_vring_addr,
            cat.VHOST_USER_GET_VRING_BASE: self._get_vring_base,
            cat.VHOST_USER_SET_VRING_KICK: self._set_vring_kick,
            cat.VHOST_USER_SET_VRING_CALL: self._set_vring_call,
            SET_VRING_ERR: self._set_vring_err,
            cat.VHOST_USER_SET_VRING_ENABLE: self._set_vring_enable,
            cat.VHOST_USER_GET_CONFIG: self._get_config,
            SET_CONFIG: self._set_config,
        }
        #: message types that always have a reply
        self.with_reply = {cat.VHOST_USER_GET_FEATURES, cat.VHOST_USER_GET_PROTOCOL_FEATURES,
                           cat.VHOST_USER_GET_QUEUE_NUM, cat.VHOST_USER_GET_VRING_BASE,
                           cat.VHOST_USER_GET_CONFIG}  # fmt: skip
        for fd, callback in device.model.watch():
            try:
                self.selector.register(fd, selectors.EVENT_READ, ("model", callback))
            except OSError as exc:
                log.info("input fd %d cannot be watched (%s): no input from it", fd, exc.strerror)

    # -- loop ---------------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until stopped (a signal or :meth:`stop`)."""
        while self.running:
            self.step(self.wait_time())

    def wait_time(self) -> float | None:
        """How long the loop may sleep (None: until an event)."""
        if self.device.more:
            return 0.0
        if any(q.polled and q.ring is not None for q in self.device.queues):
            return POLL_INTERVAL
        conn = self.conn
        if conn is not None and (conn.since or conn.out):
            return min(0.25, self.client_timeout / 4)
        return None

    def sweep_due(self, now: float) -> bool:
        """Whether unfinished work, polled queues or a deadline need a look at ``now``."""
        if self.device.more:
            return True
        return self.wait_time() is not None and now >= self._next_sweep

    def step(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for events and handle them."""
        for key, events in self.selector.select(timeout):
            what, arg = key.data
            try:
                if what == "kick":
                    self._kicked(arg)
                elif what == "conn":
                    if events & selectors.EVENT_WRITE:
                        self._flush()
                    if events & selectors.EVENT_READ and self.conn is not None and self.conn.id == arg:
                        self._readable()
                elif what == "accept":
                    self._accept()
                elif what == "model":
                    self._model_event(arg)
                elif what == "wake":
                    try:
                        while os.read(self._wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
            except Exception:  # the loop never dies of what a front-end did
                log.exception("handling a %s event failed", what)
                if self.conn is not None and what == "conn":
                    self._drop("internal error")
            if not self.running:
                break
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + min(0.25, self.client_timeout / 4)
            self._sweep(now)
        if self.device.more or any(q.polled and q.ring is not None for q in self.device.queues):
            self._service()

    def _sweep(self, now: float) -> None:
        conn = self.conn
        if conn is None:
            return
        if conn.since and now - conn.since > self.client_timeout:
            self._drop(f"a message stayed incomplete for {self.client_timeout:g} s")
        elif conn.out and now - conn.out_since > self.client_timeout:
            self._drop(f"it left replies unread for {self.client_timeout:g} s")

    def close(self) -> None:
        """Drop the front-end, close the listener, remove the socket file this server made."""
        try:
            if self.conn is not None:
                self._drop("emulator shutting down")
            if self.listener is not None:
                try:
                    self.selector.unregister(self.listener)
                except (KeyError, ValueError):
                    pass
                self.listener.close()
                self.listener = None
        finally:
            if self.path:
                remove_socket(self.path, self.socket_id)
        self.selector.close()
        close_fds([self._wake_r, self._wake_w])
        self._wake_r = self._wake_w = -1

    def unwatch(self, fd: int) -> None:
        """Stop watching a model's input (it reached its end)."""
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _warn_once(self, key: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -10.0) >= 1.0:
            self._warned[key] = now
            log.warning(msg, *args)

    # -- events -------------------------------------------------------------------------------

    def _service(self) -> None:
        self.device.service()

    def _kicked(self, q: VhostQueue) -> None:
        kick = q.kick
        if kick is not None:
            kick.drain()
        self.device.kicks += 1
        self._service()

    def _model_event(self, callback) -> None:
        model_input(self.device, callback)
        self._service()

    def _accept(self) -> None:
        listener = self.listener
        if listener is None or self.conn is not None:
            return
        try:
            sock, _addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._warn_once("accept", "accept failed: %s", exc.strerror or exc)
            return
        sock.setblocking(False)
        conn = Connection(sock, self.next_id)
        self.next_id += 1
        self.conn = conn
        # one front-end at a time: the next waits in the listen queue until this one leaves
        self.selector.unregister(listener)
        self.selector.register(sock, selectors.EVENT_READ, ("conn", conn.id))
        log.info("front-end %d connected", conn.id)

    def _drop(self, reason: str) -> None:
        """End the front-end's connection; reset the device for the next one."""
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        if reason == "it closed the connection":
            log.info("front-end %d left", conn.id)
        else:
            log.warning("front-end %d dropped: %s", conn.id, reason)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        close_fds(conn.fds)
        conn.fds = []
        self._unwatch_kicks()
        self.device.forget()
        if self.listener is not None:
            try:
                self.selector.register(self.listener, selectors.EVENT_READ, ("accept", None))
            except (KeyError, ValueError):
                pass

    def _unwatch_kicks(self) -> None:
        for q in self.device.queues:
            if q.kick is not None:
                self.unwatch(q.kick.fd)

    # -- reading messages -------------------------------------------------------------------------

    def _recv(self, conn: Connection, n: int) -> bytes | None:
        """Up to ``n`` bytes (and their fds); None if nothing is waiting. Drop on hang-up."""
        try:
            data, anc, flags, _addr = conn.sock.recvmsg(n, _ANC, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise Drop(f"receive failed: {exc.strerror or exc}") from None
        fds = _fds_of(anc)
        conn.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise Drop(f"a message carried more than {MAX_FDS} file descriptors")
        if not data:
            if conn.head or conn.body:
                raise Drop(f"the connection closed in the middle of a message ({len(conn.head) + len(conn.body)} "
                           f"bytes of it came)")  # fmt: skip
            raise Drop("it closed the connection")
        if not conn.since:
            conn.since = time.monotonic()
        return data

    def _next_message(self, conn: Connection) -> tuple[int, int, bytes, list[int]] | None:
        while len(conn.head) < HEADER_SIZE:
            data = self._recv(conn, HEADER_SIZE - len(conn.head))
            if data is None:
                return None
            conn.head += data
        if conn.size < 0:
            request, flags, size = _HEADER.unpack(conn.head)
            if flags & cat.VHOST_USER_VERSION_MASK != cat.VHOST_USER_VERSION:
                raise Drop(f"{request_name(request)} with protocol version {flags & 3} (flags {flags:#x}), not 1")
            if size > MAX_PAYLOAD:
                raise Drop(f"{request_name(request)} announces a {size}-byte payload (at most {MAX_PAYLOAD})")
            conn.size = size
        while len(conn.body) < conn.size:
            data = self._recv(conn, conn.size - len(conn.body))
            if data is None:
                return None
            conn.body += data
        request, flags, _size = _HEADER.unpack(conn.head)
        body = bytes(conn.body)
        fds = conn.fds
        conn.head, conn.body, conn.size, conn.fds, conn.since = bytearray(), bytearray(), -1, [], 0.0
        return request, flags, body, fds

    def _readable(self) -> None:
        for _ in range(BATCH):
            conn = self.conn
            if conn is None or conn.out:  # replies first: a front-end that does not read is not read from
                return
            try:
                msg = self._next_message(conn)
            except Drop as exc:
                self._drop(str(exc))
                return
            if msg is None:
                return
            request, flags, body, fds = msg
            try:
                self._handle(conn, request, flags, body, fds)
            except Drop as exc:
                self._drop(f"{exc}")
                return
            finally:
                close_fds([fd for fd in fds if fd >= 0])

    def _handle(self, conn: Connection, request: int, flags: int, body: bytes, fds: list[int]) -> None:
        name = request_name(request)
        handler = self.handlers.get(request)
        if log.enabled(log.DEBUG):
            log.debug("%s flags %#x size %d fds %d", name, flags, len(body), len(fds))
        if flags & cat.VHOST_USER_FLAG_REPLY:
            raise Drop(f"{name} sent with the REPLY flag")
        want_ack = bool(flags & cat.VHOST_USER_FLAG_NEED_REPLY) and self.device.has_protocol(
            cat.VHOST_USER_PROTOCOL_F_REPLY_ACK
        )
        if handler is None:
            self._warn_once(f"unknown{request}", "%s is not a message this back-end handles: refused", name)
            if want_ack or request in (SET_LOG_BASE,):
                self._reply(conn, request, _U64.pack(1))
            return
        try:
            result = handler(body, fds)
        except Refused as exc:
            log.warning("%s refused: %s", name, exc)
            if request in self.with_reply:
                raise Drop(f"{name} cannot be answered: {exc}") from None
            if want_ack:
                self._reply(conn, request, _U64.pack(1))
            return
        if request in self.with_reply:
            assert isinstance(result, bytes)
            self._reply(conn, request, result)
        elif want_ack:
            self._reply(conn, request, _U64.pack(0))

    def _reply(self, conn: Connection, request: int, payload: bytes) -> None:
        data = _HEADER.pack(request, cat.VHOST_USER_VERSION | cat.VHOST_USER_FLAG_REPLY, len(payload)) + payload
        if conn.out:
            self._queue(conn, data)
            return
        try:
            sent = conn.sock.send(data, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise Drop(f"send failed: {exc.strerror or exc}") from None
        if sent < len(data):
            self._queue(conn, data[sent:])

    def _queue(self, conn: Connection, data: bytes) -> None:
        if len(conn.out) + len(data) > MAX_OUT:
            raise Drop(f"it does not read its replies ({MAX_OUT} bytes queued)")
        if not conn.out:
            conn.out_since = time.monotonic()
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, ("conn", conn.id))
        conn.out += data

    def _flush(self) -> None:
        conn = self.conn
        if conn is None or not conn.out:
            return
        try:
            sent = conn.sock.send(conn.out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(f"send failed: {exc.strerror or exc}")
            return
        del conn.out[:sent]
        conn.out_since = time.monotonic()
        if not conn.out:
            self.selector.modify(conn.sock, selectors.EVENT_READ, ("conn", conn.id))
            self._readable()

    # -- messages ---------------------------------------------------------------------------------

    def _queue_of(self, index: int, name: str) -> VhostQueue:
        if index >= len(self.device.queues):
            raise Refused(f"{name}: queue {index} does not exist ({len(self.device.queues)} queues)")
        return self.device.queues[index]

    def _get_features(self, body: bytes, fds: list[int]) -> bytes:
        return _U64.pack(self.device.features_word)

    def _set_features(self, body: bytes, fds: list[int]) -> None:
        (value,) = _payload(body, _U64, "SET_FEATURES")
        dev = self.device
        extra = value & ~dev.features_word & ~(1 << cat.VHOST_F_LOG_ALL)
        if extra:
            raise Refused(f"features {extra:#x} were not offered")
        dev.acked = value
        dev.negotiated = {b for b in range(64) if value >> b & 1 and b != cat.VHOST_USER_F_PROTOCOL_FEATURES}
        if not dev.model.check_features(set(dev.negotiated)):
            raise Refused(f"the device-specific check refused features {value:#x}")
        log.info("features %#x accepted", value)

    def _set_owner(self, body: bytes, fds: list[int]) -> None:
        self.device.owner = True

    def _reset_owner(self, body: bytes, fds: list[int]) -> None:
        self._unwatch_kicks()
        protocol = self.device.protocol
        self.device.forget()
        self.device.protocol = protocol  # acks stay agreed on for the rest of the connection
        log.info("device reset by the front-end")

    def _get_protocol_features(self, body: bytes, fds: list[int]) -> bytes:
        return _U64.pack(PROTOCOL_FEATURES)

    def _set_protocol_features(self, body: bytes, fds: list[int]) -> None:
        (value,) = _payload(body, _U64, "SET_PROTOCOL_FEATURES")
        if value & ~PROTOCOL_FEATURES:
            log.warning("SET_PROTOCOL_FEATURES %#x: bits %#x were not offered (ignored)", value,
                        value & ~PROTOCOL_FEATURES)  # fmt: skip
        self.device.protocol = value & PROTOCOL_FEATURES

    def _get_queue_num(self, body: bytes, fds: list[int]) -> bytes:
        n = len(self.device.queues)
        if self.device.kind == "net":
            n = max(1, n // 2)  # virtio-net counts queue pairs here
        return _U64.pack(n)

    def _set_mem_table(self, body: bytes, fds: list[int]) -> None:
        dev = self.device
        if len(body) < _MEM_HDR.size:
            raise Drop(f"SET_MEM_TABLE with a {len(body)}-byte payload")
        nregions, _pad = _MEM_HDR.unpack_from(body)
        if nregions > MAX_FDS or len(body) != _MEM_HDR.size + nregions * _REGION.size:
            raise Drop(f"SET_MEM_TABLE: {nregions} regions in a {len(body)}-byte payload")
        if nregions > dev.max_regions:
            raise Refused(f"{nregions} regions, more than the {dev.max_regions} the device takes")
        if len(fds) != nregions:
            raise Refused(f"{nregions} regions but {len(fds)} file descriptors")
        regions: list[MappedRegion] = []
        try:
            for i in range(nregions):
                gpa, size, user, offset = _REGION.unpack_from(body, _MEM_HDR.size + i * _REGION.size)
                regions.append(self._map_region(i, fds[i], gpa, size, user, offset))
            bases = sorted((r.base, r.base + r.size) for r in regions)
            for (_a, end), (start, _b) in itertools.pairwise(bases):
                if start < end:
                    raise Refused("regions overlap in guest-physical addresses")
        except Refused:
            for r in regions:
                r.close()
            raise
        # rings that use the old table stop, then run on the new one
        for q in dev.queues:
            if q.ring is not None:
                q.base = q.next_avail
                dev.stop_views(q)
        dev.unmap()
        dev.regions = regions
        for r in regions:
            log.info("region %#x-%#x (front-end %#x) mapped", r.base, r.base + r.size, r.user)
        dev.remap_running()

    def _map_region(self, i: int, fd: int, gpa: int, size: int, user: int, offset: int) -> MappedRegion:
        if size == 0 or gpa + size > 1 << 64 or user + size > 1 << 64:
            raise Refused(f"region {i}: size {size:#x} at {gpa:#x} (front-end {user:#x}) does not fit")
        if offset % PAGE:
            raise Refused(f"region {i}: mmap_offset {offset:#x} is not page-aligned")
        why = dataspace_problem(fd, offset + size)
        if why is not None:
            raise Refused(f"region {i}: {why}")
        length = -(-size // PAGE) * PAGE
        try:
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except (OSError, ValueError, OverflowError) as exc:
            raise Refused(f"region {i}: cannot map it: {exc}") from None
        return MappedRegion(gpa, size, user, mm)

    def _state(self, body: bytes, name: str) -> tuple[VhostQueue, int]:
        index, num = _payload(body, _STATE, name)
        return self._queue_of(index, name), num

    def _set_vring_num(self, body: bytes, fds: list[int]) -> None:
        q, num = self._state(body, "SET_VRING_NUM")
        if num == 0 or num > self.device.num_max or num & (num - 1):
            raise Refused(f"queue {q.index}: size {num} is not a power of two in 1..{self.device.num_max}")
        q.num_set = num

    def _set_vring_base(self, body: bytes, fds: list[int]) -> None:
        q, num = self._state(body, "SET_VRING_BASE")
        if num > 0xFFFF:
            raise Refused(f"queue {q.index}: base {num} is not a 16-bit ring index")
        q.base = num

    def _set_vring_addr(self, body: bytes, fds: list[int]) -> None:
        index, flags, desc, used, avail, _log = _payload(body, _ADDR, "SET_VRING_ADDR")
        q = self._queue_of(index, "SET_VRING_ADDR")
        if flags & 1:
            raise Refused(f"queue {q.index}: used-ring logging is not supported")
        q.user_addrs = (desc, used, avail)
        if q.started:
            q.base = q.next_avail if q.ring is not None else q.base
            q.failed = False
            try:
                self.device.start_ring(q)
            except Refused:
                self.device.queue_failed(q)
                raise

    def _get_vring_base(self, body: bytes, fds: list[int]) -> bytes:
        q, _num = self._state(body, "GET_VRING_BASE")
        dev = self.device
        if q.ring is not None:
            q.base = q.next_avail
        dev.stop_views(q)
        if q.kick is not None:
            self.unwatch(q.kick.fd)
            q.kick.close()
            q.kick = None
        q.started = q.polled = q.failed = False
        log.info("queue %d stopped at %d", q.index, q.base)
        return _STATE.pack(q.index, q.base)

    def _vring_fd(self, body: bytes, fds: list[int], name: str) -> tuple[VhostQueue, Irq | None]:
        (value,) = _payload(body, _U64, name)
        index = value & cat.VHOST_USER_VRING_IDX_MASK
        q = self._queue_of(index, name)
        nofd = bool(value & cat.VHOST_USER_VRING_NOFD)
        if nofd:
            if fds:
                raise Refused(f"queue {index}: the no-fd flag is set but {len(fds)} file descriptors came")
            return q, None
        if len(fds) != 1:
            raise Refused(f"queue {index}: {len(fds)} file descriptors, one eventfd expected")
        fd = fds[0]
        fds[0] = -1  # Irq.adopt owns it now (and closes it if it is not an eventfd)
        try:
            return q, Irq.adopt(fd, f"queue {index}: {name[4:].lower().replace('_', ' ')} fd")
        except FormatError as exc:
            raise Refused(exc.message) from None

    def _set_vring_kick(self, body: bytes, fds: list[int]) -> None:
        q, irq = self._vring_fd(body, fds, "SET_VRING_KICK")
        dev = self.device
        if q.kick is not None:
            self.unwatch(q.kick.fd)
            q.kick.close()
        q.kick = irq
        if q.ring is not None:  # a new kick fd for a running ring: it goes on where it is
            q.base = q.next_avail
        if irq is not None:
            self.selector.register(irq.fd, selectors.EVENT_READ, ("kick", q))
        q.polled = irq is None
        q.started = True
        q.failed = False
        if not dev.has_acked_protocol():
            q.ring_enabled = True  # without PROTOCOL_FEATURES a ring starts enabled
        try:
            dev.start_ring(q)
        except Refused:
            dev.queue_failed(q)
            raise
        dev.service()

    def _set_vring_call(self, body: bytes, fds: list[int]) -> None:
        q, irq = self._vring_fd(body, fds, "SET_VRING_CALL")
        if q.call is not None:
            q.call.close()
        q.call = irq

    def _set_vring_err(self, body: bytes, fds: list[int]) -> None:
        q, irq = self._vring_fd(body, fds, "SET_VRING_ERR")
        if q.err is not None:
            q.err.close()
        q.err = irq
        if irq is not None and q.failed:
            irq.trigger()

    def _set_vring_enable(self, body: bytes, fds: list[int]) -> None:
        q, num = self._state(body, "SET_VRING_ENABLE")
        if num > 1:
            raise Refused(f"queue {q.index}: enable value {num} is neither 0 nor 1")
        q.ring_enabled = bool(num)
        log.info("queue %d %s", q.index, "enabled" if num else "disabled")
        if num:
            self.device.service()

    def _config_window(self, body: bytes, name: str) -> tuple[int, int, int]:
        if len(body) < _CONFIG_HDR.size:
            raise Drop(f"{name} with a {len(body)}-byte payload")
        offset, size, flags = _CONFIG_HDR.unpack_from(body)
        if len(body) != _CONFIG_HDR.size + size:
            raise Drop(f"{name}: {size} bytes of config announced in a {len(body)}-byte payload")
        if offset + size > MAX_CONFIG:
            raise Refused(f"config window {offset}+{size} is beyond the {MAX_CONFIG} bytes of config space")
        return offset, size, flags

    def _get_config(self, body: bytes, fds: list[int]) -> bytes:
        try:
            offset, size, flags = self._config_window(body, "GET_CONFIG")
        except Refused as exc:
            log.warning("GET_CONFIG refused: %s", exc)
            return _CONFIG_HDR.pack(0, 0, 0)  # an empty window: the front-end sees it failed
        cfg = self.device.config_bytes[offset : offset + size].ljust(size, b"\0")
        return _CONFIG_HDR.pack(offset, size, flags) + cfg

    def _set_config(self, body: bytes, fds: list[int]) -> None:
        offset, size, _flags = self._config_window(body, "SET_CONFIG")
        raise Refused(f"config bytes {offset}+{size}: the device config is read-only")


def build_device(kind: str, raw: dict) -> VhostDevice:
    """A vhost-user device of ``kind`` from raw options (see :func:`l4vctl.emulator.models.build_device`)."""
    from l4vctl.emulator.models import build_device as build

    return build(kind, raw, lambda model: VhostDevice(model, kind))


def listen(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening stream socket at ``path`` (mode 0600) and its file's identity."""
    from l4vctl.emulator.server import listen as listen_any

    return listen_any(path, kind=socket.SOCK_STREAM)
