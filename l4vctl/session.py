"""The driver side of L4-VIRTIO: attach, register, negotiate, handshake, queues.

A :class:`Session` is a context manager over a backend::

    with Session("emu:blk") as s:
        s.handshake(want={"flush"})
        print(s.status_flags(), s.negotiated)

It attaches by what the device answers (DEVICE_CONFIG + GET_DEVICE_IRQ + ICU
bind; REGISTER_IFACE when DEVICE_CONFIG answers -L4_ENOSYS, as the oldest
classic-era devices do), checks magic and version, resets the device, sets
ACKNOWLEDGE and DRIVER, negotiates features, sets FEATURES_OK and reads it
back, configures queues in memory it registers with REGISTER_DS, and sets
DRIVER_OK.  Status writes and queue configuration go through IPC or, in cmd
mode, through the cmd word.  Every wait has a timeout.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl._session.pageview import PageView
from l4vctl.catalog import resolve_features  # noqa: F401 - part of this module's API
from l4vctl.errors import (
    DeviceStateError,
    FormatError,
    L4vError,
    NegotiationError,
    ProtocolError,
    UnavailableError,
    UsageError,
)

if TYPE_CHECKING:
    from l4vctl._session.attachment import Attachment
    from l4vctl._session.negotiation import Negotiation, Transition
    from l4vctl._session.queues import QueueSet, QueueSetup
    from l4vctl.backends.base import Backend, Channel
    from l4vctl.caps import Dataspace, Irq
    from l4vctl.virtqueue import Virtqueue

DEFAULT_TIMEOUT = 5.0
#: How a driver session attaches: by what the device answers, or forced.
ATTACH_CHOICES = ("auto", "config", "iface")


class Session:
    """A driver (or monitor) session with one device.

    Made of pieces (:mod:`l4vctl._session`): the page view (header fields of
    the config page), the attachment (channel, IRQs, lent memory; live
    devices only), the negotiation (status writes, features) and the queue
    set (ring layout, virtqueues).  A saved page has a view and nothing else.

    ``fmt`` and ``offset`` apply to saved pages: how the file is stored
    (``auto``, ``raw``, ``hex``) and where the page starts in it.
    """

    def __init__(self, device: str | Backend, *, abi: str = "auto", mode: str = "auto",
                 timeout: float = DEFAULT_TIMEOUT, role: str = "driver", stride: int = cat.QUEUE_ENTRY_STRIDE,
                 check: bool = True, attach: str = "auto", fmt: str = "auto", offset: int = 0):  # fmt: skip
        if mode not in ("auto", "ipc", "cmd"):
            raise UsageError(f"mode must be auto, ipc or cmd, not {mode!r}")
        if attach not in ATTACH_CHOICES:
            raise UsageError(f"attach must be auto, config or iface, not {attach!r}")
        if abi not in ("auto", *cat.ABIS):
            raise UsageError(f"abi must be auto, classic or current, not {abi!r}")
        if role not in ("driver", "monitor"):
            raise UsageError(f"role must be driver or monitor, not {role!r}")
        if timeout <= 0:
            raise UsageError("the timeout must be positive")
        from l4vctl.backends import open_backend

        self.url: str = device if isinstance(device, str) else device.url
        self.backend: Backend = open_backend(device) if isinstance(device, str) else device
        self.abi_request = abi
        self.mode_request = mode
        self.attach_request = attach
        self.timeout = timeout
        self.role = role
        self.stride = stride
        self.check = check
        self.page_format = fmt
        self.page_offset = offset
        self.hints: dict[str, Any] = {}
        self.source_format = "live"
        self._view: PageView | None = None
        self._link: Attachment | None = None
        self._neg: Negotiation | None = None  # made when a status is first written
        self._queues: QueueSet | None = None

    # -- context management ------------------------------------------------------------

    def __enter__(self) -> Session:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    # -- the pieces, as attributes -----------------------------------------------------------

    @property
    def live(self) -> bool:
        """False for a saved page (no handshake possible)."""
        return self.backend.live

    @property
    def abi_choice(self) -> pg.AbiChoice | None:
        """Which ABI era the page is read in, and why (None until open)."""
        return self._view.abi_choice if self._view is not None else None

    @property
    def abi(self) -> str:
        """The ABI era the page is read in."""
        return self._view.abi_choice.abi  # type: ignore[union-attr]

    @property
    def hc(self) -> Any:
        """The header codec of the page's ABI era."""
        return self._view.hc  # type: ignore[union-attr]

    @property
    def page(self) -> memoryview | None:
        """The config page (a local mapping or a copy of a saved one); None when closed."""
        return self._view.page if self._view is not None else None

    @property
    def _w32(self) -> memoryview | None:
        return self._view.w32 if self._view is not None else None

    @property
    def channel(self) -> Channel | None:
        """The connection to the device (None for saved pages and once closed)."""
        return self._link.channel if self._link is not None else None

    @property
    def attached_via(self) -> str | None:
        """How the session attached: "config" (DEVICE_CONFIG), "iface" (REGISTER_IFACE) or None."""
        return self._link.attached_via if self._link is not None else None

    @property
    def driver_irq(self) -> Irq | None:
        """The IRQ the device triggers for the driver (completions, config changes)."""
        return self._link.driver_irq if self._link is not None else None

    @property
    def device_irq(self) -> Irq | None:
        """The IRQ the driver triggers to kick the device (notify index of the config)."""
        return self._link.device_irq if self._link is not None else None

    @property
    def next_address(self) -> int:
        """The device address the next lent memory gets."""
        from l4vctl._session.attachment import DEVICE_ADDRESS_BASE

        return self._link.next_address if self._link is not None else DEVICE_ADDRESS_BASE

    @property
    def _memory(self) -> list[Dataspace]:
        return self._link.dataspaces if self._link is not None else []

    def _negotiation(self) -> Negotiation:
        if self._neg is None:
            from l4vctl._session.negotiation import Negotiation

            self._neg = Negotiation(self.mode_request, self.timeout)
        return self._neg

    @property
    def mode(self) -> str:
        """How status and queue configuration reach the device: "ipc" or "cmd"."""
        return self._neg.mode if self._neg is not None else "ipc"

    @mode.setter
    def mode(self, value: str) -> None:
        self._negotiation().mode = value

    @property
    def transitions(self) -> list[Transition]:
        """Every status write and what the device made of it."""
        return self._negotiation().transitions

    @property
    def negotiated(self) -> set[int]:
        """Feature bits accepted at FEATURES_OK."""
        return self._negotiation().negotiated

    @property
    def queues(self) -> list[QueueSetup]:
        """The queues the last handshake configured."""
        return self._queues.queues if self._queues is not None else []

    @property
    def ring_memory(self) -> memoryview | None:
        """The memory holding every configured queue's rings."""
        return self._queues.ring_memory if self._queues is not None else None

    # -- attach ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect and map the config page (no change of device state)."""
        if not self.backend.live:
            self._open_saved_page()
            return
        from l4vctl._session.attachment import Attachment

        channel = self.backend.connect(self.role, self.timeout)
        self._link = Attachment(channel, self.url, self.role, self.attach_request)
        self._link.attach(self._on_config_page, lambda: self.get("cfg_device_notify_index"))

    def _open_saved_page(self) -> None:
        from l4vctl.backends.base import LocalMemory

        data, fmt, hints = self.backend.load(self.page_format)
        start = self.page_offset
        if start:
            if start >= len(data):
                raise FormatError(f"--offset {start:#x} is beyond the end of the input ({len(data)} bytes)")
            data = data[start : start + pg.PAGE_SIZE]
        pg.check_size(data)
        self.hints = hints
        self.source_format = fmt
        self._view = PageView(LocalMemory(memoryview(bytearray(data))), self.abi_request, hints)
        if self.check:
            self._check_identity()

    def _on_config_page(self, memory: Any) -> None:
        try:
            self._view = PageView(memory, self.abi_request, self.hints)
        except BaseException:
            memory.close()
            raise
        if self.check or self.role == "driver":
            self._check_identity()
        describe = getattr(memory, "describe_layout", None)  # a traced page names the fields it sees written
        if describe is not None:
            describe(self._view.abi, self.stride)

    def _check_identity(self) -> None:
        magic = self.get("magic")
        if magic != cat.L4VIRTIO_MAGIC:
            raise ProtocolError(
                f"bad magic {magic:#010x} {self.page_bytes()[:4]!r} (expected b'virt'): not an L4-VIRTIO device"
            )
        version = self.get("version")
        if version != cat.L4VIRTIO_VERSION:
            raise ProtocolError(f"unsupported version {version} (expected 2)")

    def _live(self) -> Attachment:
        if self._link is None:
            raise UnavailableError(f"{self.url}: the session is not attached to a live device")
        return self._link

    def _call(self, label: int, opcode: int, words: Any = (), caps: Any = (), fds: Any = ()) -> Any:
        """One IPC; a channel that failed (timeout, peer gone) is not used again."""
        return self._live().call(label, opcode, words, caps, fds)

    # -- page access (single loads and stores) ----------------------------------------------

    def get(self, name: str) -> int:
        """One header field of the page."""
        try:
            return self._view.get(name)  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError, KeyError):
            raise self._no_field(name) from None

    def _no_field(self, name: str) -> L4vError:
        if self._view is None or self._view.closed:
            return UsageError(f"{self.url}: the session is not open")
        return UsageError(f"no header field {name!r} in the {self.abi} layout")

    def _set(self, name: str, value: int) -> None:
        self._view.set(name, value)  # type: ignore[union-attr]

    def words(self, name: str) -> list[int]:
        """The 32-bit words of an array field of the header."""
        try:
            return self._view.words(name)  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError, KeyError):
            raise self._no_field(name) from None

    def header(self) -> dict[str, Any]:
        """The header decoded."""
        if self._view is None or self._view.closed:
            raise self._no_field("header")
        return self._view.header()

    @property
    def status(self) -> int:
        """The device status byte as the page shows it."""
        return self.get("status")

    def offered(self) -> set[int]:
        """Feature bits the device offers."""
        return set(cat.bits_of(self.words("dev_features_map")))

    def device_info(self) -> dict[str, Any]:
        """id, name and class of the device; id None when the backend cannot know it."""
        unknown = getattr(self.backend, "device_unknown", None)
        if unknown:
            return {"id": None, "name": unknown, "class": None}
        device_id = self.get("device")
        return {"id": device_id, "name": cat.device_name(device_id), "class": cat.device_class(device_id)}

    def page_bytes(self) -> bytes:
        """The whole page, copied."""
        if self._view is None or self._view.closed:
            raise self._no_field("page")
        return self._view.snapshot()

    def decode(self) -> pg.Decoded:
        """The whole page decoded (as ``dump-config`` shows it)."""
        data = self.page_bytes()
        choice = self.abi_choice
        assert choice is not None  # page_bytes() raised unless a page is open
        decoded = pg.decode_page(data, choice, stride=self.stride)
        synthesized = getattr(self.backend, "synthesized", None)
        if synthesized:
            decoded.result["synthesized"] = synthesized
            decoded.result["notes"].insert(0, synthesized)
        if getattr(self.backend, "device_unknown", None):
            decoded.result["device"] = self.device_info()
        return decoded

    # -- status writes ----------------------------------------------------------------------------

    def _need_driver(self, what: str) -> None:
        if not self.live:
            raise UnavailableError(f"{self.url} is a saved page: {what} needs a live device (emu:, unix:, vhost-user:)")
        if self.role != "driver":
            raise UsageError(f"{what} needs a driver session")

    def write_status(self, value: int) -> int:
        """Write a status value (IPC or cmd) and return what the device accepted."""
        self._need_driver("a status write")
        return self._negotiation().write_status(self._view, self._live(), value)  # type: ignore[arg-type]

    def send_cmd(self, word: int) -> None:
        """Post a cmd word, kick the device and wait until it is consumed."""
        self._negotiation().send_cmd(self._view, self._live(), word)  # type: ignore[arg-type]

    def _fail_check(self, after: str) -> None:
        self._negotiation().fail_check(self._view, after)  # type: ignore[arg-type]

    def give_up(self) -> None:
        """Tell the device the driver gave up (FAILED), as far as it still listens."""
        if not self.live or self.channel is None or self.role != "driver" or self._live().broken:
            return
        try:
            self.write_status(self.status | cat.STATUS_FAILED)
        except Exception:
            pass

    # -- the handshake -------------------------------------------------------------------------------

    def _choose_mode(self) -> None:
        self._negotiation().choose_mode(self._view)  # type: ignore[arg-type]

    def reset(self) -> int:
        """Reset the device (status 0)."""
        self._need_driver("a reset")
        self._choose_mode()
        return self.write_status(0)

    def handshake(self, want: Any = None, require: Iterable[Any] = (), refuse: Iterable[Any] = (), *,
                  queues: bool = True, queue_size: int | None = None) -> dict[str, Any]:  # fmt: skip
        """Reset, negotiate and bring the device to DRIVER_OK.

        ``want``: features to accept if offered (None: the transport bits the
        session implements and the device-class bits l4vctl's driver for the
        class implements; ``"all"``: everything offered; a list: exactly
        those).  A wanted or required bit outside what l4vctl implements is
        accepted as asked but reported as ``forced``.  ``require``: features
        whose absence fails the negotiation.  ``refuse``: features never
        accepted.  Returns a summary dict.
        """
        self._need_driver("the handshake")
        device_id = self.get("device")
        try:
            self.reset()
            self._choose_mode()
            self.write_status(cat.STATUS_ACKNOWLEDGE)
            self.write_status(cat.STATUS_ACKNOWLEDGE | cat.STATUS_DRIVER)
            self._fail_check("ACKNOWLEDGE|DRIVER")
            summary = self.negotiate(want, require, refuse, device_id)
            if queues:
                self.setup_queues(queue_size)
            st = self.write_status(self.status | cat.STATUS_DRIVER_OK)
            self._fail_check("DRIVER_OK")
            if not st & cat.STATUS_DRIVER_OK:
                raise DeviceStateError(f"DRIVER_OK was not accepted: status {st:#04x}")
            return summary
        except (NegotiationError, DeviceStateError, ProtocolError):
            self.give_up()
            raise

    def negotiate(self, want: Any, require: Iterable[Any], refuse: Iterable[Any], device_id: int) -> dict[str, Any]:
        """Accept features (see :meth:`handshake`), set FEATURES_OK and check it; a summary dict."""
        return self._negotiation().negotiate(self._view, self._live(), want, require, refuse, device_id)  # type: ignore[arg-type]

    # -- queues ------------------------------------------------------------------------------------

    def setup_queues(self, queue_size: int | None = None) -> list[QueueSetup]:
        """Lay out every queue in one registered dataspace and enable it."""
        if self._queues is None:
            from l4vctl._session.queues import QueueSet

            self._queues = QueueSet(self.stride)
        # a saved page or a monitor fails at lending the ring memory, as it always did
        return self._queues.setup(self._view, self._link, self._negotiation(), queue_size, self._lend)  # type: ignore[arg-type]

    # -- memory and I/O ------------------------------------------------------------------------------

    def _lend(self, size: int, name: str) -> tuple[Any, int]:
        self._need_driver("lending memory")
        return self._live().lend(size, name)

    def alloc(self, size: int, name: str = "l4vctl-buffers") -> tuple[memoryview, int]:
        """Shared memory lent to the device: a mapping and its device address.

        Memory that is not mapped here (a remote backend) comes back as a
        local shadow; the virtqueues move request bytes between the two when
        the device may look at them.
        """
        memory, addr = self._lend(size, name)
        view = memory.view()
        if view is not None:
            return view, addr
        queues = self._queues
        if queues is None:
            raise UsageError("memory that is not mapped here can be lent only after the queues are set up")
        if queues.shadow is None:
            from l4vctl._session.shadow import ShadowSpace

            queues.shadow = ShadowSpace()
        return queues.shadow.add(addr, memory), addr

    def virtqueue(self, index: int) -> Virtqueue:
        """The driver-side virtqueue of a configured queue."""
        if self._queues is None:
            raise UsageError(f"queue {index} is not configured")
        return self._queues.virtqueue(index, self._view, self._live(), self.negotiated, self.check_device)  # type: ignore[arg-type]

    def check_device(self) -> None:
        """Raise if the device entered a fail state or its connection died."""
        if self._link is not None:
            self._link.check()
        self._fail_check("I/O")

    def _watch_fd(self) -> int | None:
        """The descriptor of the device connection, watched for a hang-up while waiting (None: nothing to watch)."""
        return self._link.watch_fd() if self._link is not None else None

    def wait_irq(self, timeout: float) -> None:
        """Sleep until the driver IRQ fires or ``timeout``; raise UnavailableError if the device goes away meanwhile."""
        from l4vctl.virtqueue import sleep_on

        sleep_on(self.driver_irq, self._watch_fd(), timeout, self.check_device)

    def device_config(self) -> dict[str, Any]:
        """The device-specific config, decoded (empty for unknown devices).

        Only fields before the queue array are decoded; the rest are absent.
        """
        nq, qoff = self.get("num_queues"), self.get("queues_offset")
        page = self.page if self.page is not None else self.page_bytes()  # a memory not mapped here: a copy
        limit = qoff if nq and cat.HEADER_SIZE <= qoff <= len(page) else len(page)
        return pg.device_config_fields(page, self.get("device"), self.abi, limit)[0]

    # -- the driver's memory, as a monitor reads it --------------------------------------

    def regions(self) -> list[tuple[int, int, bool]] | None:
        """The driver's registered memory as the device sees it: ``(base, size, writable)`` each.

        None when the backend has no monitor interface to it (saved pages, vhost-user, l4re).
        """
        if not self.live or self.channel is None:
            return None
        from l4vctl._session.memory import regions

        return regions(self._live())

    def read_device_memory(self, ranges: Iterable[tuple[int, int]]) -> memoryview:
        """The bytes of ``(device address, size)`` ranges of the driver's memory, concatenated.

        One monitor READ (at most ``catalog.MONITOR_READ_MAX_RANGES`` ranges and
        ``MONITOR_READ_MAX_BYTES`` bytes).  UnavailableError when the backend has
        no such interface, FormatError for a range outside the registered memory.
        """
        if not self.live or self.channel is None:
            raise UnavailableError(f"{self.url}: no live device whose memory could be read")
        from l4vctl._session.memory import read

        return read(self._live(), self.url, list(ranges))

    # -- monitor ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any] | None:
        """Device-side queue state from the emulator's monitor interface, if it has one."""
        if not self.live:
            return None
        r = self._call(cat.L4VCTL_PROTO_MONITOR, cat.MONITOR_OP_STATS)
        r.close()
        if r.result < 0:
            return None
        from l4vctl._session.stats import parse_stats

        return parse_stats(r.words)

    # -- teardown -------------------------------------------------------------------------------------

    def close(self, reset: bool = True) -> None:
        """Detach; a driver that drove the device resets it first (status 0)."""
        link = self._link
        drove = self._neg is not None and self._neg.drove
        if (
            link is not None
            and link.channel is not None
            and reset
            and drove
            and self.role == "driver"
            and not link.broken
        ):
            try:
                if self.mode != "cmd" or not self.get("cmd"):
                    self.write_status(0)
            except Exception:
                pass
        if self._queues is not None:
            self._queues.close()
        if self._view is not None:
            self._view.release()  # the ABI choice and codec stay; page reads now say "not open"
        if link is not None:
            link.close()
        self.backend.close()
