"""virtio-console model."""

from __future__ import annotations

from l4vctl.emulator.models import Option, parse_int
from l4vctl.emulator.models.base import Model


class ConsoleModel(Model):
    KIND = "console"
    DEVICE_ID = 3
    DEFAULT_QUEUES = 2  # port 0: receive 0, transmit 1
    MIN_QUEUES = 2
    DEFAULT_NUM_MAX = 128
    OPTIONS = (
        Option("cols", parse_int, 80, "columns (VIRTIO_CONSOLE_F_SIZE)"),
        Option("rows", parse_int, 25, "rows (VIRTIO_CONSOLE_F_SIZE)"),
    )

    def features(self) -> set[int]:
        return {0}  # SIZE

    def config(self) -> dict:
        return {"cols": self.options["cols"], "rows": self.options["rows"], "max_nr_ports": 1}

    def required_queues(self) -> list[int]:
        return [0, 1]
