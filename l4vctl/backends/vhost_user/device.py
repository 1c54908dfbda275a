"""A vhost-user back-end presented as an L4-VIRTIO device.

:class:`VhostDevice` follows the emulator's device rules for status,
features and queues (it is an emulator :class:`~l4vctl.emulator.device.Device`)
and turns their outcome into vhost-user messages:

* REGISTER_DS becomes SET_MEM_TABLE (with every region registered so far);
* FEATURES_OK becomes SET_FEATURES with the accepted bits;
* a queue enabled while DRIVER_OK (or at DRIVER_OK) becomes SET_VRING_NUM,
  SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL and
  SET_VRING_ENABLE; a reset stops the rings with GET_VRING_BASE.

Each queue gets a kick eventfd of its own (its ``device_notify_index`` is
queue + 1); the driver's IRQ is every queue's call eventfd.
"""

from __future__ import annotations

import os
from typing import Any

from l4vctl import catalog as cat
from l4vctl.backends.vhost_user import client as vu
from l4vctl.backends.vhost_user.client import VhostUserClient
from l4vctl.caps import PAGE, Irq, close_fds
from l4vctl.emulator import log
from l4vctl.emulator.device import Device, Queue
from l4vctl.emulator.models.base import Model
from l4vctl.emulator.ring import DeviceRing
from l4vctl.errors import ProtocolError


class VhostModel(Model):
    """A device model whose identity comes from the back-end."""

    def __init__(self, options: dict[str, Any], kind: str, device_id: int, features: set[int],
                 config: dict[str, Any], queues: int):  # fmt: skip
        super().__init__(options)
        self.KIND = kind
        self.DEVICE_ID = device_id
        self._features = features
        self._config = config
        self._queues = queues
        self.device: VhostDevice | None = None

    def features(self) -> set[int]:
        """What the back-end offers (vhost-user's own bits left out)."""
        return set(self._features)

    def config(self) -> dict[str, Any]:
        """The device config GET_CONFIG reported (empty without ?type=)."""
        return dict(self._config)

    def num_queues(self) -> int:
        """What GET_QUEUE_NUM reported (1 without the MQ protocol feature)."""
        return self._queues

    def check_features(self, accepted: set[int]) -> bool:
        """FEATURES_OK: the accepted bits go to the back-end (SET_FEATURES)."""
        assert self.device is not None
        return self.device.vhost_set_features(accepted)

    def reset(self) -> None:
        """A device reset stops the back-end's rings."""
        if self.device is not None:
            self.device.vhost_stop_rings()

    def process(self, queue: Queue, ring: DeviceRing) -> None:
        """Nothing: the back-end serves the rings itself."""
        return

    def describe(self) -> str:
        """What the device is, for logs."""
        return f"{self.KIND} behind vhost-user"


