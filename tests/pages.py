"""Config pages for tests.

``independent_page`` writes fields at the offsets of the protocol notes with
plain ``struct.pack_into``, so decoding tests do not depend on our schemas
being right.  ``device_page`` uses the library's builder for convenience.
"""

from __future__ import annotations

import struct

from l4vctl import page

# Field offsets per era, straight from the protocol notes' tables.
SPEC_OFFSETS = {
    "current": {"cmd": 0x7C, "cfg_drv": 0x74, "cfg_dev": 0x78, "dev_map": 0xC0, "drv_map": 0xE0, "words": 6},
    "classic": {"cmd": 0xF8, "cfg_drv": 0xF0, "cfg_dev": 0xF4, "dev_map": 0xA8, "drv_map": 0xC8, "words": 8},
}


def independent_page(abi: str, *, device=2, status=0x0F, generation=7, cmd=0, dev_words=None, drv_words=None,
                     num_queues=1, queues_offset=0x140, queue=None, cfg_drv=0, cfg_dev=0,
                     size=4096) -> bytes:  # fmt: skip
    o = SPEC_OFFSETS[abi]
    p = bytearray(size)
    struct.pack_into("<4sIII", p, 0, b"virt", 2, device, 0x44)
    struct.pack_into("<II", p, 0x28, num_queues, queues_offset)
    struct.pack_into("<I", p, 0x70, status)
    struct.pack_into("<I", p, 0xFC, generation)
    struct.pack_into("<I", p, o["cmd"], cmd)
    struct.pack_into("<I", p, o["cfg_drv"], cfg_drv)
    struct.pack_into("<I", p, o["cfg_dev"], cfg_dev)
    dev_words = dev_words or [1 << 28, 1]  # INDIRECT_DESC, VERSION_1
    for i, w in enumerate(dev_words):
        struct.pack_into("<I", p, o["dev_map"] + 4 * i, w)
    for i, w in enumerate(drv_words or []):
        struct.pack_into("<I", p, o["drv_map"] + 4 * i, w)
    if queue is not None:
        num_max, num, ready, drv_idx, desc, avail, used, dev_idx = queue
        struct.pack_into("<HHHHQQQH", p, queues_offset, num_max, num, ready, drv_idx, desc, avail, used, dev_idx)
    return bytes(p)


def device_page(abi: str, cls: str, **kw) -> bytes:
    from l4vctl.catalog import DEVICE_CLASSES

    return bytes(page.build_page(abi, DEVICE_CLASSES[cls], **kw))


#: A representative page per device class, in the shape L4Re devices publish.
CLASS_PAGES = {
    "blk": dict(
        features=[1, 2, 6, 9, 28, 32],
        device_config={"capacity": 131072, "seg_max": 126, "size_max": 65536, "blk_size": 512},
    ),
    "net": dict(
        features=[5, 16, 32],
        device_config={"mac": bytes.fromhex("525400123456"), "status": 1, "mtu": 1500},
        num_queues=2,
    ),
    "console": dict(features=[0, 32], device_config={"cols": 80, "rows": 25}, num_queues=2),
    "rng": dict(features=[28, 32], num_max=128),
    "input": dict(
        features=[32],
        device_config={"select": 1, "size": 5, "u": b"mouse" + bytes(123)},
        num_queues=2,
        num_max=64,
    ),
    "vsock": dict(features=[32], device_config={"guest_cid": 3}, num_queues=3),
}
