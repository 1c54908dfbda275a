"""virtio-blk model."""

from __future__ import annotations

from l4vctl import catalog as cat
from l4vctl.emulator.models import Option, parse_bool, parse_int, parse_size
from l4vctl.emulator.models.base import Model


class BlkModel(Model):
    KIND = "blk"
    DEVICE_ID = 2
    DEFAULT_QUEUES = 1
    DEFAULT_NUM_MAX = 256
    OPTIONS = (
        Option("size", parse_size, 64 << 20, "capacity in bytes (512-byte sectors), e.g. 64M"),
        Option("ro", parse_bool, False, "read-only device (VIRTIO_BLK_F_RO)"),
        Option("seg_max", parse_int, 126, "most data segments per request (0: not offered)"),
        Option("size_max", parse_int, 1 << 20, "largest segment in bytes (0: not offered)"),
        Option("blk_size", parse_int, 512, "logical block size in bytes"),
    )

    def features(self) -> set[int]:
        o = self.options
        bits = {cat.INDIRECT_DESC_BIT, 6, 9}  # BLK_SIZE, FLUSH
        if o["seg_max"]:
            bits.add(2)
        if o["size_max"]:
            bits.add(1)
        if o["ro"]:
            bits.add(5)
        return bits

    def config(self) -> dict:
        o = self.options
        return {
            "capacity": o["size"] // cat.BLK_SECTOR_SIZE,
            "size_max": o["size_max"],
            "seg_max": o["seg_max"],
            "blk_size": o["blk_size"],
        }

    def describe(self) -> str:
        o = self.options
        return f"blk {o['size'] >> 20} MiB{' read-only' if o['ro'] else ''}"
