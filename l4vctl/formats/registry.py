"""Every schema by name: the input of ``l4vctl layout`` and of the fast codecs."""

from __future__ import annotations

from l4vctl.catalog import ABIS, QUEUE_ENTRY_STRIDE, QUEUE_ENTRY_STRIDE_I386
from l4vctl.formats import cmd, devcfg, header, host, link, ring, vhost_user, wire


def fixed_schemas() -> dict:
    """Fixed-size schemas from which fast codecs are derived, by codec key.

    A key is the C name, with ``@abi`` where the layout differs between the
    eras and ``@i386`` for the 36-byte queue-config entry.
    """
    from l4vctl.formats.archive import archive_header

    out = {"archive_header": archive_header}
    for abi in ABIS:
        out[f"l4virtio_config_hdr_t@{abi}"] = header.CONFIG_HDR[abi]
    out["l4virtio_config_queue_t"] = header.l4virtio_config_queue(QUEUE_ENTRY_STRIDE)
    out["l4virtio_config_queue_t@i386"] = header.l4virtio_config_queue(QUEUE_ENTRY_STRIDE_I386)
    out["vring_desc"] = ring.vring_desc
    out["vring_used_elem"] = ring.vring_used_elem
    out["vring_avail_hdr"] = ring.vring_avail_hdr
    out["vring_used_hdr"] = ring.vring_used_hdr
    out["vring_avail_elem"] = ring.vring_avail_elem
    out["vring_event_word"] = ring.vring_event_word
    for _cls, (name, per_abi) in devcfg.DEVICE_CONFIGS.items():
        if per_abi["classic"] is per_abi["current"]:
            out[name] = per_abi["current"]
        else:
            for abi in ABIS:
                out[f"{name}@{abi}"] = per_abi[abi]
    out.update(devcfg.REQUESTS)
    out["wire_frame_header"] = wire.frame_header
    out["wire_cap_item"] = wire.cap_item
    out["wire_word"] = wire.wire_word
    out.update(vhost_user.FIXED)
    out["timeval"] = host.timeval
    out["link_header"] = link.link_header
    return out


def device_config_key(cls: str, abi: str) -> str:
    """Codec key of a device class's config struct in an ABI era."""
    name, per_abi = devcfg.DEVICE_CONFIGS[cls]
    return name if per_abi["classic"] is per_abi["current"] else f"{name}@{abi}"


def layout_structs(abi: str, num: int = 256, stride: int = QUEUE_ENTRY_STRIDE) -> dict:
    """The structs ``l4vctl layout`` shows for an ABI era, by C name, in order.

    ``num`` sizes the ring structs; ``stride`` picks the queue-config entry.
    """
    out = {
        "l4virtio_config_hdr_t": header.CONFIG_HDR[abi],
        "l4virtio_config_queue_t": header.l4virtio_config_queue(stride),
        "cmd_word": cmd.cmd_word,
        "vring_desc": ring.vring_desc,
        "vring_avail": ring.vring_avail(num),
        "vring_used_elem": ring.vring_used_elem,
        "vring_used": ring.vring_used(num),
    }
    for _cls, (name, per_abi) in devcfg.DEVICE_CONFIGS.items():
        out[name] = per_abi[abi]
    out.update(devcfg.REQUESTS)
    out["wire_frame_header"] = wire.frame_header
    out["wire_cap_item"] = wire.cap_item
    return out
