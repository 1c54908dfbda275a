"""virtio-rng model."""

from __future__ import annotations

from l4vctl import catalog as cat
from l4vctl.emulator.models.base import Model


class RngModel(Model):
    KIND = "rng"
    DEVICE_ID = 4
    DEFAULT_QUEUES = 1
    DEFAULT_NUM_MAX = 128

    def features(self) -> set[int]:
        return {cat.INDIRECT_DESC_BIT}
