"""virtio-net model."""

from __future__ import annotations

from l4vctl import catalog as cat
from l4vctl.emulator.models import Option, parse_int
from l4vctl.emulator.models.base import Model


def parse_mac(text) -> bytes:
    if isinstance(text, bytes) and len(text) == 6:
        return text
    parts = str(text).replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56") from None


class NetModel(Model):
    KIND = "net"
    DEVICE_ID = 1
    DEFAULT_QUEUES = 2  # 0 receive, 1 transmit
    MIN_QUEUES = 2
    DEFAULT_NUM_MAX = 256
    OPTIONS = (
        Option("mac", parse_mac, bytes.fromhex("525400123456"), "MAC address (VIRTIO_NET_F_MAC)"),
        Option("mtu", parse_int, 1500, "MTU advice (VIRTIO_NET_F_MTU)"),
    )

    def features(self) -> set[int]:
        return {3, 5, 16}  # MTU, MAC, STATUS

    def config(self) -> dict:
        return {"mac": self.options["mac"], "status": cat.NET_S_LINK_UP, "mtu": self.options["mtu"]}

    def required_queues(self) -> list[int]:
        return [cat.NET_RX_QUEUE, cat.NET_TX_QUEUE]

    def describe(self) -> str:
        return "net " + ":".join(f"{b:02x}" for b in self.options["mac"])
