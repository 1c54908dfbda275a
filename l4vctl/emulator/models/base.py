"""The base of every device model and the options all models share."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from l4vctl import catalog as cat
from l4vctl.emulator.models import Option, Profile
from l4vctl.parsing import parse_bool, parse_int

if TYPE_CHECKING:
    from l4vctl.emulator.device import Device

#: Faults the emulator can inject, for testing drivers against bad devices.
FAULTS = {
    "refuse-features-ok": "never accept FEATURES_OK (negotiation always fails)",
    "clear-features-ok": "accept FEATURES_OK, then clear it when the driver sets DRIVER_OK "
    "(the status reads DRIVER_OK without FEATURES_OK)",
    "never-clear-cmd": "never consume a cmd word (the driver's cmd wait times out)",
    "needs-reset-on-driver-ok": "answer DRIVER_OK with DEVICE_NEEDS_RESET",
    "needs-reset-at": "enter DEVICE_NEEDS_RESET, with a reason, when taking the Nth request (needs-reset-at=1)",
    "die-on-status": "exit the emulator when this status value is written (die-on-status=3)",
    "no-reply": "never reply to this L4-VIRTIO opcode, by name or number (no-reply=SET_STATUS or no-reply=0)",
    "queues-offset-outside": "publish a queue array that lies outside the page",
    "bad-magic": "publish a wrong magic value",
    "stop-completing": "take requests but never put them in the used ring "
    "(stop-completing=N: after N completions; default 0)",
    "ignore-kicks": "never look at the available rings: requests stay offered and are not taken (kicks are counted)",
    "drop-irqs": "complete requests but never interrupt the driver for them "
    "(drop-irqs=N: after N interrupts; default 0)",
    "suppress-kicks": "tell drivers not to kick (used NO_NOTIFY, or an avail_event out of reach with EVENT_IDX) "
    "and look at the rings only when kicked anyway",
}


#: Faults that need a value (FAULT=VALUE), with what the value is and an example.
FAULT_VALUES = {
    "die-on-status": ("a status value", "die-on-status=3"),
    "no-reply": ("an opcode", "no-reply=SET_STATUS"),
    "needs-reset-at": ("a request number (1: the first)", "needs-reset-at=1"),
}
#: Faults that take a count (FAULT=N) or stand alone (then N is 0).
FAULT_COUNTS = ("stop-completing", "drop-irqs")
#: The smallest value each numeric fault takes.
_FAULT_MIN = {"die-on-status": 0, "needs-reset-at": 1, "stop-completing": 0, "drop-irqs": 0}


def opcode_names() -> dict[str, int]:
    """L4-VIRTIO opcode names of both eras (upper case) -> numbers."""
    names: dict[str, int] = {}
    for table in cat.VIRTIO_OPCODES.values():
        for number, name in table.items():
            names.setdefault(name, number)
    return names


def parse_opcode(text: str) -> int:
    """An L4-VIRTIO opcode by name (case-insensitive, OP_ prefix allowed) or number."""
    names = opcode_names()
    key = text.strip().upper()
    for prefix in ("L4VIRTIO_OP_", "OP_"):
        if key.startswith(prefix) and key[len(prefix) :] in names:
            key = key[len(prefix) :]
    if key in names:
        return names[key]
    try:
        number = parse_int(text)
    except ValueError:
        number = -1
    if number < 0:
        valid = ", ".join(f"{n} ({v})" for n, v in sorted(names.items(), key=lambda kv: (kv[1], kv[0])))
        raise ValueError(f"no-reply={text}: not an L4-VIRTIO opcode (opcodes: {valid}, or a number)")
    return number


def parse_faults(text) -> dict:
    """'never-clear-cmd,die-on-status=3' -> {'never-clear-cmd': True, 'die-on-status': 3}.

    A fault of FAULT_COUNTS given alone counts from 0 ({'stop-completing': 0})."""
    out: dict = {}
    if isinstance(text, dict):
        return dict(text)
    for item in str(text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, value = item.partition("=")
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r} (faults: {', '.join(FAULTS)})")
        if name in FAULT_VALUES and not value:
            what, example = FAULT_VALUES[name]
            raise ValueError(f"fault {name} needs {what}: {example}")
        if name == "no-reply":
            out[name] = parse_opcode(value)
        elif name in FAULT_VALUES or name in FAULT_COUNTS:
            if not value:
                out[name] = 0
                continue
            try:
                number = parse_int(value)
            except ValueError:
                raise ValueError(f"{name}={value}: not a number") from None
            if number < _FAULT_MIN[name]:
                raise ValueError(f"{name}={value}: must be at least {_FAULT_MIN[name]}")
            out[name] = number
        elif eq:
            raise ValueError(f"fault {name} takes no value (got {name}={value})")
        else:
            out[name] = True
    return out


def parse_feature_list(text) -> list:
    """Feature names or numbers, comma separated (resolved per device class later)."""
    if isinstance(text, (list, tuple)):
        return list(text)
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def parse_abi(text) -> str:
    """The header layout era ``text`` names (classic or current); ValueError otherwise."""
    if text not in cat.ABIS:
        raise ValueError(f"{text!r} is not an ABI (classic or current)")
    return text


#: How a device lets a driver attach: REGISTER_IFACE (one call), DEVICE_CONFIG
#: (+ GET_DEVICE_IRQ + ICU bind), or both.  Classic-era devices answered both from
#: 2018 on, and only DEVICE_CONFIG after REGISTER_IFACE was removed (2022-09);
#: current-era devices answer only DEVICE_CONFIG.
ATTACH_MODES = ("iface", "config", "both")


def parse_attach(text) -> str:
    """The attach mode ``text`` names (one of ATTACH_MODES); ValueError otherwise."""
    if text not in ATTACH_MODES:
        raise ValueError(f"{text!r} is not an attach mode (iface, config or both)")
    return text


def _positive(text) -> int:
    value = parse_int(text)
    if value < 1:
        raise ValueError(f"{text!r} must be at least 1")
    return value


#: What ``profile=`` accepts, for help texts (the profiles themselves live in the models' PROFILES).
PROFILE_HELP = (
    "reproduce the config page of a real L4Re device server: l4re-cons (console: cons), "
    "l4re-switch (net: a port of l4vio_switch), l4re-ahci (blk: ahci-drv), l4re-nvme (blk: nvme-drv); "
    "options given as well still win"
)


COMMON_OPTIONS = (
    Option("profile", str, None, PROFILE_HELP),
    Option("abi", parse_abi, cat.DEFAULT_ABI, "header layout era: classic or current"),
    Option(
        "attach",
        parse_attach,
        None,
        "how drivers attach: iface (REGISTER_IFACE only), config (DEVICE_CONFIG only) or both; "
        "default both for classic, config for current",
    ),
    Option("cmd_mode", parse_bool, False, "offer L4VIRTIO_FEATURE_CMD_CONFIG (status and queues via cmd)"),
    Option("queues", _positive, None, "number of queues (default: the model's)"),
    Option("num_max", _positive, None, "largest queue size offered (default: the model's)"),
    Option("features", parse_feature_list, [], "extra feature bits to offer (names or numbers)"),
    Option("vendor", parse_int, cat.L4VIRTIO_VENDOR_KK, "vendor id in the header"),
    Option("ds_offset", parse_int, 0, "offset of the config page inside its dataspace (page multiple)"),
    Option("max_regions", _positive, 8, "size of the device's region table for REGISTER_DS"),
    Option("inject", parse_faults, {}, "faults to inject: " + ", ".join(FAULTS)),
)


class Model:
    """A device model: identity, features, config and queues.

    Subclasses set ``KIND``, ``DEVICE_ID``, ``OPTIONS``, ``FEATURES``,
    ``DEFAULT_QUEUES`` and ``DEFAULT_NUM_MAX`` (and ``PROFILES``, the real
    servers they can reproduce) and override the hooks they need.
    """

    KIND = "generic"
    DEVICE_ID = 0
    OPTIONS: tuple[Option, ...] = ()
    #: Device-class bits offered whatever the options say (a profile brings its own).
    FEATURES: frozenset[int] = frozenset()
    PROFILES: ClassVar[dict[str, Profile]] = {}
    DEFAULT_QUEUES = 1
    DEFAULT_NUM_MAX = 256
    MIN_QUEUES = 1

    def __init__(self, options: dict):
        self.options = options
        self.device: Device | None = None  # set by the Device that serves this model

    # -- identity ----------------------------------------------------------------

    @property
    def profile(self) -> Profile | None:
        """The real device server this model reproduces, if a profile was chosen."""
        return self.options.get("profile")

    def base_features(self) -> set[int]:
        """The device-class bits offered whatever the options say: the profile's, else ``FEATURES``."""
        profile = self.profile
        return set(profile.features if profile is not None else self.FEATURES)

    def features(self) -> set[int]:
        """Device-class feature bits offered (transport bits are added by the device)."""
        return self.base_features()

    def config(self) -> dict:
        """Values of the device-specific config struct (missing fields are 0)."""
        return {}

    def num_queues(self) -> int:
        """Queues the device publishes: the ``queues`` option, else the model's default."""
        return self.options.get("queues") or self.DEFAULT_QUEUES

    def num_max(self) -> int:
        """The largest queue size offered: the ``num_max`` option, else the model's default."""
        return self.options.get("num_max") or self.DEFAULT_NUM_MAX

    def required_queues(self) -> list[int]:
        """Queues that must be enabled when the driver sets DRIVER_OK."""
        return [0]

    # -- hooks -------------------------------------------------------------------

    def check_features(self, accepted: set[int]) -> bool:
        """Device-specific feature check at FEATURES_OK."""
        return True

    def reset(self) -> None:
        """The device is reset (status 0 or a driver left)."""

    def config_changed(self, offset: int) -> None:
        """The driver wrote device config at 0x100 + offset (CMD_CFG_CHANGED)."""

    def process(self, queue, ring) -> None:
        """Handle the available buffers of an enabled queue.

        The default consumes every chain and completes it with nothing
        written (a sink).  ``ring`` is the queue's DeviceRing.
        """
        while ring.available():
            head = ring.pop()
            ring.chain(head)
            ring.complete(head, 0)

    def watch(self) -> list:
        """(fd, callback) pairs the server should watch for this model (input sources)."""
        return []

    def close(self) -> None:
        """Release files and other resources."""

    def describe(self) -> str:
        """A short description of the device (``l4vctl emulate`` names it when it starts)."""
        return self.KIND
