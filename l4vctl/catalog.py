"""Every constant of the L4-VIRTIO transport and the virtio device classes.

Numbers and names are facts from the L4-VIRTIO protocol notes
(``l4virtio-transport.md``) and the virtio 1.x specification.  This module
is plain data plus a few lookups; it imports nothing heavy.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence


class Abi(enum.StrEnum):
    """A header layout era; members compare equal to their strings."""

    CLASSIC = "classic"
    CURRENT = "current"


class Role(enum.StrEnum):
    """What a client of the socket emulation is: the driver or a read-only monitor."""

    DRIVER = "driver"
    MONITOR = "monitor"


class Mode(enum.StrEnum):
    """How a driver writes status and queue config: by IPC or through the cmd word."""

    AUTO = "auto"
    IPC = "ipc"
    CMD = "cmd"


ABIS: tuple[str, ...] = (Abi.CLASSIC.value, Abi.CURRENT.value)
DEFAULT_ABI = Abi.CURRENT.value
#: The modes a driver session takes (``auto``: cmd if the device offers it).
MODES: tuple[str, ...] = (Mode.AUTO.value, Mode.IPC.value, Mode.CMD.value)

# -- identification ----------------------------------------------------------

L4VIRTIO_MAGIC = 0x74726976  # the bytes b"virt" in little-endian memory
L4VIRTIO_MAGIC_BYTES = b"virt"
L4VIRTIO_VERSION = 2
L4VIRTIO_VENDOR_KK = 0x44

VENDORS: Mapping[int, str] = {L4VIRTIO_VENDOR_KK: "Kernkonzept"}

PAGE_SIZE = 4096
HEADER_SIZE = 0x100
DEVICE_CONFIG_OFFSET = 0x100
QUEUE_ENTRY_STRIDE = 40  # LP64 and ARM EABI
QUEUE_ENTRY_STRIDE_I386 = 36  # 64-bit members only 4-aligned on i386
QUEUE_STRIDES = (QUEUE_ENTRY_STRIDE, QUEUE_ENTRY_STRIDE_I386)
MAX_QUEUE_SIZE = 32768  # largest split-ring size (u16 index space)

# -- IPC protocol labels and opcodes ------------------------------------------

L4VIRTIO_PROTOCOL = 0
L4_PROTO_IRQ = -1
L4_PROTO_META = -21

PROTOCOLS: Mapping[int, str] = {
    L4VIRTIO_PROTOCOL: "L4VIRTIO",
    L4_PROTO_IRQ: "ICU",
    L4_PROTO_META: "META",
}

OP_SET_STATUS = 0
OP_CONFIG_QUEUE = 1
OP_REGISTER_IFACE = 2  # classic only
OP_REGISTER_DS = 3
OP_DEVICE_CONFIG = 4
OP_GET_DEVICE_IRQ = 5

#: L4-VIRTIO interface opcodes (label 0) per server generation.  The classic
#: and current numberings agree on 0, 1, 3, 4 and 5; 2 exists only in classic.
VIRTIO_OPCODES: Mapping[str, Mapping[int, str]] = {
    "classic": {
        0: "SET_STATUS",
        1: "CONFIG_QUEUE",
        2: "REGISTER_IFACE",
        3: "REGISTER_DS",
        4: "DEVICE_CONFIG",
        5: "DEVICE_NOTIFICATION_IRQ",
    },
    "current": {
        0: "SET_STATUS",
        1: "CONFIG_QUEUE",
        3: "REGISTER_DS",
        4: "DEVICE_CONFIG",
        5: "GET_DEVICE_IRQ",
    },
}

ICU_OP_BIND = 0
ICU_OP_UNBIND = 1
ICU_OP_INFO = 2
ICU_OP_MSI_INFO = 3
ICU_OP_UNMASK = 4
ICU_OP_MASK = 5
ICU_OP_SET_MODE = 6

ICU_OPCODES: Mapping[int, str] = {
    0: "BIND",
    1: "UNBIND",
    2: "INFO",
    3: "MSI_INFO",
    4: "UNMASK",
    5: "MASK",
    6: "SET_MODE",
}

# -- L4 error codes (returned negated) ------------------------------------------

L4_EOK = 0
L4_EPERM = 1
L4_ENOENT = 2
L4_EIO = 5
L4_ENXIO = 6
L4_EAGAIN = 11
L4_ENOMEM = 12
L4_EACCESS = 13
L4_EFAULT = 14
L4_EBUSY = 16
L4_EEXIST = 17
L4_ENODEV = 19
L4_EINVAL = 22
L4_ERANGE = 34
L4_ENOSYS = 38
L4_EBADPROTO = 39
L4_ENOREPLY = 1000
L4_EMSGTOOSHORT = 1001
L4_EMSGTOOLONG = 1002
L4_EMSGMISSARG = 1003

L4_ERRORS: Mapping[int, str] = {
    L4_EOK: "L4_EOK",
    L4_EPERM: "L4_EPERM",
    L4_ENOENT: "L4_ENOENT",
    L4_EIO: "L4_EIO",
    L4_ENXIO: "L4_ENXIO",
    L4_EAGAIN: "L4_EAGAIN",
    L4_ENOMEM: "L4_ENOMEM",
    L4_EACCESS: "L4_EACCESS",
    L4_EFAULT: "L4_EFAULT",
    L4_EBUSY: "L4_EBUSY",
    L4_EEXIST: "L4_EEXIST",
    L4_ENODEV: "L4_ENODEV",
    L4_EINVAL: "L4_EINVAL",
    L4_ERANGE: "L4_ERANGE",
    L4_ENOSYS: "L4_ENOSYS",
    L4_EBADPROTO: "L4_EBADPROTO",
    L4_ENOREPLY: "L4_ENOREPLY",
    L4_EMSGTOOSHORT: "L4_EMSGTOOSHORT",
    L4_EMSGTOOLONG: "L4_EMSGTOOLONG",
    L4_EMSGMISSARG: "L4_EMSGMISSARG",
}


def l4_error_name(code: int) -> str:
    """Name an IPC result code: ``-22`` -> ``-L4_EINVAL``."""
    if code >= 0:
        return str(code) if code else "L4_EOK"
    name = L4_ERRORS.get(-code)
    return f"-{name}" if name else str(code)


# -- capability rights -----------------------------------------------------------

CAP_RIGHT_W = 0x1
CAP_RIGHT_S = 0x2
CAP_RIGHT_R = 0x4
CAP_RIGHT_D = 0x8
CAP_RIGHTS_RO = CAP_RIGHT_R
CAP_RIGHTS_RW = CAP_RIGHT_R | CAP_RIGHT_W
FPAGE_RIGHT_X = 1
FPAGE_RIGHT_W = 2
FPAGE_RIGHT_R = 4

# -- device status ----------------------------------------------------------------

STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80
STATUS_FAIL_MASK = STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED
STATUS_RUNNING = 0x0F

#: Status bits in handshake order (the order in which text output lists them).
STATUS_BITS: tuple[tuple[int, str], ...] = (
    (STATUS_ACKNOWLEDGE, "ACKNOWLEDGE"),
    (STATUS_DRIVER, "DRIVER"),
    (STATUS_FEATURES_OK, "FEATURES_OK"),
    (STATUS_DRIVER_OK, "DRIVER_OK"),
    (STATUS_DEVICE_NEEDS_RESET, "DEVICE_NEEDS_RESET"),
    (STATUS_FAILED, "FAILED"),
)

# -- irq_status and cmd words -------------------------------------------------

IRQ_STATUS_VRING = 1
IRQ_STATUS_CONFIG = 2
IRQ_STATUS_BITS: tuple[tuple[int, str], ...] = (
    (IRQ_STATUS_VRING, "VRING"),
    (IRQ_STATUS_CONFIG, "CONFIG"),
)

CMD_NONE = 0x00000000
CMD_SET_STATUS = 0x01000000
CMD_CFG_QUEUE = 0x02000000
CMD_CFG_CHANGED = 0x04000000  # current era only
CMD_NOTIFY_QUEUE = 0x08000000  # current era only
CMD_MASK = 0xFF000000
CMD_ARG_MASK = 0x00FFFFFF

#: Command byte (top byte of the cmd word) -> (name, eras that define it).
CMD_WORDS: Mapping[int, tuple[str, tuple[str, ...]]] = {
    CMD_SET_STATUS >> 24: ("SET_STATUS", ABIS),
    CMD_CFG_QUEUE >> 24: ("CFG_QUEUE", ABIS),
    CMD_CFG_CHANGED >> 24: ("CFG_CHANGED", ("current",)),
    CMD_NOTIFY_QUEUE >> 24: ("NOTIFY_QUEUE", ("current",)),
}


def cmd_word(command: int, argument: int) -> int:
    """Compose a cmd word from a CMD_* constant and a 24-bit argument."""
    return (command & CMD_MASK) | (argument & CMD_ARG_MASK)


# -- device ids ---------------------------------------------------------------


class DeviceId:
    """A virtio device id: L4Re/virtio name, l4vctl class name if modelled, era."""

    __slots__ = ("id", "name", "cls", "era")

    def __init__(self, id: int, name: str, cls: str | None, era: str = "both"):
        self.id = id
        self.name = name
        self.cls = cls
        self.era = era

    def __repr__(self) -> str:
        return f"DeviceId({self.id}, {self.name!r}, {self.cls!r}, {self.era!r})"


DEVICE_ID_NET = 1
DEVICE_ID_BLK = 2
DEVICE_ID_CONSOLE = 3
DEVICE_ID_RNG = 4

#: Device ids of the virtio 1.3 specification (chapter "Device Types"), named
#: as in Linux's virtio_ids.h where Linux has a name.  37 is reserved in the
#: specification; Linux names it DMABUF.
DEVICE_IDS: Mapping[int, DeviceId] = {
    d.id: d
    for d in (
        DeviceId(DEVICE_ID_NET, "NET", "net"),
        DeviceId(DEVICE_ID_BLK, "BLOCK", "blk"),
        DeviceId(DEVICE_ID_CONSOLE, "CONSOLE", "console"),
        DeviceId(DEVICE_ID_RNG, "RNG", "rng"),
        DeviceId(5, "BALLOON", None),
        DeviceId(6, "IOMEM", None),
        DeviceId(7, "RPMSG", None),
        DeviceId(8, "SCSI", None),
        DeviceId(9, "9P", None),
        DeviceId(10, "MAC80211_WLAN", None),
        DeviceId(11, "RPROC_SERIAL", None),
        DeviceId(12, "CAIF", None),
        DeviceId(13, "MEMORY_BALLOON", None),
        DeviceId(16, "GPU", None),
        DeviceId(17, "CLOCK", None),
        DeviceId(18, "INPUT", "input"),
        DeviceId(19, "VSOCK", "vsock"),
        DeviceId(20, "CRYPTO", None),
        DeviceId(21, "SIGNAL_DIST", None),
        DeviceId(22, "PSTORE", None),
        DeviceId(23, "IOMMU", None),
        DeviceId(24, "MEM", None),
        DeviceId(25, "SOUND", None),
        DeviceId(26, "FS", None, "current"),
        DeviceId(27, "PMEM", None),
        DeviceId(28, "RPMB", None),
        DeviceId(29, "MAC80211_HWSIM", None),
        DeviceId(30, "VIDEO_ENCODER", None),
        DeviceId(31, "VIDEO_DECODER", None),
        DeviceId(32, "SCMI", None, "current"),
        DeviceId(33, "NITRO_SEC_MOD", None),
        DeviceId(34, "I2C", None, "current"),
        DeviceId(35, "WATCHDOG", None, "current"),
        DeviceId(36, "CAN", None, "current"),
        DeviceId(37, "DMABUF", None),
        DeviceId(38, "PARAM_SERV", None),
        DeviceId(39, "AUDIO_POLICY", None),
        DeviceId(40, "BT", None),
        DeviceId(41, "GPIO", None, "current"),
        DeviceId(42, "RDMA", None),
        DeviceId(43, "CAMERA", None),
        DeviceId(44, "ISM", None),
        DeviceId(45, "SPI", None, "current"),
        DeviceId(0x9999, "SOCK", None),
    )
}

#: Device classes that l4vctl knows in detail (device config, feature names).
DEVICE_CLASSES: Mapping[str, int] = {d.cls: d.id for d in DEVICE_IDS.values() if d.cls}


def device_name(device_id: int) -> str:
    """The name of a virtio device ID, ``UNKNOWN(0x..)`` for one not in the table."""
    d = DEVICE_IDS.get(device_id)
    return d.name if d else f"UNKNOWN({device_id:#x})"


def device_class(device_id: int) -> str | None:
    """The device class l4vctl knows a device ID as (``"blk"``), or None."""
    d = DEVICE_IDS.get(device_id)
    return d.cls if d else None


# -- feature bits ---------------------------------------------------------------


class Feature:
    """A feature bit: virtio/L4Re macro name, lower-case command-line name,
    the Linux UAPI macro name where it differs, and a note."""

    __slots__ = ("bit", "name", "short", "linux", "note")

    def __init__(self, bit: int, name: str, short: str, linux: str | None = None, note: str = ""):
        self.bit = bit
        self.name = name
        self.short = short
        self.linux = linux
        self.note = note

    def __repr__(self) -> str:
        return f"Feature({self.bit}, {self.name!r})"


def _table(features: Iterable[Feature]) -> Mapping[int, Feature]:
    return {f.bit: f for f in features}


CMD_CONFIG_BIT: Mapping[str, int] = {"classic": 224, "current": 160}
#: 32-bit words of the device and driver feature maps per ABI era.
FEATURE_MAP_WORDS: Mapping[str, int] = {"classic": 8, "current": 6}
VERSION_1_BIT = 32
INDIRECT_DESC_BIT = 28
EVENT_IDX_BIT = 29

_TRANSPORT_COMMON = (
    Feature(24, "VIRTIO_F_NOTIFY_ON_EMPTY", "notify_on_empty", note="legacy"),
    Feature(27, "VIRTIO_F_ANY_LAYOUT", "any_layout", note="legacy"),
    Feature(28, "VIRTIO_F_INDIRECT_DESC", "indirect_desc", linux="VIRTIO_RING_F_INDIRECT_DESC"),
    Feature(29, "VIRTIO_F_EVENT_IDX", "event_idx", linux="VIRTIO_RING_F_EVENT_IDX"),
    Feature(32, "VIRTIO_F_VERSION_1", "version_1"),
    Feature(33, "VIRTIO_F_ACCESS_PLATFORM", "access_platform"),
    Feature(34, "VIRTIO_F_RING_PACKED", "ring_packed"),
    Feature(35, "VIRTIO_F_IN_ORDER", "in_order"),
    Feature(36, "VIRTIO_F_ORDER_PLATFORM", "order_platform"),
    Feature(37, "VIRTIO_F_SR_IOV", "sr_iov"),
    Feature(38, "VIRTIO_F_NOTIFICATION_DATA", "notification_data"),
    Feature(39, "VIRTIO_F_NOTIF_CONFIG_DATA", "notif_config_data"),
    Feature(40, "VIRTIO_F_RING_RESET", "ring_reset"),
    Feature(41, "VIRTIO_F_ADMIN_VQ", "admin_vq"),
)

#: Transport feature bits per ABI era (CMD_CONFIG moved from 224 to 160).
TRANSPORT_FEATURES: Mapping[str, Mapping[int, Feature]] = {
    abi: _table(
        (
            *_TRANSPORT_COMMON,
            Feature(
                CMD_CONFIG_BIT[abi],
                "L4VIRTIO_FEATURE_CMD_CONFIG",
                "cmd_config",
                note="status and queue config through the cmd word",
            ),
        )
    )
    for abi in ABIS
}

# device-class feature bits (bit numbers), one name per bit of the tables below
BLK_F_BARRIER = 0
BLK_F_SIZE_MAX = 1
BLK_F_SEG_MAX = 2
BLK_F_GEOMETRY = 4
BLK_F_RO = 5
BLK_F_BLK_SIZE = 6
BLK_F_SCSI = 7
BLK_F_FLUSH = 9
BLK_F_TOPOLOGY = 10
BLK_F_CONFIG_WCE = 11
BLK_F_MQ = 12
BLK_F_DISCARD = 13
BLK_F_WRITE_ZEROES = 14
BLK_F_LIFETIME = 15
BLK_F_SECURE_ERASE = 16
BLK_F_ZONED = 17

NET_F_CSUM = 0
NET_F_GUEST_CSUM = 1
NET_F_CTRL_GUEST_OFFLOADS = 2
NET_F_MTU = 3
NET_F_MAC = 5
NET_F_GSO = 6
NET_F_GUEST_TSO4 = 7
NET_F_GUEST_TSO6 = 8
NET_F_GUEST_ECN = 9
NET_F_GUEST_UFO = 10
NET_F_HOST_TSO4 = 11
NET_F_HOST_TSO6 = 12
NET_F_HOST_ECN = 13
NET_F_HOST_UFO = 14
NET_F_MRG_RXBUF = 15
NET_F_STATUS = 16
NET_F_CTRL_VQ = 17
NET_F_CTRL_RX = 18
NET_F_CTRL_VLAN = 19
NET_F_CTRL_RX_EXTRA = 20
NET_F_GUEST_ANNOUNCE = 21
NET_F_MQ = 22
NET_F_CTRL_MAC_ADDR = 23
NET_F_HASH_TUNNEL = 51
NET_F_VQ_NOTF_COAL = 52
NET_F_NOTF_COAL = 53
NET_F_GUEST_USO4 = 54
NET_F_GUEST_USO6 = 55
NET_F_HOST_USO = 56
NET_F_HASH_REPORT = 57
NET_F_GUEST_HDRLEN = 59
NET_F_RSS = 60
NET_F_RSC_EXT = 61
NET_F_STANDBY = 62
NET_F_SPEED_DUPLEX = 63

CONSOLE_F_SIZE = 0
CONSOLE_F_MULTIPORT = 1
CONSOLE_F_EMERG_WRITE = 2

VSOCK_F_STREAM = 0
VSOCK_F_SEQPACKET = 1

DEVICE_FEATURES: Mapping[str, Mapping[int, Feature]] = {
    "blk": _table(
        (
            Feature(BLK_F_BARRIER, "VIRTIO_BLK_F_BARRIER", "barrier", note="legacy"),
            Feature(BLK_F_SIZE_MAX, "VIRTIO_BLK_F_SIZE_MAX", "size_max"),
            Feature(BLK_F_SEG_MAX, "VIRTIO_BLK_F_SEG_MAX", "seg_max"),
            Feature(BLK_F_GEOMETRY, "VIRTIO_BLK_F_GEOMETRY", "geometry"),
            Feature(BLK_F_RO, "VIRTIO_BLK_F_RO", "ro"),
            Feature(BLK_F_BLK_SIZE, "VIRTIO_BLK_F_BLK_SIZE", "blk_size"),
            Feature(BLK_F_SCSI, "VIRTIO_BLK_F_SCSI", "scsi", note="legacy"),
            Feature(BLK_F_FLUSH, "VIRTIO_BLK_F_FLUSH", "flush"),
            Feature(BLK_F_TOPOLOGY, "VIRTIO_BLK_F_TOPOLOGY", "topology"),
            Feature(BLK_F_CONFIG_WCE, "VIRTIO_BLK_F_CONFIG_WCE", "config_wce"),
            Feature(BLK_F_MQ, "VIRTIO_BLK_F_MQ", "mq"),
            Feature(BLK_F_DISCARD, "VIRTIO_BLK_F_DISCARD", "discard"),
            Feature(BLK_F_WRITE_ZEROES, "VIRTIO_BLK_F_WRITE_ZEROES", "write_zeroes"),
            Feature(BLK_F_LIFETIME, "VIRTIO_BLK_F_LIFETIME", "lifetime"),
            Feature(BLK_F_SECURE_ERASE, "VIRTIO_BLK_F_SECURE_ERASE", "secure_erase"),
            Feature(BLK_F_ZONED, "VIRTIO_BLK_F_ZONED", "zoned"),
        )
    ),
    "net": _table(
        (
            Feature(NET_F_CSUM, "VIRTIO_NET_F_CSUM", "csum"),
            Feature(NET_F_GUEST_CSUM, "VIRTIO_NET_F_GUEST_CSUM", "guest_csum"),
            Feature(NET_F_CTRL_GUEST_OFFLOADS, "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS", "ctrl_guest_offloads"),
            Feature(NET_F_MTU, "VIRTIO_NET_F_MTU", "mtu"),
            Feature(NET_F_MAC, "VIRTIO_NET_F_MAC", "mac"),
            Feature(NET_F_GSO, "VIRTIO_NET_F_GSO", "gso", note="legacy"),
            Feature(NET_F_GUEST_TSO4, "VIRTIO_NET_F_GUEST_TSO4", "guest_tso4"),
            Feature(NET_F_GUEST_TSO6, "VIRTIO_NET_F_GUEST_TSO6", "guest_tso6"),
            Feature(NET_F_GUEST_ECN, "VIRTIO_NET_F_GUEST_ECN", "guest_ecn"),
            Feature(NET_F_GUEST_UFO, "VIRTIO_NET_F_GUEST_UFO", "guest_ufo"),
            Feature(NET_F_HOST_TSO4, "VIRTIO_NET_F_HOST_TSO4", "host_tso4"),
            Feature(NET_F_HOST_TSO6, "VIRTIO_NET_F_HOST_TSO6", "host_tso6"),
            Feature(NET_F_HOST_ECN, "VIRTIO_NET_F_HOST_ECN", "host_ecn"),
            Feature(NET_F_HOST_UFO, "VIRTIO_NET_F_HOST_UFO", "host_ufo"),
            Feature(NET_F_MRG_RXBUF, "VIRTIO_NET_F_MRG_RXBUF", "mrg_rxbuf"),
            Feature(NET_F_STATUS, "VIRTIO_NET_F_STATUS", "status"),
            Feature(NET_F_CTRL_VQ, "VIRTIO_NET_F_CTRL_VQ", "ctrl_vq"),
            Feature(NET_F_CTRL_RX, "VIRTIO_NET_F_CTRL_RX", "ctrl_rx"),
            Feature(NET_F_CTRL_VLAN, "VIRTIO_NET_F_CTRL_VLAN", "ctrl_vlan"),
            Feature(NET_F_CTRL_RX_EXTRA, "VIRTIO_NET_F_CTRL_RX_EXTRA", "ctrl_rx_extra"),
            Feature(NET_F_GUEST_ANNOUNCE, "VIRTIO_NET_F_GUEST_ANNOUNCE", "guest_announce"),
            Feature(NET_F_MQ, "VIRTIO_NET_F_MQ", "mq"),
            Feature(NET_F_CTRL_MAC_ADDR, "VIRTIO_NET_F_CTRL_MAC_ADDR", "ctrl_mac_addr"),
            Feature(NET_F_HASH_TUNNEL, "VIRTIO_NET_F_HASH_TUNNEL", "hash_tunnel"),
            Feature(NET_F_VQ_NOTF_COAL, "VIRTIO_NET_F_VQ_NOTF_COAL", "vq_notf_coal"),
            Feature(NET_F_NOTF_COAL, "VIRTIO_NET_F_NOTF_COAL", "notf_coal"),
            Feature(NET_F_GUEST_USO4, "VIRTIO_NET_F_GUEST_USO4", "guest_uso4"),
            Feature(NET_F_GUEST_USO6, "VIRTIO_NET_F_GUEST_USO6", "guest_uso6"),
            Feature(NET_F_HOST_USO, "VIRTIO_NET_F_HOST_USO", "host_uso"),
            Feature(NET_F_HASH_REPORT, "VIRTIO_NET_F_HASH_REPORT", "hash_report"),
            Feature(NET_F_GUEST_HDRLEN, "VIRTIO_NET_F_GUEST_HDRLEN", "guest_hdrlen"),
            Feature(NET_F_RSS, "VIRTIO_NET_F_RSS", "rss"),
            Feature(NET_F_RSC_EXT, "VIRTIO_NET_F_RSC_EXT", "rsc_ext"),
            Feature(NET_F_STANDBY, "VIRTIO_NET_F_STANDBY", "standby"),
            Feature(NET_F_SPEED_DUPLEX, "VIRTIO_NET_F_SPEED_DUPLEX", "speed_duplex"),
        )
    ),
    "console": _table(
        (
            Feature(CONSOLE_F_SIZE, "VIRTIO_CONSOLE_F_SIZE", "size"),
            Feature(CONSOLE_F_MULTIPORT, "VIRTIO_CONSOLE_F_MULTIPORT", "multiport"),
            Feature(CONSOLE_F_EMERG_WRITE, "VIRTIO_CONSOLE_F_EMERG_WRITE", "emerg_write"),
        )
    ),
    "rng": {},
    "input": {},
    "vsock": _table(
        (
            Feature(VSOCK_F_STREAM, "VIRTIO_VSOCK_F_STREAM", "stream"),
            Feature(VSOCK_F_SEQPACKET, "VIRTIO_VSOCK_F_SEQPACKET", "seqpacket"),
        )
    ),
}


def feature_table(abi: str, device_id: int | None) -> dict[int, Feature]:
    """All feature bits that have a name for this ABI era and device."""
    table = dict(TRANSPORT_FEATURES[abi])
    cls = device_class(device_id) if device_id is not None else None
    if cls:
        table.update(DEVICE_FEATURES.get(cls, {}))
    return table


def feature_names(abi: str, device_id: int | None) -> dict[str, int]:
    """Feature bits by name: the short name and the lower-case macro name of every named bit."""
    by_name: dict[str, int] = {}
    for f in feature_table(abi, device_id).values():
        by_name[f.short] = f.bit
        by_name[f.name.lower()] = f.bit
    return by_name


def feature_bit(name: str | int, by_name: Mapping[str, int]) -> int | None:
    """The bit a feature name stands for: a decimal or 0x number, a short or macro name.

    ``by_name`` is :func:`feature_names` of the device; None when the name is
    not known or the number is malformed (the range is the caller's to check).
    """
    if isinstance(name, int):
        return name
    key = str(name).strip().lower()
    if key.isdigit():
        return int(key)
    if key.startswith("0x"):
        try:
            return int(key, 16)
        except ValueError:
            return None
    return by_name.get(key)


def resolve_features(names: Iterable[str | int], abi: str, device_id: int | None) -> set[int]:
    """Bit numbers for feature names (short or macro names) or numbers; empty names are skipped.

    Raises UsageError for a name the device class does not know or a bit
    beyond the era's feature map.
    """
    by_name = feature_names(abi, device_id)
    words = FEATURE_MAP_WORDS[abi]
    out = set()
    for name in names:
        if not str(name).strip():
            continue
        bit = feature_bit(name, by_name)
        if bit is None or not 0 <= bit < 32 * words:
            from l4vctl.errors import UsageError

            known = ", ".join(sorted(f.short for f in feature_table(abi, device_id).values()))
            raise UsageError(f"unknown feature {name!r} for this device", hint=f"known: {known}")
        out.add(bit)
    return out


def has_bit(words: Sequence[int], bit: int) -> bool:
    """Whether feature ``bit`` is set in a little-endian list of 32-bit words."""
    index = bit >> 5
    return index < len(words) and bool(words[index] >> (bit & 31) & 1)


# -- split ring ----------------------------------------------------------------

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_DESC_FLAGS: tuple[tuple[int, str], ...] = (
    (VRING_DESC_F_NEXT, "NEXT"),
    (VRING_DESC_F_WRITE, "WRITE"),
    (VRING_DESC_F_INDIRECT, "INDIRECT"),
)
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
# packed rings (not driven by l4vctl; L4Re uses split rings)
VRING_PACKED_DESC_F_AVAIL = 7  # bit numbers, not masks
VRING_PACKED_DESC_F_USED = 15
VRING_PACKED_EVENT_FLAG_ENABLE = 0x0
VRING_PACKED_EVENT_FLAG_DISABLE = 0x1
VRING_PACKED_EVENT_FLAG_DESC = 0x2
VRING_PACKED_EVENT_F_WRAP_CTR = 15
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

# -- device-specific protocol constants -------------------------------------------

BLK_SECTOR_SIZE = 512
BLK_T_IN = 0
BLK_T_OUT = 1
BLK_T_SCSI_CMD = 2  # legacy (VIRTIO_BLK_F_SCSI)
BLK_T_FLUSH = 4
BLK_T_GET_ID = 8
BLK_T_GET_LIFETIME = 10
BLK_T_DISCARD = 11
BLK_T_WRITE_ZEROES = 13
BLK_T_SECURE_ERASE = 14
BLK_REQUEST_TYPES: Mapping[int, str] = {
    BLK_T_IN: "IN",
    BLK_T_OUT: "OUT",
    BLK_T_SCSI_CMD: "SCSI_CMD",
    BLK_T_FLUSH: "FLUSH",
    BLK_T_GET_ID: "GET_ID",
    BLK_T_GET_LIFETIME: "GET_LIFETIME",
    BLK_T_DISCARD: "DISCARD",
    BLK_T_WRITE_ZEROES: "WRITE_ZEROES",
    BLK_T_SECURE_ERASE: "SECURE_ERASE",
    15: "ZONE_APPEND",
    16: "ZONE_REPORT",
    18: "ZONE_OPEN",
    20: "ZONE_CLOSE",
    22: "ZONE_FINISH",
    24: "ZONE_RESET",
    26: "ZONE_RESET_ALL",
}
#: Legacy flag OR-ed into a request type (no VIRTIO_F_VERSION_1).
BLK_T_BARRIER = 0x80000000
BLK_S_OK = 0
BLK_S_IOERR = 1
BLK_S_UNSUPP = 2
BLK_STATUS: Mapping[int, str] = {0: "OK", 1: "IOERR", 2: "UNSUPP"}
BLK_ID_BYTES = 20
BLK_DISCARD_F_UNMAP = 1  # flags of virtio_blk_discard_write_zeroes

NET_RX_QUEUE = 0
NET_TX_QUEUE = 1
NET_S_LINK_UP = 1
NET_S_ANNOUNCE = 2
NET_STATUS_BITS: tuple[tuple[int, str], ...] = ((1, "LINK_UP"), (2, "ANNOUNCE"))

#: flags and gso_type of the net header
NET_HDR_FLAGS: tuple[tuple[int, str], ...] = ((1, "NEEDS_CSUM"), (2, "DATA_VALID"), (4, "RSC_INFO"))
NET_HDR_GSO: Mapping[int, str] = {0: "NONE", 1: "TCPV4", 3: "UDP", 4: "TCPV6", 0x80: "ECN"}

#: Hash types (bit masks) of supported_hash_types and the RSS/hash config.
NET_RSS_HASH_TYPES: tuple[tuple[int, str], ...] = (
    (1 << 0, "IPv4"), (1 << 1, "TCPv4"), (1 << 2, "UDPv4"), (1 << 3, "IPv6"), (1 << 4, "TCPv6"),
    (1 << 5, "UDPv6"), (1 << 6, "IP_EX"), (1 << 7, "TCP_EX"), (1 << 8, "UDP_EX"),
)  # fmt: skip
#: hash_report values of virtio_net_hdr_v1_hash
NET_HASH_REPORT: Mapping[int, str] = {
    0: "NONE", 1: "IPv4", 2: "TCPv4", 3: "UDPv4", 4: "IPv6", 5: "TCPv6", 6: "UDPv6",
    7: "IPv6_EX", 8: "TCPv6_EX", 9: "UDPv6_EX",
}  # fmt: skip

#: Control-queue acks, and classes with their commands: class -> (name, {cmd: name}).
NET_CTRL_ACK: Mapping[int, str] = {0: "OK", 1: "ERR"}
NET_CTRL_CLASSES: Mapping[int, tuple[str, Mapping[int, str]]] = {
    0: ("RX", {0: "PROMISC", 1: "ALLMULTI", 2: "ALLUNI", 3: "NOMULTI", 4: "NOUNI", 5: "NOBCAST"}),
    1: ("MAC", {0: "TABLE_SET", 1: "ADDR_SET"}),
    2: ("VLAN", {0: "ADD", 1: "DEL"}),
    3: ("ANNOUNCE", {0: "ACK"}),
    4: ("MQ", {0: "VQ_PAIRS_SET", 1: "RSS_CONFIG", 2: "HASH_CONFIG"}),
    5: ("GUEST_OFFLOADS", {0: "SET"}),
    6: ("NOTF_COAL", {0: "TX_SET", 1: "RX_SET"}),
}
NET_CTRL_MQ_VQ_PAIRS_MIN = 1
NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000

#: Queues of console port 0: receiveq (input to the driver) and transmitq.
CONSOLE_RX_QUEUE = 0
CONSOLE_TX_QUEUE = 1

#: Control events; 1 and 2 are PORT_ADD/PORT_REMOVE in Linux and the specification.
CONSOLE_EVENTS: Mapping[int, str] = {
    0: "DEVICE_READY",
    1: "PORT_ADD",
    2: "PORT_REMOVE",
    3: "PORT_READY",
    4: "CONSOLE_PORT",
    5: "RESIZE",
    6: "PORT_OPEN",
    7: "PORT_NAME",
}
CONSOLE_BAD_ID = 0xFFFFFFFF

#: vsock packet header values and events.
VSOCK_TYPES: Mapping[int, str] = {1: "STREAM", 2: "SEQPACKET"}
VSOCK_OPS: Mapping[int, str] = {
    0: "INVALID", 1: "REQUEST", 2: "RESPONSE", 3: "RST", 4: "SHUTDOWN", 5: "RW",
    6: "CREDIT_UPDATE", 7: "CREDIT_REQUEST",
}  # fmt: skip
VSOCK_SHUTDOWN_BITS: tuple[tuple[int, str], ...] = ((1, "RCV"), (2, "SEND"))
VSOCK_SEQ_BITS: tuple[tuple[int, str], ...] = ((1, "EOM"), (2, "EOR"))
VSOCK_EVENTS: Mapping[int, str] = {0: "TRANSPORT_RESET"}

INPUT_CFG_UNSET = 0x00
INPUT_CFG_ID_NAME = 0x01
INPUT_CFG_ID_SERIAL = 0x02
INPUT_CFG_ID_DEVIDS = 0x03
INPUT_CFG_PROP_BITS = 0x10
INPUT_CFG_EV_BITS = 0x11
INPUT_CFG_ABS_INFO = 0x12
INPUT_CFG_SELECT: Mapping[int, str] = {
    0x00: "UNSET",
    0x01: "ID_NAME",
    0x02: "ID_SERIAL",
    0x03: "ID_DEVIDS",
    0x10: "PROP_BITS",
    0x11: "EV_BITS",
    0x12: "ABS_INFO",
}


# -- vhost-user (the front-end side of the protocol, as far as l4vctl speaks it) ----------

#: Front-end message types.
VHOST_USER_GET_FEATURES = 1
VHOST_USER_SET_FEATURES = 2
VHOST_USER_SET_OWNER = 3
VHOST_USER_SET_MEM_TABLE = 5
VHOST_USER_SET_VRING_NUM = 8
VHOST_USER_SET_VRING_ADDR = 9
VHOST_USER_SET_VRING_BASE = 10
VHOST_USER_GET_VRING_BASE = 11
VHOST_USER_SET_VRING_KICK = 12
VHOST_USER_SET_VRING_CALL = 13
VHOST_USER_GET_PROTOCOL_FEATURES = 15
VHOST_USER_SET_PROTOCOL_FEATURES = 16
VHOST_USER_GET_QUEUE_NUM = 17
VHOST_USER_SET_VRING_ENABLE = 18
VHOST_USER_GET_CONFIG = 24
VHOST_USER_REQUESTS: Mapping[int, str] = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 5: "SET_MEM_TABLE", 8: "SET_VRING_NUM",
    9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE", 12: "SET_VRING_KICK",
    13: "SET_VRING_CALL", 15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM",
    18: "SET_VRING_ENABLE", 24: "GET_CONFIG",
}  # fmt: skip
#: Header flags: protocol version (low two bits), reply, reply wanted.
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_FLAG_REPLY = 0x4
VHOST_USER_FLAG_NEED_REPLY = 0x8
#: SET_VRING_KICK/CALL payload: queue index in the low byte; this bit: no fd passed (polling).
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD = 0x100
#: vhost-user feature bits (not virtio ones): protocol features, dirty-page logging.
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_F_LOG_ALL = 26
#: Protocol feature bits l4vctl asks for.
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_CONFIG = 9
#: Regions a SET_MEM_TABLE carries at most.
VHOST_USER_MAX_REGIONS = 8
#: Longest reply payload l4vctl accepts.
VHOST_USER_MAX_PAYLOAD = 4096

# -- bit-set helpers ---------------------------------------------------------------


def flag_names(value: int, bits: Iterable[tuple[int, str]]) -> tuple[list[str], int]:
    """Names of the set bits in ``value`` and the mask of bits without a name."""
    names = []
    known = 0
    for mask, name in bits:
        known |= mask
        if value & mask:
            names.append(name)
    return names, value & ~known


def bits_of(words: Iterable[int]) -> list[int]:
    """Bit numbers set in a little-endian list of 32-bit words."""
    out = []
    for i, w in enumerate(words):
        while w:
            low = w & -w
            out.append(i * 32 + low.bit_length() - 1)
            w ^= low
    return out


# -- the socket emulation's wire protocol (docs/wire-protocol.md) ---------------------

WIRE_MAGIC = b"L4VW"
WIRE_VERSION = 1

# frame kinds
KIND_HELLO = 1
KIND_WELCOME = 2
KIND_REQUEST = 3
KIND_REPLY = 4

KINDS = {KIND_HELLO: "HELLO", KIND_WELCOME: "WELCOME", KIND_REQUEST: "REQUEST", KIND_REPLY: "REPLY"}

# roles a client asks for in HELLO
ROLE_DRIVER = 1
ROLE_MONITOR = 2
ROLES = {ROLE_DRIVER: Role.DRIVER.value, ROLE_MONITOR: Role.MONITOR.value}

# capability profiles
PROFILE_FD = 1  # capabilities are file descriptors passed with SCM_RIGHTS

# capability item types
CAP_NONE = 0  # an item without a capability ("nothing was transferred")
CAP_DATASPACE = 1  # shared memory (memfd)
CAP_IRQ = 2  # a triggerable notification object (eventfd)
CAP_DEVICE = 3  # remote profile: a device capability the agent holds
CAP_TYPES = {CAP_NONE: "none", CAP_DATASPACE: "dataspace", CAP_IRQ: "irq", CAP_DEVICE: "device"}

#: l4vctl's own protocol label for the emulator's monitor interface.
L4VCTL_PROTO_MONITOR = 0x4C56  # "LV"
MONITOR_OP_STATS = 0
MONITOR_OP_REGIONS = 1  # the driver's registered dataspaces: [count, (base, size, flags) ...]
MONITOR_OP_READ = 2  # words [addr, size, ...]: one sealed read-only memfd with the ranges' bytes
#: REGIONS flags word: bit 0, the device may write the region.
MONITOR_REGION_WRITABLE = 1
#: Most regions one REGIONS reply lists ((MAX_WORDS - 1) // 3).
MONITOR_MAX_REGIONS = 85
#: Most ranges one READ takes, and most bytes it returns in all.
MONITOR_READ_MAX_RANGES = 64
MONITOR_READ_MAX_BYTES = 64 << 20

MAX_FRAME = 65536

# -- remote profile: the link layer (a byte stream, see docs/wire-protocol.md) --------------
#: The two bytes that open every link frame (A5 5A on the line).
LINK_SYNC = 0x5AA5
LINK_VERSION = 1
#: Payload types of link frames.
LINK_T_WIRE = 1  # the payload is one wire frame (same layout as the fd profile's)
LINK_TYPES = {LINK_T_WIRE: "wire"}
#: Largest payload a link frame may carry (a whole wire frame).
LINK_MAX_PAYLOAD = MAX_FRAME

# -- remote profile: frames beyond the fd profile's four kinds --------------------------------
PROFILE_REMOTE = 2  # capabilities are handles; memory and IRQs travel as frames
KIND_READ = 5  # host -> agent: ranges of a dataspace; the reply carries their bytes
KIND_WRITE = 6  # host -> agent: bytes for ranges of a dataspace
KIND_TRIGGER = 7  # host -> agent: trigger an IRQ (no reply)
KIND_EVENT = 8  # agent -> host: an IRQ the agent holds fired
KIND_BYE = 9  # host -> agent: the host leaves; everything is released, devices used are reset
REMOTE_KINDS = {5: "READ", 6: "WRITE", 7: "TRIGGER", 8: "EVENT", 9: "BYE"}
#: Label of requests to the agent itself (target handle 0).
L4VCTL_PROTO_AGENT = 0x4C41  # "AL"
AGENT_OP_LIST = 0  # the device capabilities the agent was given: handles, names
AGENT_OP_ALLOC_DS = 1  # words [size, flags]: a new dataspace (flags bit 0: physically contiguous)
AGENT_OP_IRQ_CREATE = 2  # a new IRQ whose triggers come back as EVENT frames
AGENT_OP_RELEASE = 3  # words: handles to release
AGENT_OP_STATS = 4  # the agent's counters (AGENT_STATS)
AGENT_OP_ECHO = 5  # the request's data section back (link measurements)
AGENT_OP_RESET = 6  # release everything of this session, reset the devices used
AGENT_OP_NOTE = 7  # words [device, value?]: read (and set) a device's scratch word
AGENT_ALLOC_CONTIGUOUS = 1
AGENT_STATS = (
    "frames_in", "frames_out", "dropped", "ipc_calls", "ipc_errors", "events", "triggers",
    "bad_triggers", "bytes_in", "bytes_out", "handles",
)  # fmt: skip
#: Data encodings of READ and WRITE: raw bytes, or zero-run records.
ENC_RAW = 0
ENC_ZERO_RUNS = 1
MAX_WORDS = 256
MAX_CAPS = 8

#: Words of a monitor STATS reply: these global words, then for each queue
#: the per-queue words, in this order (version 1).  Version 2 appends its
#: own words after them: STATS_VERSION, the STATS_GLOBAL_V2 words, for each
#: queue the STATS_QUEUE_V2 words, then the device's reason for its last
#: error as a character count and one character (Unicode code point) per
#: word.  Word 0 stays 1, so that version 1 readers keep working.
STATS_VERSION = 2
#: Longest reason (characters) a STATS reply carries.
STATS_REASON_MAX = 160
STATS_GLOBAL = (
    "stats_version", "driver_attached", "status", "generation", "kicks", "irqs_sent",
    "regions", "device_errors", "num_queues",
)  # fmt: skip
STATS_QUEUE = (
    "enabled", "num", "next_avail", "avail_idx", "avail_flags", "used_idx", "used_flags",
    "completed", "notified",
)  # fmt: skip
STATS_GLOBAL_V2 = ("irq_bound", "polling", "features_refused")
STATS_QUEUE_V2 = ("used_event", "avail_event", "signalled_idx")
