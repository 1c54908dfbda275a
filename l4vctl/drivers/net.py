"""A virtio-net driver: send and receive Ethernet frames."""

from __future__ import annotations

import time

from l4vctl import catalog as cat
from l4vctl.drivers import require_class
from l4vctl.drivers.buffers import BufferPool
from l4vctl.errors import UsageError
from l4vctl.formats.fast import codec

RX, TX = cat.NET_RX_QUEUE, cat.NET_TX_QUEUE
_NET_HDR = codec("l4virtio_net_header_t")
HDR = _NET_HDR.size
#: The header in front of every frame sent: no checksum offload, no segmentation.
TX_HEADER = _NET_HDR.pack(
    {"flags": 0, "gso_type": 0, "hdr_len": 0, "gso_size": 0, "csum_start": 0, "csum_offset": 0, "num_buffers": 0}
)
BUFFER = 2048
BROADCAST = b"\xff" * 6
#: IEEE 802 local experimental ethertype, used by l4vctl's own frames.
ETHERTYPE = 0x88B5


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class NetDriver:
    def __init__(self, session, *, buffers: int = 32):
        require_class(session, "net")
        self.session = session
        self.timeout = session.timeout
        cfg = session.device_config()
        self.mac = bytes(cfg["mac"]) if 5 in session.negotiated and "mac" in cfg else bytes.fromhex("020000000001")
        #: the largest frame the device takes: its MTU plus the Ethernet header (VIRTIO_NET_F_MTU)
        self.max_frame = BUFFER - HDR
        if 3 in session.negotiated and cfg.get("mtu"):
            self.max_frame = min(self.max_frame, cfg["mtu"] + 14)
        self.rx = session.virtqueue(RX)
        self.tx = session.virtqueue(TX)
        n = max(1, min(buffers, self.rx.num, self.tx.num))
        self.rx_pool = BufferPool(session, n, BUFFER, "l4vctl-net-rx")
        self.tx_pool = BufferPool(session, n, BUFFER, "l4vctl-net-tx")
        while self.rx_pool.free:
            i = self.rx_pool.take()
            self.rx.add([(self.rx_pool.addrs[i], BUFFER, True)], i)
        self.rx.kick()

    def send(self, frame: bytes) -> None:
        if len(frame) > self.max_frame:
            limit = "the device's MTU" if self.max_frame < BUFFER - HDR else "the buffer size"
            raise UsageError(f"a frame of {len(frame)} bytes is larger than {self.max_frame} ({limit})")
        for i, _used in self.tx.reap():
            self.tx_pool.give(i)
        while not self.tx_pool.free:
            for i, _used in self.tx.wait(self.timeout):
                self.tx_pool.give(i)
        i = self.tx_pool.take()
        view = self.tx_pool.views[i]
        view[0:HDR] = TX_HEADER
        view[HDR : HDR + len(frame)] = frame
        self.tx.add([(self.tx_pool.addrs[i], HDR + len(frame), False)], i)
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
            pool = self.rx_pool
            returned = self.rx.reap()
            for i, used in returned:
                if used > HDR:
                    frames.append(bytes(pool.views[i][HDR:used]))
                self.rx.add([(pool.addrs[i], BUFFER, True)], i)  # the buffer goes back at once
            if returned:
                self.rx.kick()
            if frames:
                return frames
            left = deadline - time.monotonic()
            if left <= 0:
                self.session.check_device()
                return []
            self.session.wait_irq(min(left, 0.05))


def frame(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


def parse_frame(data: bytes) -> dict:
    if len(data) < 14:
        return {"dst": None, "src": None, "type": None, "payload": data}
    return {"dst": data[0:6], "src": data[6:12], "type": int.from_bytes(data[12:14], "big"), "payload": data[14:]}
