"""virtio-net model: frames over a virtual cable.

Queue 0 receives, queue 1 transmits; every buffer starts with the 12-byte
virtio-net header.  ``link=NAME`` plugs the device into the cable NAME: two
emulated net devices (in any processes of this machine) that use the same
name exchange frames.  ``loop=1`` makes transmitted frames come back.  A
frame sent while nobody is on the other end is dropped, as on a real cable.
"""

from __future__ import annotations

import collections
import errno
import os
from typing import TYPE_CHECKING, ClassVar

from l4vctl import catalog as cat
from l4vctl.emulator import log
from l4vctl.emulator.models import Option, Profile
from l4vctl.emulator.models.base import Model
from l4vctl.emulator.ring import BadChain
from l4vctl.formats.fast import codec
from l4vctl.parsing import mac_text, parse_bool, parse_int, parse_mac

if TYPE_CHECKING:
    import socket

RX, TX = cat.NET_RX_QUEUE, cat.NET_TX_QUEUE
_NET_HDR = codec("l4virtio_net_header_t")
HDR_SIZE = _NET_HDR.size
#: The header in front of every received frame: no offloads, the frame in one buffer.
RX_HEADER = _NET_HDR.pack(
    {"flags": 0, "gso_type": 0, "hdr_len": 0, "gso_size": 0, "csum_start": 0, "csum_offset": 0, "num_buffers": 1}
)
MAX_FRAME = 65535
PENDING_FRAMES = 256


def parse_link(text) -> str:
    """A cable name: 1 to 64 characters without '/' or NUL; ValueError otherwise."""
    name = str(text)
    if not name or len(name) > 64 or "/" in name or "\0" in name:
        raise ValueError(f"{text!r} is not a link name (1-64 characters, no '/')")
    return name


def parse_mac_option(text) -> bytes:
    """A MAC address, or ``random``: a random locally administered unicast one (as l4vio_switch gives its ports)."""
    if str(text).strip().lower() == "random":
        first, *rest = os.urandom(6)
        return bytes([(first & 0xFC) | 0x02, *rest])
    return parse_mac(text)


def link_address(name: str, end: str) -> bytes:
    """The abstract-namespace address of one end of a cable."""
    return f"\0l4vctl-link/{name}/{end}".encode()