class VhostDevice(Device):
    """The L4-VIRTIO device rules on top of a vhost-user back-end."""

    def __init__(self, model: VhostModel, client: VhostUserClient, backend_features: int):
        self.client = client
        self.backend_features = backend_features
        self.region_fds: list[tuple[int, int, int, int]] = []  # (base, size, offset, fd)
        self.queue_kicks: list[Irq] = []
        self.started: set[int] = set()
        #: what GET_QUEUE_NUM and GET_CONFIG told (see ``queue_facts``)
        self.facts: dict[str, Any] = {}
        super().__init__(model)
        self.queue_kicks = [Irq.create() for _ in range(self.num_queues)]
        self._publish_notify_indices()

    def _publish_notify_indices(self) -> None:
        for i in range(self.num_queues):
            self.publish_notify_index(i, i + 1)

    @property
    def keeps_protocol_features(self) -> bool:
        """True if the back-end speaks the vhost-user protocol features (bit 30 stays on)."""
        return bool(self.backend_features >> cat.VHOST_USER_F_PROTOCOL_FEATURES & 1)

    def reset(self) -> None:
        """The device reset, then every queue's own notify index again."""
        super().reset()
        self._publish_notify_indices()

    def irq_for_index(self, index: int) -> Irq | None:
        """Notify index 0: the device IRQ; queue + 1: that queue's kick eventfd."""
        if index == 0:
            return self.kick_irq
        if 1 <= index <= len(self.queue_kicks):
            return self.queue_kicks[index - 1]
        return None

    # -- memory ------------------------------------------------------------------------

    def register_ds(self, ds_fd: int | None, rights: int, base: int, offset: int, size: int) -> int:
        """REGISTER_DS as the emulator does it, then the new memory table to the back-end."""
        if len(self.region_fds) >= cat.VHOST_USER_MAX_REGIONS:
            log.warning("vhost-user memory tables hold at most %d regions: -L4_ENOMEM", cat.VHOST_USER_MAX_REGIONS)
            return -cat.L4_ENOMEM
        result = super().register_ds(ds_fd, rights, base, offset, size)
        if result == 0 and ds_fd is not None:
            region = self.regions[-1]
            self.region_fds.append((region.base, region.size, offset & ~(PAGE - 1), os.dup(ds_fd)))
            self._send_mem_table()
        return result

    def _send_mem_table(self) -> None:
        table = vu.memory_table([(base, size, offset) for base, size, offset, _fd in self.region_fds])
        self.client.send(cat.VHOST_USER_SET_MEM_TABLE, table, [fd for *_rest, fd in self.region_fds])

    # -- features and status ---------------------------------------------------------------

    def vhost_set_features(self, accepted: set[int]) -> bool:
        """SET_FEATURES with the accepted device bits (and the protocol-features bit if spoken)."""
        value = 0
        for bit in set(accepted) - self.facts.get("front_end_bits", set()):  # bits l4vctl offered itself stay here
            if bit < 64:
                value |= 1 << bit
        if self.keeps_protocol_features:
            value |= 1 << cat.VHOST_USER_F_PROTOCOL_FEATURES  # keep the vhost-user protocol features on
        self.client.send(cat.VHOST_USER_SET_FEATURES, vu.u64(value))
        return True

    def set_status(self, value: int) -> None:
        """The status rules; DRIVER_OK starts every enabled queue at the back-end."""
        was = self.status
        super().set_status(value)
        if self.status & cat.STATUS_DRIVER_OK and not was & cat.STATUS_DRIVER_OK:
            for q in self.queues:
                if q.enabled:
                    self._start(q)

    def setup_queue(self, index: int) -> int:
        """The queue rules; a queue enabled while running starts, one disabled stops."""
        result = super().setup_queue(index)
        if index < len(self.queues):
            q = self.queues[index]
            if q.enabled and self.status & cat.STATUS_DRIVER_OK:
                self._start(q)
            elif not q.enabled and index in self.started:
                self._stop(index)
        return result

    # -- rings -------------------------------------------------------------------------------

    def _start(self, q: Queue) -> None:
        c = self.client
        i = q.index
        if i in self.started:
            self._stop(i)
        try:
            c.send(cat.VHOST_USER_SET_VRING_NUM, vu.vring_state(i, q.num))
        except ProtocolError as exc:
            # vhost-user has no message that tells the largest ring a back-end takes
            raise ProtocolError(
                f"{exc} for a {q.num}-entry ring",
                hint="vhost-user does not report a back-end's largest ring: ask for smaller ones with ?num_max=N "
                "(e.g. num_max=128)",
            ) from None
        c.send(cat.VHOST_USER_SET_VRING_BASE, vu.vring_state(i, 0))
        c.send(cat.VHOST_USER_SET_VRING_ADDR, vu.vring_addr(i, q.desc_addr, q.used_addr, q.avail_addr))
        c.send(cat.VHOST_USER_SET_VRING_KICK, vu.vring_fd(i, True), [self.queue_kicks[i].fd])
        if self.driver_irq is not None:
            c.send(cat.VHOST_USER_SET_VRING_CALL, vu.vring_fd(i, True), [self.driver_irq.fd])
        else:
            c.send(cat.VHOST_USER_SET_VRING_CALL, vu.vring_fd(i, False))  # no call fd: the driver polls
        if self.keeps_protocol_features:
            c.send(cat.VHOST_USER_SET_VRING_ENABLE, vu.vring_state(i, 1))
        self.started.add(i)
        log.info("vring %d started: num %d", i, q.num)

    def _stop(self, index: int) -> None:
        if self.client.sock is None:
            return
        body = self.client.call(cat.VHOST_USER_GET_VRING_BASE, vu.vring_state(index, 0))
        self.started.discard(index)
        log.info("vring %d stopped at %d", index, vu.vring_state_num(body))

    def vhost_stop_rings(self) -> None:
        """GET_VRING_BASE for every started ring."""
        for i in sorted(self.started):
            self._stop(i)

    def close(self) -> None:
        """Close the memory table's fds and the kick eventfds, then the device."""
        close_fds(fd for *_rest, fd in self.region_fds)
        self.region_fds.clear()
        for irq in self.queue_kicks:
            irq.close()
        super().close()
