"""The shared config page: header (both ABI eras) and queue-config entries.

Field names are the C names of ``l4virtio_config_hdr_t`` and
``l4virtio_config_queue_t``.  Each field carries a short meaning as its
Construct docstring; access is given as R (device writes, driver reads),
W (driver writes), RW (both) and "window" for the virtio-mmio compatibility
registers that L4Re devices never touch.
"""

from __future__ import annotations

from functools import cache

from construct import Array, Int16ul, Int32ul, Int64ul, Padding, Struct

from l4vctl.catalog import ABIS, QUEUE_ENTRY_STRIDE, QUEUE_ENTRY_STRIDE_I386


def _head():
    """0x00-0x73: identical in both eras."""
    return (
        "magic" / Int32ul * "R: 0x74726976, the bytes 'virt' in memory",
        "version" / Int32ul * "R: always 2 (virtio-mmio modern)",
        "device" / Int32ul * "R: virtio device id",
        "vendor" / Int32ul * "R: vendor id (Kernkonzept devices: 0x44)",
        "dev_features" / Int32ul * "window: device feature word selected by dev_features_sel",
        "dev_features_sel" / Int32ul * "window: selector for dev_features",
        "_res1" / Array(2, Int32ul) * "reserved",
        "driver_features" / Int32ul * "window: driver feature word selected by driver_features_sel",
        "driver_features_sel" / Int32ul * "window: selector for driver_features",
        "num_queues" / Int32ul * "R: entries in the queue-config array",
        "queues_offset" / Int32ul * "R: byte offset of the queue-config array (0: none)",
        "queue_sel" / Int32ul * "window: selected queue",
        "queue_num_max" / Int32ul * "window: num_max of the selected queue",
        "queue_num" / Int32ul * "window: num of the selected queue",
        "_res3" / Array(2, Int32ul) * "reserved",
        "queue_ready" / Int32ul * "window: ready of the selected queue",
        "_res4" / Array(2, Int32ul) * "reserved",
        "queue_notify" / Int32ul * "window: queue kick (L4Re devices use IRQs instead)",
        "_res5" / Array(3, Int32ul) * "reserved",
        "irq_status" / Int32ul * "R/clear: bit0 VRING, bit1 CONFIG (set by current devices only)",
        "irq_ack" / Int32ul * "window: interrupt acknowledge",
        "_res6" / Array(2, Int32ul) * "reserved",
        "status" / Int32ul * "R: device status as accepted by the device (low 8 bits)",
    )


def _windows_0x80():
    """0x80-0xA7: the 64-bit queue address windows."""
    return (
        "queue_desc" / Int64ul * "window: descriptor table address of the selected queue",
        "_res8" / Array(2, Int32ul) * "reserved",
        "queue_avail" / Int64ul * "window: available ring address of the selected queue",
        "_res9" / Array(2, Int32ul) * "reserved",
        "queue_used" / Int64ul * "window: used ring address of the selected queue",
    )


_NOTIFY_INDICES = (
    "cfg_driver_notify_index" / Int32ul * "W: driver notification slot for config events",
    "cfg_device_notify_index" / Int32ul * "R: device IRQ index for config-level events (cmd)",
    "cmd" / Int32ul * "RW: command word, command byte << 24 | 24-bit argument (0: idle)",
)

l4virtio_config_hdr_current = Struct(
    *_head(),
    *_NOTIFY_INDICES,
    *_windows_0x80(),
    "_res10" / Array(1, Int32ul) * "reserved",
    "shm_sel" / Int32ul * "W: virtio-mmio SHMSel (never acted on by L4Re devices)",
    "shm_len" / Int64ul * "R: virtio-mmio SHMLen (never filled by L4Re devices)",
    "shm_base" / Int64ul * "R: virtio-mmio SHMBase (never filled by L4Re devices)",
    "dev_features_map" / Array(6, Int32ul) * "R: device-offered features, bits 0..191",
    "_res11" / Array(2, Int32ul) * "reserved",
    "driver_features_map" / Array(6, Int32ul) * "W: driver-accepted features, bits 0..191",
    "_res12" / Array(1, Int32ul) * "reserved",
    "generation" / Int32ul * "R: config generation, +1 on every driver-initiated reset",
)

l4virtio_config_hdr_classic = Struct(
    *_head(),
    "_res7" / Array(3, Int32ul) * "reserved (current era: notify indices and cmd)",
    *_windows_0x80(),
    "dev_features_map" / Array(8, Int32ul) * "R: device-offered features, bits 0..255",
    "driver_features_map" / Array(8, Int32ul) * "W: driver-accepted features, bits 0..255",
    "_res10" / Array(2, Int32ul) * "reserved",
    *_NOTIFY_INDICES,
    "generation" / Int32ul * "R: config generation",
)

CONFIG_HDR = {
    "classic": l4virtio_config_hdr_classic,
    "current": l4virtio_config_hdr_current,
}
assert set(CONFIG_HDR) == set(ABIS)


@cache
def l4virtio_config_queue(stride: int = QUEUE_ENTRY_STRIDE) -> Struct:
    """One queue-config entry; ``stride`` 40 (LP64, ARM EABI) or 36 (i386)."""
    if stride not in (QUEUE_ENTRY_STRIDE, QUEUE_ENTRY_STRIDE_I386):
        raise ValueError(f"queue-config stride must be 40 or 36, not {stride}")
    return Struct(
        "num_max" / Int16ul * "R: largest ring size the device accepts",
        "num" / Int16ul * "W: ring size chosen by the driver (power of two)",
        "ready" / Int16ul * "RW: 1 = enable, 0 = disable; committed with CONFIG_QUEUE",
        "driver_notify_index" / Int16ul * "W: driver slot fired for used-buffer events",
        "desc_addr" / Int64ul * "W: device address of the descriptor table",
        "avail_addr" / Int64ul * "W: device address of the available ring",
        "used_addr" / Int64ul * "W: device address of the used ring",
        "device_notify_index" / Int16ul * "R: device IRQ index to kick this queue",
        Padding(stride - 34),
    )


l4virtio_config_queue_t = l4virtio_config_queue(QUEUE_ENTRY_STRIDE)
l4virtio_config_queue_i386 = l4virtio_config_queue(QUEUE_ENTRY_STRIDE_I386)


def queue_array(num_queues: int, stride: int = QUEUE_ENTRY_STRIDE) -> Array:
    """The queue-config array found at ``queues_offset``."""
    return Array(num_queues, l4virtio_config_queue(stride))