class NetModel(Model):
    """A network device whose frames go over a named cable to one other device, or loop back."""

    KIND = "net"
    DEVICE_ID = cat.DEVICE_ID_NET
    DEFAULT_QUEUES = 2  # 0 receive, 1 transmit
    MIN_QUEUES = 2
    DEFAULT_NUM_MAX = 256
    FEATURES = frozenset({cat.NET_F_MAC, cat.NET_F_STATUS})
    PROFILES: ClassVar[dict[str, Profile]] = {
        # a port of l4vio_switch: MAC (a random one), MRG_RXBUF, INDIRECT_DESC; 10 bytes of config
        "l4re-switch": Profile(
            "l4re-switch",
            options={"mac": "random", "mtu": "0", "num_max": "256"},
            features=frozenset({cat.NET_F_MAC, cat.NET_F_MRG_RXBUF, cat.INDIRECT_DESC_BIT}),
            config_size=10,
        ),
    }
    OPTIONS = (
        Option(
            "mac",
            parse_mac_option,
            None,
            "MAC address or 'random' (VIRTIO_NET_F_MAC; default 52:54:00:12:34:56, or derived from the link end)",
        ),
        Option("mtu", parse_int, 1500, "MTU advice (VIRTIO_NET_F_MTU; 0: not offered)"),
        Option("link", parse_link, None, "plug into the virtual cable NAME shared with one other device"),
        Option("loop", parse_bool, False, "send transmitted frames back to this device"),
    )

    def __init__(self, options: dict):
        super().__init__(options)
        self.sock: socket.socket | None = None  # plugged into a cable: this end's socket
        self.peer: bytes | None = None  # the address of the other end
        self.end: str | None = None  # "a" or "b"
        self.pending: collections.deque = collections.deque()
        self.sent = self.received = self.dropped = 0
        if options["link"]:
            self._plug(options["link"])
        mac = options["mac"]
        if mac is None:
            mac = bytes.fromhex("525400123456") if self.end != "b" else bytes.fromhex("525400123457")
        self.mac = mac

    def _plug(self, name: str) -> None:
        import socket  # only a device plugged into a cable needs one (probe emu:net does not)

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        for end, other in (("a", "b"), ("b", "a")):
            try:
                sock.bind(link_address(name, end))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                sock.close()
                raise ValueError(f"cannot plug into link {name!r}: {exc.strerror}") from None
            self.sock, self.end, self.peer = sock, end, link_address(name, other)
            return
        sock.close()
        raise ValueError(f"link {name!r} already has two devices")

    def features(self) -> set[int]:
        """MAC and STATUS (or the profile's bits), and MTU unless the mtu option is 0."""
        bits = self.base_features()
        if self.options["mtu"]:
            bits.add(cat.NET_F_MTU)
        return bits

    def config(self) -> dict:
        """The MAC address, link up (with STATUS) and the MTU."""
        offered = self.features()
        return {"mac": self.mac, "status": cat.NET_S_LINK_UP if cat.NET_F_STATUS in offered else 0,
                "mtu": self.options["mtu"]}  # fmt: skip

    def required_queues(self) -> list[int]:
        """The receive and transmit queues."""
        return [RX, TX]

    def describe(self) -> str:
        """MAC address, cable end and loop."""
        mac = mac_text(self.mac)
        link = f", link {self.options['link']} end {self.end}" if self.sock else ""
        return f"net {mac}{link}{', loop' if self.options['loop'] else ''}"

    # -- receive ----------------------------------------------------------------------

    def watch(self) -> list:
        """The cable socket, if the device is plugged into one."""
        return [(self.sock.fileno(), self._link_ready)] if self.sock else []

    def _link_ready(self) -> None:
        sock = self.sock
        assert sock is not None  # watched only while plugged in
        while True:
            try:
                frame = sock.recv(MAX_FRAME)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("link receive failed: %s", exc.strerror)
                break
            self._arrive(frame)
        self.deliver()

    def _arrive(self, frame: bytes) -> None:
        if len(self.pending) >= PENDING_FRAMES:
            self.dropped += 1
            return
        self.pending.append(frame)

    def deliver(self) -> None:
        """Move arrived frames into the driver's receive buffers."""
        dev = self.device
        if dev is None or len(dev.queues) <= RX:
            return
        ring = dev.queues[RX].ring
        if ring is None:
            return
        while self.pending and ring.available():
            head = ring.pop()
            segs = ring.chain(head)
            frame = self.pending[0]
            room = sum(len(s) for s in segs)
            if room < HDR_SIZE + len(frame):
                # too small for this frame: drop the frame, return the buffer empty
                log.info("receive buffer of %d bytes too small for a %d-byte frame: dropped", room, len(frame))
                self.pending.popleft()
                self.dropped += 1
                ring.complete(head, 0)
                continue
            self.pending.popleft()
            data = bytearray(RX_HEADER)
            data += frame
            pos = 0
            for seg in segs:
                if not seg.writable:
                    raise BadChain("queue 0: a receive buffer lies in read-only memory")
                n = min(len(seg), len(data) - pos)
                seg.view[:n] = data[pos : pos + n]
                pos += n
                if pos == len(data):
                    break
            self.received += 1
            ring.complete(head, len(data))
        ring.publish()

    # -- transmit -----------------------------------------------------------------------

    def process(self, queue, ring) -> None:
        """Transmitq: send every frame over the cable (and back, with loop); receiveq: deliver arrived frames."""
        if queue.index == RX:
            self.deliver()
            return
        if queue.index != TX:
            super().process(queue, ring)
            return
        for _ in range(ring.available()):
            head = ring.pop()
            segs = ring.chain(head)
            ring.complete(head, 0)
            total = sum(len(s) for s in segs)
            if total < HDR_SIZE:
                log.warning("queue 1: a transmit chain of %d bytes is shorter than the net header", total)
                self.dropped += 1
                continue
            if total > HDR_SIZE + MAX_FRAME:  # dropped before a byte of it is copied
                log.warning("queue 1: a transmit chain of %d bytes is longer than a frame (%d): dropped", total,
                            HDR_SIZE + MAX_FRAME)  # fmt: skip
                self.dropped += 1
                continue
            packet = bytearray(total)
            pos = 0
            for seg in segs:
                packet[pos : pos + len(seg)] = seg.view
                pos += len(seg)
            self._send(bytes(packet[HDR_SIZE:]))
        if self.options["loop"]:
            self.deliver()

    def _send(self, frame: bytes) -> None:
        self.sent += 1
        if self.options["loop"]:
            self._arrive(frame)
        if self.sock is None:
            return
        assert self.peer is not None  # set with the socket when plugged in
        try:
            self.sock.sendto(frame, self.peer)
        except OSError as exc:  # nobody on the other end, or its queue is full
            self.dropped += 1
            log.info("frame of %d bytes dropped: %s", len(frame), exc.strerror or exc)

    def reset(self) -> None:
        """Drop frames that arrived for the old driver."""
        self.pending.clear()

    def close(self) -> None:
        """Unplug from the cable."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
