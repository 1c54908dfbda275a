"""Status writes (IPC or the cmd word) and feature negotiation of a driver session."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl.errors import (
    DeviceStateError,
    NegotiationError,
    ProtocolError,
    TimeoutExpired,
    UnavailableError,
    UsageError,
)
from l4vctl.waiting import Spin

if TYPE_CHECKING:
    from l4vctl._session.attachment import Attachment
    from l4vctl._session.pageview import PageView

#: Longest poll of the cmd word before sleeping between polls (see l4vctl.waiting).
CMD_SPIN = 500e-6
#: Transport features the session's driver implements (others are accepted only when asked for: "forced").
SUPPORTED_TRANSPORT = {cat.INDIRECT_DESC_BIT, cat.EVENT_IDX_BIT, cat.VERSION_1_BIT}


class Transition:
    """One status write and what the device made of it."""

    __slots__ = ("via", "wrote", "status")

    def __init__(self, via: str, wrote: int, status: int):
        self.via = via
        self.wrote = wrote
        self.status = status

    def to_json(self) -> dict[str, Any]:
        """The transition as JSON output shows it."""
        names, _unknown = cat.flag_names(self.status, cat.STATUS_BITS)
        return {"via": self.via, "wrote": self.wrote, "status": self.status, "flags": names}


class Negotiation:
    """How the driver writes status (``mode``), what it wrote, what it negotiated."""

    def __init__(self, mode_request: str, timeout: float):
        self.mode_request = mode_request
        self.timeout = timeout
        self.mode = "ipc"
        self.transitions: list[Transition] = []
        self.negotiated: set[int] = set()
        self.drove = False  # a status was written: the device is reset on the way out
        self.spin = Spin(CMD_SPIN)  # how long send_cmd polls the cmd word before it sleeps

    def offered(self, view: PageView) -> set[int]:
        """Feature bits the device offers."""
        return set(cat.bits_of(view.words("dev_features_map")))

    def choose_mode(self, view: PageView) -> None:
        """cmd mode if asked for or, with ``auto``, if the device offers it."""
        offers_cmd = cat.CMD_CONFIG_BIT[view.abi] in self.offered(view)
        if self.mode_request == "auto":
            self.mode = "cmd" if offers_cmd else "ipc"
        elif self.mode_request == "cmd" and not offers_cmd:
            raise NegotiationError("cmd mode asked for, but the device does not offer L4VIRTIO_FEATURE_CMD_CONFIG")
        else:
            self.mode = self.mode_request

    def write_status(self, view: PageView, link: Attachment, value: int) -> int:
        """Write a status value (IPC or cmd) and return what the device accepted."""
        self.drove = True
        if self.mode == "cmd":
            self.send_cmd(view, link, cat.cmd_word(cat.CMD_SET_STATUS, value))
        else:
            r = link.call(cat.L4VIRTIO_PROTOCOL, cat.OP_SET_STATUS, [value])
            r.close()
            if r.result < 0:  # L4Re devices answer 0; a cmd-only proxy refuses the IPC
                hint = ""
                if cat.CMD_CONFIG_BIT[view.abi] in self.offered(view):
                    hint = " (the device offers cmd mode: try --mode cmd)"
                raise ProtocolError(f"SET_STATUS({value:#x}) failed: {cat.l4_error_name(r.result)}{hint}")
        status = view.get("status")
        self.transitions.append(Transition(self.mode, value, status))
        return status

    def send_cmd(self, view: PageView, link: Attachment, word: int) -> None:
        """Post a cmd word, kick the device and wait until it is consumed."""
        view.set("cmd", word)
        assert link.device_irq is not None
        link.device_irq.trigger()
        start = time.perf_counter()
        spin = self.spin
        spin.peer = link.peer_pid()
        if spin.run(lambda: None if view.get("cmd") else True, start):
            return
        deadline = start + self.timeout
        delay = 50e-6
        hangup = None
        while view.get("cmd"):
            now = time.perf_counter()
            if now > deadline:
                link.broken = True
                raise TimeoutExpired(f"the device did not consume cmd {word:#010x} within {self.timeout:g} s")
            if delay < 0.001:
                spin.rest(delay)
                delay *= 2
                continue
            if hangup is None:  # from here on, sleep on the connection: a device that dies ends the wait
                hangup = _hangup_poller(link.watch_fd())
            if hangup is None:
                time.sleep(delay)
            elif hangup.poll(1):
                link.broken = True
                raise UnavailableError(f"{link.url}: the device went away before it consumed cmd {word:#010x}")
        spin.observe(time.perf_counter() - start)

    @staticmethod
    def fail_check(view: PageView, after: str) -> None:
        """Raise DeviceStateError if the device is in a fail state."""
        st = view.get("status")
        if st & cat.STATUS_FAIL_MASK:
            names, _ = cat.flag_names(st & cat.STATUS_FAIL_MASK, cat.STATUS_BITS)
            raise DeviceStateError(f"device in error state after {after}: status {st:#04x} ({'+'.join(names)})")

    def negotiate(self, view: PageView, link: Attachment, want: Any, require: Iterable[Any], refuse: Iterable[Any],
                  device_id: int) -> dict[str, Any]:  # fmt: skip
        """Accept features, set FEATURES_OK and read it back; the summary dict of the negotiation."""
        from l4vctl.catalog import resolve_features
        from l4vctl.drivers import implemented_features

        abi = view.abi
        offered = self.offered(view)
        table = cat.feature_table(abi, device_id)
        required = resolve_features(require, abi, device_id)
        refused = resolve_features(refuse, abi, device_id)
        cmd_bit = cat.CMD_CONFIG_BIT[abi]
        implemented = SUPPORTED_TRANSPORT | implemented_features(device_id) | {cmd_bit}
        if want is None:
            wanted = (offered & implemented) | required
        elif want == "all":
            wanted = set(offered) | required
        else:
            wanted = resolve_features(want, abi, device_id) | required
        if self.mode == "cmd":
            wanted.add(cmd_bit)
        else:
            wanted.discard(cmd_bit)
        both = required & refused
        if both:
            raise UsageError(f"features both required and refused: {sorted(both)}")
        accept = (wanted & offered) - refused
        if cat.VERSION_1_BIT not in offered:
            raise NegotiationError("the device does not offer VIRTIO_F_VERSION_1 (bit 32)")
        if cat.VERSION_1_BIT in refused:
            raise NegotiationError("VIRTIO_F_VERSION_1 cannot be refused: L4Re devices require it")
        accept.add(cat.VERSION_1_BIT)
        missing = required - offered
        if missing:
            names = [table[b].name if b in table else f"bit {b}" for b in sorted(missing)]
            raise NegotiationError(f"required feature not offered: {', '.join(names)}")
        view.set_words("driver_features_map", pg.feature_words(abi, accept))
        st = self.write_status(view, link, view.get("status") | cat.STATUS_FEATURES_OK)
        if not st & cat.STATUS_FEATURES_OK:
            self.fail_check(view, "FEATURES_OK")
            raise NegotiationError(f"the device refused FEATURES_OK (status {st:#04x})")
        self.negotiated = accept
        forced = accept - implemented
        rows = []
        for bit in sorted(offered | wanted | required | refused):
            rows.append({
                "bit": bit,
                "name": table[bit].name if bit in table else None,
                "offered": bit in offered,
                "wanted": bit in wanted,
                "required": bit in required,
                "refused": bit in refused,
                "negotiated": bit in accept,
                "implemented": bit in implemented,
                "forced": bit in forced,
            })  # fmt: skip
        return {"features": rows, "negotiated": sorted(accept), "offered": sorted(offered), "forced": sorted(forced)}


def _hangup_poller(fd: int | None) -> Any:
    """A poll object that reports the device connection ``fd`` hanging up (None without one)."""
    if fd is None:
        return None
    import select

    from l4vctl.wire import HANGUP

    p = select.poll()
    p.register(fd, HANGUP)
    return p
