"""A virtio-net driver: send and receive Ethernet frames."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from l4vctl import catalog as cat
from l4vctl.drivers.base import Driver
from l4vctl.errors import UsageError
from l4vctl.formats.fast import codec
from l4vctl.parsing import mac_text as mac_text  # re-exported: drivers.net.mac_text

if TYPE_CHECKING:
    from l4vctl.session import Session

RX, TX = cat.NET_RX_QUEUE, cat.NET_TX_QUEUE
_NET_HDR = codec("l4virtio_net_header_t")
#: Bytes of the full net header (with ``num_buffers``: VERSION_1 or MRG_RXBUF negotiated).
HDR = _NET_HDR.size
#: The header in front of every frame sent: no checksum offload, no segmentation.
TX_HEADER = _NET_HDR.pack(
    {"flags": 0, "gso_type": 0, "hdr_len": 0, "gso_size": 0, "csum_start": 0, "csum_offset": 0, "num_buffers": 0}
)
BUFFER = 2048
BROADCAST = b"\xff" * 6
#: IEEE 802 local experimental ethertype, used by l4vctl's own frames.
ETHERTYPE = 0x88B5
#: Bytes of an Ethernet header (destination, source, ethertype).
ETH_HDR = 14
#: The source address of a device that offers none (VIRTIO_NET_F_MAC not negotiated).
DEFAULT_MAC = bytes.fromhex("020000000001")


class NetDriver(Driver):
    """Send and receive Ethernet frames on queues 0 (receive) and 1 (transmit)."""

    CLASS = "net"

    def __init__(self, session: Session, *, buffers: int = 32) -> None:
        from l4vctl.decode import net_header_size

        super().__init__(session)
        #: bytes of net header in front of each frame: 12, or 10 without VERSION_1 and MRG_RXBUF
        self.hdr = net_header_size(session.negotiated)
        cfg = session.device_config()
        self.mac = bytes(cfg["mac"]) if self.has_feature(cat.NET_F_MAC) and "mac" in cfg else DEFAULT_MAC
        #: the largest frame the device takes: its MTU plus the Ethernet header (VIRTIO_NET_F_MTU)
        self.max_frame = BUFFER - self.hdr
        if self.has_feature(cat.NET_F_MTU) and cfg.get("mtu"):
            self.max_frame = min(self.max_frame, cfg["mtu"] + ETH_HDR)
        self._open_duplex(RX, TX, buffers, BUFFER, "net")

    def send(self, frame: bytes) -> None:
        """Transmit one frame (waits for a free buffer); UsageError if it is larger than ``max_frame``."""
        if len(frame) > self.max_frame:
            limit = "the device's MTU" if self.max_frame < BUFFER - self.hdr else "the buffer size"
            raise UsageError(f"a frame of {len(frame)} bytes is larger than {self.max_frame} ({limit})")
        for i, _used in self.tx.reap():
            self.tx_pool.give(i)
        while not self.tx_pool.free:
            for i, _used in self.tx.wait(self.timeout):
                self.tx_pool.give(i)
        i = self.tx_pool.take()
        view = self.tx_pool.views[i]
        hdr = self.hdr
        view[0:hdr] = TX_HEADER[:hdr]
        view[hdr : hdr + len(frame)] = frame
        self.tx.add([(self.tx_pool.addrs[i], hdr + len(frame), False)], i)
        self.tx.kick()

    def flush(self) -> None:
        """Wait until the device has taken every frame sent."""
        while self.tx.in_flight:
            for i, _used in self.tx.wait(self.timeout):
                self.tx_pool.give(i)

    def receive(self, timeout: float) -> list[bytes]:
        """Frames that arrive within ``timeout`` seconds (at least one, or none at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            self.rx.interrupts(True)
            frames = []
            pool, hdr = self.rx_pool, self.hdr
            returned = self.rx.reap()
            for i, used in returned:
                if used > hdr:
                    frames.append(bytes(pool.views[i][hdr : min(used, BUFFER)]))
                self.rx.add([(pool.addrs[i], BUFFER, True)], i)  # the buffer goes back at once
            if returned:
                self.rx.kick()
            if frames:
                return frames
            left = deadline - time.monotonic()
            if left <= 0:
                self.session.check_device()
                return []
            self.look_now_and_then()
            self.session.wait_irq(min(left, 0.05))


def frame(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet frame: destination, source, ethertype (big-endian), payload."""
    return dst + src + ethertype.to_bytes(2, "big") + payload


def parse_frame(data: bytes) -> dict:
    """dst, src, type and payload of a frame; a frame shorter than its header is all payload."""
    if len(data) < 14:
        return {"dst": None, "src": None, "type": None, "payload": data}
    return {"dst": data[0:6], "src": data[6:12], "type": int.from_bytes(data[12:14], "big"), "payload": data[14:]}
