"""``vhost-user:PATH[?type=blk&num_max=N]`` — a vhost-user back-end, driven as an L4-VIRTIO device.

A session talks L4-VIRTIO; a vhost-user back-end (for example
qemu-storage-daemon's vhost-user-blk export) talks the vhost-user protocol.
This backend joins them in the front-end's process: it presents the back-end
as an L4-VIRTIO device whose config page is *synthesised* from what the
back-end reports (GET_FEATURES, GET_QUEUE_NUM, GET_CONFIG), follows the same
device rules as the emulator for status, features and queues, and turns them
into vhost-user messages:

* REGISTER_DS becomes SET_MEM_TABLE (with every region registered so far);
* FEATURES_OK becomes SET_FEATURES with the accepted bits;
* a queue enabled while DRIVER_OK (or at DRIVER_OK) becomes SET_VRING_NUM,
  SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL and
  SET_VRING_ENABLE; a reset stops the rings with GET_VRING_BASE.

vhost-user has no status handshake on the wire: the status machine lives
here, and outputs say so.  Each queue gets a kick eventfd of its own (its
``device_notify_index`` is queue + 1); the driver's IRQ is every queue's
call eventfd.  Ring and buffer addresses are device addresses; the memory
table maps them 1:1 as the front-end's addresses too, which is all the
back-end uses them for.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from urllib.parse import parse_qsl

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.backends import Backend, connect_unix
from l4vctl.backends.unix import Response
from l4vctl.caps import Irq, close_fds
from l4vctl.emulator import log
from l4vctl.emulator.device import Device
from l4vctl.emulator.dispatch import NO_REPLY, Dispatcher
from l4vctl.emulator.models.base import Model
from l4vctl.errors import ProtocolError, TimeoutExpired, UnavailableError, UsageError

# front-end message types (vhost-user protocol)
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24

NAMES = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 5: "SET_MEM_TABLE", 8: "SET_VRING_NUM",
    9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE", 12: "SET_VRING_KICK",
    13: "SET_VRING_CALL", 15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM",
    18: "SET_VRING_ENABLE", 24: "GET_CONFIG",
}  # fmt: skip

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
F_PROTOCOL_FEATURES = 30  # a vhost-user feature bit, not a virtio one
F_LOG_ALL = 26  # vhost dirty-page logging (not used by l4vctl)
P_MQ = 0
P_REPLY_ACK = 3
P_CONFIG = 9
WANTED_PROTOCOL = (1 << P_MQ) | (1 << P_REPLY_ACK) | (1 << P_CONFIG)
MAX_REGIONS = 8
_HDR = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_CONFIG = struct.Struct("<III")

#: Device types by name, with the size of the config space to ask for.
TYPES = {"blk": (2, 60)}
#: What a device is without ``?type=``: vhost-user has no message that tells.
UNKNOWN_DEVICE = "unknown (vhost-user does not report it)"


class VhostUserClient:
    """The front-end side of one vhost-user connection."""

    def __init__(self, path: str, timeout: float):
        self.path = path
        self.timeout = timeout
        self.protocol = 0
        sock = connect_unix(path, socket.SOCK_STREAM, timeout, "the vhost-user back-end")
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def hung_up(self) -> bool:
        """True if the back-end closed the connection."""
        if self.sock is None:
            return True
        p = select.poll()
        p.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        for _fd, ev in p.poll(0):
            if ev & (select.POLLHUP | select.POLLERR):
                return True
            if ev & select.POLLIN:
                try:
                    return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    return False
        return False

    def _dead(self, what: str) -> UnavailableError:
        return UnavailableError(f"{self.path}: the vhost-user back-end hung up {what}")

    def send(self, request: int, payload: bytes = b"", fds=(), reply: bool = False) -> bytes | None:
        """Send a message; return the reply payload (messages with a reply, or an ack)."""
        ack = not reply and bool(self.protocol & (1 << P_REPLY_ACK))
        flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
        data = _HDR.pack(request, flags, len(payload)) + payload
        name = NAMES.get(request, str(request))
        try:
            if fds:
                wire.send(self.sock, data, fds)
            else:
                self.sock.sendall(data)
        except OSError:
            raise self._dead(f"before {name}") from None
        if not (reply or ack):
            return None
        body = self._recv(request, name)
        if ack:
            (code,) = _U64.unpack_from(body.ljust(8, b"\0"))
            if code:
                raise ProtocolError(f"{self.path}: the vhost-user back-end refused {name} ({code})")
            return None
        return body

    def _recv_exact(self, n: int, name: str, deadline: float) -> bytes:
        out = bytearray()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutExpired(
                    f"{self.path}: no answer to {name} within {self.timeout:g} s "
                    "(qemu-storage-daemon serves one front-end at a time: is another one connected?)"
                )
            try:
                chunk = self.sock.recv(n - len(out))
            except OSError:
                chunk = b""
            if not chunk:
                raise self._dead(f"while answering {name}")
            out += chunk
        return bytes(out)

    def _recv(self, request: int, name: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        req, flags, size = _HDR.unpack(self._recv_exact(_HDR.size, name, deadline))
        if req != request or not flags & FLAG_REPLY:
            raise ProtocolError(f"{self.path}: expected the reply to {name}, got message {req} flags {flags:#x}")
        if size > 4096:
            raise ProtocolError(f"{self.path}: a {size}-byte reply to {name} is too long")
        return self._recv_exact(size, name, deadline)

    def get_u64(self, request: int) -> int:
        return _U64.unpack_from(self.send(request, reply=True).ljust(8, b"\0"))[0]


class VhostModel(Model):
    """A device model whose identity comes from the back-end."""

    def __init__(self, options: dict, kind: str, device_id: int, features: set[int], config: dict, queues: int):
        super().__init__(options)
        self.KIND = kind
        self.DEVICE_ID = device_id
        self._features = features
        self._config = config
        self._queues = queues
        self.device = None

    def features(self) -> set[int]:
        return set(self._features)

    def config(self) -> dict:
        return dict(self._config)

    def num_queues(self) -> int:
        return self._queues

    def check_features(self, accepted: set[int]) -> bool:
        return self.device.vhost_set_features(accepted)

    def reset(self) -> None:
        if self.device is not None:
            self.device.vhost_stop_rings()

    def process(self, queue, ring) -> None:  # the back-end serves the rings itself
        return

    def describe(self) -> str:
        return f"{self.KIND} behind vhost-user"


class VhostDevice(Device):
    """The L4-VIRTIO device rules on top of a vhost-user back-end."""

    def __init__(self, model: VhostModel, client: VhostUserClient, backend_features: int):
        self.client = client
        self.backend_features = backend_features
        self.region_fds: list[tuple[int, int, int, int]] = []  # (base, size, offset, fd)
        self.queue_kicks: list[Irq] = []
        self.started: set[int] = set()
        super().__init__(model)
        self.queue_kicks = [Irq.create() for _ in range(self.num_queues)]
        self._set_notify_indices()

    def _set_notify_indices(self) -> None:
        if self._array_ok():
            for i in range(self.num_queues):
                self._queue_store(i, "device_notify_index", i + 1)

    def reset(self) -> None:
        super().reset()
        self._set_notify_indices()

    def irq_for_index(self, index: int) -> Irq | None:
        if index == 0:
            return self.kick_irq
        if 1 <= index <= len(self.queue_kicks):
            return self.queue_kicks[index - 1]
        return None

    # -- memory ------------------------------------------------------------------------

    def register_ds(self, ds_fd, rights, base, offset, size) -> int:
        if len(self.region_fds) >= MAX_REGIONS:
            log.warning("vhost-user memory tables hold at most %d regions: -L4_ENOMEM", MAX_REGIONS)
            return -cat.L4_ENOMEM
        result = super().register_ds(ds_fd, rights, base, offset, size)
        if result == 0:
            region = self.regions[-1]
            self.region_fds.append((region.base, region.size, offset & ~(4095), os.dup(ds_fd)))
            self._send_mem_table()
        return result

    def _send_mem_table(self) -> None:
        payload = struct.pack("<II", len(self.region_fds), 0)
        fds = []
        for base, size, offset, fd in self.region_fds:
            payload += _REGION.pack(base, size, base, offset)  # front-end address = device address
            fds.append(fd)
        self.client.send(SET_MEM_TABLE, payload, fds)

    # -- features and status ---------------------------------------------------------------

    def vhost_set_features(self, accepted: set[int]) -> bool:
        value = 0
        for bit in accepted:
            if bit < 64:
                value |= 1 << bit
        if self.backend_features & (1 << F_PROTOCOL_FEATURES):
            value |= 1 << F_PROTOCOL_FEATURES  # keep the vhost-user protocol features on
        self.client.send(SET_FEATURES, _U64.pack(value))
        return True

    def set_status(self, value: int) -> None:
        was = self.status
        super().set_status(value)
        if self.status & cat.STATUS_DRIVER_OK and not was & cat.STATUS_DRIVER_OK:
            for q in self.queues:
                if q.enabled:
                    self._start(q)

    def setup_queue(self, index: int) -> int:
        result = super().setup_queue(index)
        if index < len(self.queues):
            q = self.queues[index]
            if q.enabled and self.status & cat.STATUS_DRIVER_OK:
                self._start(q)
            elif not q.enabled and index in self.started:
                self._stop(index)
        return result

    # -- rings -------------------------------------------------------------------------------

    def _start(self, q) -> None:
        c = self.client
        i = q.index
        if i in self.started:
            self._stop(i)
        c.send(SET_VRING_NUM, _STATE.pack(i, q.num))
        c.send(SET_VRING_BASE, _STATE.pack(i, 0))
        c.send(SET_VRING_ADDR, _ADDR.pack(i, 0, q.desc_addr, q.used_addr, q.avail_addr, 0))
        c.send(SET_VRING_KICK, _U64.pack(i), [self.queue_kicks[i].fd])
        if self.driver_irq is not None:
            c.send(SET_VRING_CALL, _U64.pack(i), [self.driver_irq.fd])
        else:
            c.send(SET_VRING_CALL, _U64.pack(i | 0x100))  # no call fd: the driver polls
        if self.backend_features & (1 << F_PROTOCOL_FEATURES):
            c.send(SET_VRING_ENABLE, _STATE.pack(i, 1))
        self.started.add(i)
        log.info("vring %d started: num %d", i, q.num)

    def _stop(self, index: int) -> None:
        if self.client.sock is None:
            return
        body = self.client.send(GET_VRING_BASE, _STATE.pack(index, 0), reply=True)
        self.started.discard(index)
        log.info("vring %d stopped at %d", index, _STATE.unpack_from(body.ljust(8, b"\0"))[1])

    def vhost_stop_rings(self) -> None:
        for i in sorted(self.started):
            self._stop(i)

    def close(self) -> None:
        close_fds(fd for *_rest, fd in self.region_fds)
        self.region_fds.clear()
        for irq in self.queue_kicks:
            irq.close()
        super().close()


def _common_options(raw: dict) -> dict:
    """Model options for a device of unknown class: only those every model has."""
    from l4vctl.emulator.models.base import COMMON_OPTIONS

    out = {o.name: o.default for o in COMMON_OPTIONS}
    for o in COMMON_OPTIONS:
        if o.name in raw:
            out[o.name] = o.parse(raw[o.name])
    return out


def _parse_target(target: str) -> tuple[str, dict]:
    path, _, query = target.partition("?")
    try:
        opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise UsageError(f"vhost-user:{target}: options must look like ?type=blk&num_max=256") from None
    unknown = set(opts) - {"type", "num_max"}
    if unknown:
        raise UsageError(f"vhost-user: unknown option {sorted(unknown)[0]!r}", hint="options: type, num_max")
    return path, opts


class VhostChannel:
    """A session's channel: L4-VIRTIO requests handled here, vhost-user messages out."""

    def __init__(self, path: str, opts: dict, role: str, timeout: float):
        kind = opts.get("type")
        if kind is not None and kind not in TYPES:
            raise UsageError(f"vhost-user: type {kind!r} is not supported", hint="types: " + ", ".join(TYPES))
        try:
            num_max = int(opts.get("num_max", "256"), 0)
        except ValueError:
            raise UsageError("vhost-user: num_max must be a number") from None
        if not 1 <= num_max <= cat.MAX_QUEUE_SIZE:
            raise UsageError(f"vhost-user: num_max {num_max} is outside 1..{cat.MAX_QUEUE_SIZE}")
        # Without ?type= the page carries device id 0 (reserved in virtio: no device
        # class) and no device config; no class-specific message is sent.
        device_id, config_size = TYPES[kind] if kind else (0, 0)
        self.name = path
        self.role = cat.ROLE_DRIVER if role == "driver" else cat.ROLE_MONITOR
        self.client = client = VhostUserClient(path, timeout)
        try:
            self.device = self._identify(client, kind, device_id, config_size, num_max)
        except BaseException:
            client.close()
            raise
        self.dispatcher = Dispatcher(self.device)

    def _identify(self, client, kind, device_id, config_size, num_max) -> VhostDevice:
        from l4vctl.emulator.models import parse_options
        from l4vctl.formats.fast import device_config_key, codec

        features = client.get_u64(GET_FEATURES)
        client.send(SET_OWNER)
        if features & (1 << F_PROTOCOL_FEATURES):
            offered = client.get_u64(GET_PROTOCOL_FEATURES)
            client.send(SET_PROTOCOL_FEATURES, _U64.pack(offered & WANTED_PROTOCOL))
            client.protocol = offered & WANTED_PROTOCOL
        queues = client.get_u64(GET_QUEUE_NUM) if client.protocol & (1 << P_MQ) else 1
        config = {}
        if kind and client.protocol & (1 << P_CONFIG):
            body = client.send(GET_CONFIG, _CONFIG.pack(0, config_size, 0) + bytes(config_size), reply=True)
            raw = body[_CONFIG.size :].ljust(64, b"\0")
            dc = codec(device_config_key(kind, "current"))
            config = dc.unpack(raw[: dc.size].ljust(dc.size, b"\0"))
            for name in ("unused0", "unused1"):
                config.pop(name, None)
        # vhost-user's own bits are not device features: protocol features (30), dirty logging (26)
        bits = {b for b in range(64) if features >> b & 1} - {F_PROTOCOL_FEATURES, F_LOG_ALL}
        raw = {"abi": "current", "num_max": str(num_max), "vendor": "0"}
        options = parse_options(kind, raw) if kind else _common_options(raw)
        model = VhostModel(options, kind or "unknown", device_id, bits, config, max(1, min(queues, 64)))
        device = VhostDevice(model, client, features)
        model.device = device
        log.info("vhost-user %s: features %#x, %d queues", kind or "device of unknown type", features, queues)
        return device

    def call(self, label: int, opcode: int, words=(), caps=(), fds=(), timeout: float | None = None) -> Response:
        if label == cat.L4VCTL_PROTO_MONITOR:
            # The back-end's ring state is its own: there is nothing truthful to report.
            return Response(-cat.L4_ENOSYS, [], [], [])
        # Capabilities cross "the wire" as duplicates, as SCM_RIGHTS would make them.
        frame = wire.Frame(cat.KIND_REQUEST, 0, label, opcode, words, caps, [os.dup(fd) for fd in fds])
        try:
            reply = self.dispatcher.handle(frame, self.role, self.role == cat.ROLE_DRIVER)
        finally:
            frame.close_fds()
        if reply is NO_REPLY:
            raise TimeoutExpired(f"{self.name}: no reply (this operation is never answered)")
        return Response(reply.result, reply.words, reply.caps, reply.fds)

    def fileno(self) -> int:
        """The back-end connection's descriptor, watched for a hang-up while waiting for completions."""
        return self.client.sock.fileno() if self.client.sock is not None else -1

    def check(self) -> None:
        """Raise if the back-end hung up (it may die on a message it acknowledged)."""
        if self.client.hung_up():
            raise UnavailableError(f"{self.name}: the vhost-user back-end hung up")

    def close(self) -> None:
        if self.client.sock is not None:
            try:
                self.device.vhost_stop_rings()
            except Exception:  # noqa: BLE001 - the back-end may be gone already
                pass
        self.client.close()
        self.device.close()


class VhostUserBackend(Backend):
    scheme = "vhost-user"
    synthesized = "config page synthesised from the vhost-user back-end (GET_FEATURES, GET_CONFIG, GET_QUEUE_NUM); " \
                  "no status handshake on the wire: l4vctl keeps the status itself"  # fmt: skip

    def __init__(self, url: str, target: str):
        super().__init__(url, target)
        self.path, self.opts = _parse_target(target)
        if not self.path:
            raise UsageError("vhost-user: needs a socket path (vhost-user:/run/blk.sock)")
        if "type" not in self.opts:
            self.device_unknown = UNKNOWN_DEVICE
            self.synthesized = (
                "config page synthesised from the vhost-user back-end (GET_FEATURES, GET_QUEUE_NUM); "
                f"device type {UNKNOWN_DEVICE}: device id 0 on the page, no device config, no device I/O "
                "(add ?type=blk if it is a block device); no status handshake on the wire: l4vctl keeps the status itself"
            )

    def connect(self, role: str = "driver", timeout: float = 5.0) -> VhostChannel:
        return VhostChannel(self.path, self.opts, role, timeout)
