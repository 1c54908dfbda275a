"""``vhost-user:PATH[?type=blk|net|rng|console&num_max=N]`` — a vhost-user back-end, driven as an L4-VIRTIO device.

A session talks L4-VIRTIO; a vhost-user back-end (for example
qemu-storage-daemon's vhost-user-blk export, or DPDK testpmd's net_vhost
port) talks the vhost-user protocol.
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

Device classes differ in what GET_QUEUE_NUM counts and in what the config
space holds: a net back-end answers in queue *pairs* (a receive and a
transmit queue each), the others in queues.  A back-end without the CONFIG
protocol feature (testpmd has none) gets a config synthesised from what it
did report: for net, ``max_virtqueue_pairs`` is the pair count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.backends.base import Backend, Channel, Response, parse_query
from l4vctl.errors import TimeoutExpired, UnavailableError, UsageError

if TYPE_CHECKING:
    from l4vctl.backends.vhost_user.client import VhostUserClient
    from l4vctl.backends.vhost_user.device import VhostDevice
    from l4vctl.wire import Cap

#: Protocol features l4vctl asks for: several queues, acks, the config space.
WANTED_PROTOCOL = (
    (1 << cat.VHOST_USER_PROTOCOL_F_MQ)
    | (1 << cat.VHOST_USER_PROTOCOL_F_REPLY_ACK)
    | (1 << cat.VHOST_USER_PROTOCOL_F_CONFIG)
)
#: Feature bits of vhost-user itself, never device features.
VHOST_OWN_BITS = {cat.VHOST_USER_F_PROTOCOL_FEATURES, cat.VHOST_F_LOG_ALL}
#: Highest queue count taken from GET_QUEUE_NUM.
MAX_QUEUES = 64
#: Device types by name, with the size of the config space to ask for: blk back-ends
#: refuse more than 60 bytes (the fields up to ``num_queues``), net ones are asked for the
#: fields up to ``mtu``, consoles for all 12 bytes; an entropy device has no config.
TYPES = {"blk": (2, 60), "net": (1, 12), "rng": (4, 0), "console": (3, 12)}
#: Classes whose GET_QUEUE_NUM counts queue pairs (a receive and a transmit queue each).
PAIRED = {"net"}
#: Queues l4vctl's driver of each class needs (a console: receive and transmit of port 0).
NEEDED = {"blk": 1, "net": 2, "rng": 1, "console": 2}
#: What a device is without ``?type=``: vhost-user has no message that tells.
UNKNOWN_DEVICE = "unknown (vhost-user does not report it)"
#: Options of a vhost-user URL.
OPTIONS = ("type", "num_max", "mac")


def _common_options(raw: dict[str, str]) -> dict[str, Any]:
    """Model options for a device of unknown class: only those every model has."""
    from l4vctl.emulator.models.base import COMMON_OPTIONS

    out = {o.name: o.default for o in COMMON_OPTIONS}
    for o in COMMON_OPTIONS:
        if o.name in raw:
            out[o.name] = o.parse(raw[o.name])
    return out


def _parse_target(target: str) -> tuple[str, dict[str, str]]:
    path, opts = parse_query(target, "vhost-user", "?type=blk&num_max=256")
    unknown = set(opts) - set(OPTIONS)
    if unknown:
        raise UsageError(f"vhost-user: unknown option {sorted(unknown)[0]!r}", hint="options: " + ", ".join(OPTIONS))
    if "mac" in opts:
        from l4vctl.parsing import parse_mac

        if opts.get("type") != "net":
            raise UsageError("vhost-user: mac= is an option of a net device (?type=net&mac=...)")
        try:
            parse_mac(opts["mac"])
        except ValueError as exc:
            raise UsageError(f"vhost-user: mac: {exc}") from None
    return path, opts


def default_num_max(kind: str | None) -> int:
    """The ring size asked for without ``?num_max=``: what l4vctl's model of the class offers.

    vhost-user has no message that tells the largest ring a back-end takes;
    the sizes of l4vctl's own models (blk and net 256, rng and console 128)
    are what ``l4vctl emulate TYPE --vhost-user`` takes.
    """
    if kind is None:
        return 256
    from l4vctl.emulator.models import model_class

    return int(model_class(kind).DEFAULT_NUM_MAX)


def queue_facts(kind: str | None, reported: int | None) -> dict[str, Any]:
    """How many queues the page shows, from GET_QUEUE_NUM's answer (None: no MQ protocol feature).

    A net back-end counts queue pairs; the page shows two queues per pair
    (the control queue is not shown: l4vctl does not drive it), at most
    :data:`MAX_QUEUES` in all.
    """
    facts: dict[str, Any] = {"reported": reported, "config": "GET_CONFIG", "needed": NEEDED.get(kind or "", 0)}
    if kind in PAIRED:
        pairs = max(1, reported or 1)
        facts["pairs"] = pairs
        facts["queues"] = 2 * min(pairs, MAX_QUEUES // 2)
    else:
        facts["queues"] = max(1, min(reported or 1, MAX_QUEUES))
    return facts


def queue_note(facts: dict[str, Any]) -> str:
    """What GET_QUEUE_NUM said and what the page shows of it."""
    reported, queues = facts["reported"], facts["queues"]
    if reported is None:
        said = "no GET_QUEUE_NUM (the back-end has no MQ protocol feature): 1"
    else:
        said = f"GET_QUEUE_NUM {reported}"
    if "pairs" in facts:
        text = f"{said} queue pair{'s' if facts['pairs'] != 1 else ''} (net counts pairs: receive + transmit)"
        shown = queues // 2
        if shown < facts["pairs"]:
            text += f"; the page shows the first {shown} pairs ({queues} queues)"
        return text
    text = f"{said} queue{'s' if (reported or 1) != 1 else ''}"
    if reported is not None and queues != reported:
        text += f"; the page shows {queues}"
    if queues < facts["needed"]:
        text += f", fewer than l4vctl's driver of this class needs ({facts['needed']})"
    return text


class VhostChannel(Channel):
    """A session's channel: L4-VIRTIO requests handled here, vhost-user messages out.

    Memory is local: the config page and lent dataspaces are memfds mapped in
    this process (the contract's defaults).
    """

    def __init__(self, path: str, opts: dict[str, str], role: str, timeout: float):
        from l4vctl.backends.vhost_user.client import VhostUserClient
        from l4vctl.emulator.dispatch import Dispatcher

        kind = opts.get("type")
        if kind is not None and kind not in TYPES:
            raise UsageError(f"vhost-user: type {kind!r} is not supported", hint="types: " + ", ".join(TYPES))
        try:
            num_max = int(opts["num_max"], 0) if "num_max" in opts else default_num_max(kind)
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
            mac = None
            if "mac" in opts:
                from l4vctl.parsing import parse_mac

                mac = parse_mac(opts["mac"])
            self.device = self._identify(client, kind, device_id, config_size, num_max, mac)
        except BaseException:
            client.close()
            raise
        self.dispatcher = Dispatcher(self.device)

    @staticmethod
    def _identify(client: VhostUserClient, kind: str | None, device_id: int, config_size: int,
                  num_max: int, mac: bytes | None = None) -> VhostDevice:  # fmt: skip
        from l4vctl.backends.vhost_user import client as vu
        from l4vctl.backends.vhost_user.device import VhostDevice, VhostModel
        from l4vctl.emulator import log
        from l4vctl.emulator.models import parse_options
        from l4vctl.formats.fast import codec, device_config_key

        features = client.get_u64(cat.VHOST_USER_GET_FEATURES)
        client.send(cat.VHOST_USER_SET_OWNER)
        if features >> cat.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered = client.get_u64(cat.VHOST_USER_GET_PROTOCOL_FEATURES)
            client.send(cat.VHOST_USER_SET_PROTOCOL_FEATURES, vu.u64(offered & WANTED_PROTOCOL))
            client.protocol = offered & WANTED_PROTOCOL
        reported = (
            client.get_u64(cat.VHOST_USER_GET_QUEUE_NUM) if client.has_protocol(cat.VHOST_USER_PROTOCOL_F_MQ) else None
        )
        facts = queue_facts(kind, reported)
        config: dict[str, Any] = {}
        if kind and config_size and client.has_protocol(cat.VHOST_USER_PROTOCOL_F_CONFIG):
            body = client.call(cat.VHOST_USER_GET_CONFIG, vu.config_request(config_size))
            cfg_bytes = body[vu.CONFIG_HDR.size :].ljust(64, b"\0")
            dc = codec(device_config_key(kind, "current"))
            config = dc.unpack(cfg_bytes[: dc.size].ljust(dc.size, b"\0"))
            for name in ("unused0", "unused1"):
                config.pop(name, None)
        elif kind and config_size:
            facts["config"] = "synthesised"
            if kind in PAIRED:
                config = {"max_virtqueue_pairs": min(facts["pairs"], 0xFFFF)}
        # vhost-user's own bits are not device features: protocol features (30), dirty logging (26)
        bits = {b for b in range(64) if features >> b & 1} - VHOST_OWN_BITS
        if mac is not None:
            # the MAC is the front-end's to give (QEMU's virtio-net mac=): offered here, never sent on
            config["mac"] = mac
            if cat.NET_F_MAC not in bits:
                facts["front_end_bits"] = {cat.NET_F_MAC}
                bits.add(cat.NET_F_MAC)
        raw = {"abi": "current", "num_max": str(num_max), "vendor": "0"}
        options = parse_options(kind, raw) if kind else _common_options(raw)
        model = VhostModel(options, kind or "unknown", device_id, bits, config, facts["queues"])
        device = VhostDevice(model, client, features)
        device.facts = facts
        model.device = device
        log.info("vhost-user %s: features %#x, %s", kind or "device of unknown type", features, queue_note(facts))
        return device

    def call(self, label: int, opcode: int, words: Sequence[int] = (), caps: Sequence[Cap] = (),
             fds: Sequence[int] = (), timeout: float | None = None) -> Response:  # fmt: skip
        """One L4-VIRTIO request, answered by the device rules here (vhost-user messages as they imply)."""
        from l4vctl.emulator.dispatch import NO_REPLY

        if label == cat.L4VCTL_PROTO_MONITOR:
            # The back-end's ring state is its own: there is nothing truthful to report.
            return Response(-cat.L4_ENOSYS, [], [], [])
        # Capabilities cross "the wire" as duplicates, as SCM_RIGHTS would make them.
        frame = wire.Frame(cat.KIND_REQUEST, 0, label, opcode, list(words), list(caps), [os.dup(fd) for fd in fds])
        try:
            reply = self.dispatcher.handle(frame, self.role, self.role == cat.ROLE_DRIVER)
        finally:
            frame.close_fds()
        if reply is NO_REPLY:
            raise TimeoutExpired(f"{self.name}: no reply (this operation is never answered)")
        return Response(reply.result, reply.words, reply.caps, reply.fds)

    def fileno(self) -> int:
        """The back-end connection's descriptor, watched for a hang-up while waiting for completions."""
        return self.client.fileno()

    def hung_up(self) -> bool:
        """True if the back-end closed the connection."""
        return self.client.hung_up()

    def check(self) -> None:
        """Raise if the back-end hung up (it may die on a message it acknowledged)."""
        if self.client.hung_up():
            raise UnavailableError(f"{self.name}: the vhost-user back-end hung up")

    def close(self) -> None:
        """Stop the rings (if the back-end still listens), close the connection and the device."""
        if self.client.sock is not None:
            try:
                self.device.vhost_stop_rings()
            except Exception:
                pass
        self.client.close()
        self.device.close()


class VhostUserBackend(Backend):
    """``vhost-user:PATH``: a vhost-user back-end, driven as an L4-VIRTIO device."""

    scheme = "vhost-user"
    synthesized = "config page synthesised from the vhost-user back-end (GET_FEATURES, GET_CONFIG, GET_QUEUE_NUM); " \
                  "no status handshake on the wire: l4vctl keeps the status itself"  # fmt: skip

    def __init__(self, url: str, target: str):
        super().__init__(url, target)
        self.base_note = self.synthesized
        self.path, self.opts = _parse_target(target)
        if not self.path:
            raise UsageError("vhost-user: needs a socket path (vhost-user:/run/blk.sock)")
        if "type" not in self.opts:
            self.device_unknown = UNKNOWN_DEVICE
            self.synthesized = (
                "config page synthesised from the vhost-user back-end (GET_FEATURES, GET_QUEUE_NUM); "
                f"device type {UNKNOWN_DEVICE}: device id 0 on the page, no device config, no device I/O "
                "(add ?type=blk, net, rng or console to say what it is); "
                "no status handshake on the wire: l4vctl keeps the status itself"
            )
            self.base_note = self.synthesized

    def connect(self, role: str = "driver", timeout: float = 5.0) -> VhostChannel:
        """Connect to the back-end and learn what it is (GET_FEATURES, GET_QUEUE_NUM, GET_CONFIG)."""
        channel = VhostChannel(self.path, self.opts, role, timeout)
        facts = channel.device.facts
        notes = [self.base_note, queue_note(facts)]
        if facts["config"] == "synthesised":
            notes[0] = notes[0].replace("GET_FEATURES, GET_CONFIG, GET_QUEUE_NUM", "GET_FEATURES, GET_QUEUE_NUM")
            notes.append(
                "the back-end has no CONFIG protocol feature: device config synthesised"
                + (" (max_virtqueue_pairs from GET_QUEUE_NUM, other fields 0)" if "pairs" in facts else " (all 0)")
            )
        if "mac" in self.opts:
            notes.append(
                f"MAC address {self.opts['mac']} from the URL (the front-end's to give)"
                + ("; VIRTIO_NET_F_MAC offered by l4vctl, not by the back-end" if facts.get("front_end_bits") else "")
            )
        self.synthesized = "; ".join(notes)
        return channel
