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

import time

from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl.caps import PAGE, RIGHT_W, RIGHTS_RW, Dataspace, Irq
from l4vctl.catalog import resolve_features
from l4vctl.drivers import implemented_features
from l4vctl.errors import (
    DeviceStateError,
    FormatError,
    L4vError,
    NegotiationError,
    ProtocolError,
    TimeoutExpired,
    UnavailableError,
    UsageError,
)
from l4vctl.formats.fast import ring as ring_geometry
from l4vctl.wire import Cap

DEFAULT_TIMEOUT = 5.0
#: Seconds to poll the cmd word before sleeping between polls.
CMD_SPIN = 500e-6
#: First device address the session hands out (L4Re drivers start at the superpage size).
DEVICE_ADDRESS_BASE = 0x200000
#: Transport features the session's driver implements (others are accepted only when asked for: "forced").
SUPPORTED_TRANSPORT = {cat.INDIRECT_DESC_BIT, cat.EVENT_IDX_BIT, cat.VERSION_1_BIT}
#: How a driver session attaches: by what the device answers, or forced.
ATTACH_CHOICES = ("auto", "config", "iface")


class Transition:
    """One status write and what the device made of it."""

    __slots__ = ("via", "wrote", "status")

    def __init__(self, via: str, wrote: int, status: int):
        self.via = via
        self.wrote = wrote
        self.status = status

    def to_json(self) -> dict:
        names, unknown = cat.flag_names(self.status, cat.STATUS_BITS)
        return {"via": self.via, "wrote": self.wrote, "status": self.status, "flags": names}


class QueueSetup:
    """A queue the session configured: size, device addresses, offsets in its memory."""

    __slots__ = ("index", "num", "desc", "avail", "used", "offset", "accepted", "result")

    def __init__(self, index, num, desc, avail, used, offset):
        self.index = index
        self.num = num
        self.desc = desc
        self.avail = avail
        self.used = used
        self.offset = offset
        self.accepted: bool | None = None
        self.result: int | None = None

    def to_json(self) -> dict:
        return {
            "index": self.index, "num": self.num, "desc_addr": self.desc, "avail_addr": self.avail,
            "used_addr": self.used, "accepted": self.accepted, "result": self.result,
        }  # fmt: skip


class Session:
    """A driver (or monitor) session with one device."""

    def __init__(self, device, *, abi: str = "auto", mode: str = "auto", timeout: float = DEFAULT_TIMEOUT,
                 role: str = "driver", stride: int = cat.QUEUE_ENTRY_STRIDE, check: bool = True,
                 attach: str = "auto"):  # fmt: skip
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

        self.url = device if isinstance(device, str) else device.url
        self.backend = open_backend(device) if isinstance(device, str) else device
        self.abi_request = abi
        self.mode_request = mode
        self.attach_request = attach
        self.attached_via: str | None = None  # "config" (DEVICE_CONFIG) or "iface" (REGISTER_IFACE)
        self.timeout = timeout
        self.role = role
        self.stride = stride
        self.check = check
        self.channel = None
        self.abi_choice: pg.AbiChoice | None = None
        self.page: memoryview | None = None
        self.hints: dict = {}
        self.source_format = "live"
        self.transitions: list[Transition] = []
        self.negotiated: set[int] = set()
        self.queues: list[QueueSetup] = []
        self.mode = "ipc"
        self._config_ds: Dataspace | None = None
        self._driver_irq: Irq | None = None
        self._device_irq: Irq | None = None
        self._views = []
        self._memory: list[Dataspace] = []
        self._vqs: dict[int, object] = {}
        self._rings: tuple | None = None  # (memory, device address, size) of the rings
        self._queue_irqs: dict[int, Irq] = {}  # per-queue kick IRQs by notify index
        self.next_address = DEVICE_ADDRESS_BASE
        self._drove = False
        self._broken = False  # the channel failed: no more calls on it

    # -- context management ------------------------------------------------------------

    def __enter__(self) -> "Session":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    @property
    def live(self) -> bool:
        return self.backend.live

    @property
    def abi(self) -> str:
        return self.abi_choice.abi

    # -- attach ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect and map the config page (no change of device state)."""
        if not self.backend.live:
            self._open_saved_page()
            return
        self.channel = self.backend.connect(self.role, self.timeout)
        if self.role != "driver":  # monitors only look at the page
            self._attach_device_config(fallback=False)
        elif self.attach_request == "iface":
            self._attach_register_iface()
        elif self._attach_device_config(fallback=self.attach_request == "auto"):
            self._attach_irqs()
        else:  # -L4_ENOSYS: a device from before DEVICE_CONFIG, which knows only REGISTER_IFACE
            self._attach_register_iface()

    def _open_saved_page(self) -> None:
        data, fmt, hints = self.backend.load()
        pg.check_size(data)
        self.hints = hints
        self.source_format = fmt
        self.page = memoryview(bytearray(data))
        self._choose_abi()
        if self.check:
            self._check_identity()

    def _choose_abi(self) -> None:
        self.abi_choice = pg.choose_abi(self.page, self.abi_request, self.hints)
        self.hc = pg.header_codec(self.abi_choice.abi)
        self._w32 = self.page.cast("I") if len(self.page) % 4 == 0 else None
        self._views.append(self._w32)

    def _map_config(self, fd: int, size: int, ds_offset: int, writable: bool) -> None:
        if ds_offset % PAGE:
            raise ProtocolError(f"config page offset {ds_offset:#x} is not page aligned")
        ds = Dataspace.adopt(fd, size, RIGHTS_RW if writable else 0, "config", need=ds_offset + cat.PAGE_SIZE,
                             what="config dataspace")  # fmt: skip
        self._config_ds = ds
        try:
            import os

            real = os.fstat(fd).st_size
            if real < ds_offset + cat.PAGE_SIZE:
                raise ProtocolError(f"config dataspace of {real} bytes is too small for a page at {ds_offset:#x}")
            m = ds.map(ds_offset, cat.PAGE_SIZE, writable=writable)
        except OSError as exc:
            raise ProtocolError(f"cannot map the config page: {exc.strerror or exc}") from None
        self.page = memoryview(m)
        self._views.append(self.page)
        self._choose_abi()
        if self.check or self.role == "driver":
            self._check_identity()

    def _check_identity(self) -> None:
        magic = self.get("magic")
        if magic != cat.L4VIRTIO_MAGIC:
            raise ProtocolError(f"bad magic {magic:#010x} {bytes(self.page[:4])!r} (expected b'virt'): not an L4-VIRTIO device")
        version = self.get("version")
        if version != cat.L4VIRTIO_VERSION:
            raise ProtocolError(f"unsupported version {version} (expected 2)")

    def _attach_device_config(self, fallback: bool) -> bool:
        """Map the page DEVICE_CONFIG hands out; False if it answered -L4_ENOSYS and ``fallback``."""
        r = self._call(cat.L4VIRTIO_PROTOCOL, cat.OP_DEVICE_CONFIG)
        try:
            if r.result == -cat.L4_ENOSYS and fallback:
                return False
            if r.result == -cat.L4_ENOSYS and self.role == "driver":
                raise ProtocolError("DEVICE_CONFIG is not implemented: a device that knows only REGISTER_IFACE "
                                    "(try --attach iface or auto)")  # fmt: skip
            if r.result < 0:
                raise ProtocolError(f"DEVICE_CONFIG failed: {cat.l4_error_name(r.result)}")
            if not r.words:
                raise ProtocolError("DEVICE_CONFIG reply carries no page offset")
            cap = r.caps[0] if r.caps else None
            fd = r.fd(0, cat.CAP_DATASPACE)
            self._map_config(fd, cap.size, r.words[0], writable=self.role == "driver")
        finally:
            r.close()
        self.attached_via = "config"
        return True

    def _attach_irqs(self) -> None:
        index = self.get("cfg_device_notify_index")
        r = self._call(cat.L4VIRTIO_PROTOCOL, cat.OP_GET_DEVICE_IRQ, [index])
        try:
            if r.result < 0:
                raise ProtocolError(f"GET_DEVICE_IRQ({index}) failed: {cat.l4_error_name(r.result)}")
            self._device_irq = Irq.adopt(r.fd(0, cat.CAP_IRQ), "device IRQ")
        finally:
            r.close()
        self._driver_irq = Irq.create()
        r = self._call(cat.L4_PROTO_IRQ, cat.ICU_OP_BIND, [0], [Cap(cat.CAP_IRQ, RIGHT_W, 0)],
                              [self._driver_irq.fd])  # fmt: skip
        r.close()
        if r.result < 0:
            raise ProtocolError(f"ICU bind failed: {cat.l4_error_name(r.result)}")

    def _attach_register_iface(self) -> None:
        self._driver_irq = Irq.create()
        r = self._call(cat.L4VIRTIO_PROTOCOL, cat.OP_REGISTER_IFACE, [], [Cap(cat.CAP_IRQ, RIGHT_W, 0)],
                              [self._driver_irq.fd])  # fmt: skip
        try:
            if r.result == -cat.L4_ENOSYS:
                if self.attach_request == "auto":
                    raise ProtocolError("cannot attach: the device answers neither DEVICE_CONFIG nor REGISTER_IFACE "
                                        "(-L4_ENOSYS)")  # fmt: skip
                raise ProtocolError("REGISTER_IFACE is not implemented: a device from after 2022-09 "
                                    "(try --attach config or auto)")  # fmt: skip
            if r.result < 0:
                raise ProtocolError(f"REGISTER_IFACE failed: {cat.l4_error_name(r.result)}")
            self._device_irq = Irq.adopt(r.fd(0, cat.CAP_IRQ), "device IRQ")
            size = r.caps[1].size if len(r.caps) > 1 else 0
            self._map_config(r.fd(1, cat.CAP_DATASPACE), size, 0, writable=True)
        finally:
            r.close()
        self.attached_via = "iface"

    def _call(self, label: int, opcode: int, words=(), caps=(), fds=()):
        """One IPC; a channel that failed (timeout, peer gone) is not used again."""
        if self._broken:
            raise UnavailableError(f"{self.url}: the connection to the device failed earlier")
        try:
            return self.channel.call(label, opcode, words, caps, fds)
        except (TimeoutExpired, UnavailableError, ProtocolError):
            self._broken = True
            raise

    # -- page access (single loads and stores) ----------------------------------------------

    def get(self, name: str) -> int:
        try:
            off, size, fmt, count = self.hc.fields[name]
            if size == 4 and self._w32 is not None:
                return self._w32[off >> 2]
            return int.from_bytes(self.page[off : off + size], "little")
        except (AttributeError, TypeError, ValueError, KeyError):
            raise self._no_field(name) from None

    def _no_field(self, name: str) -> L4vError:
        if self.page is None:
            return UsageError(f"{self.url}: the session is not open")
        return UsageError(f"no header field {name!r} in the {self.abi} layout")

    def _set(self, name: str, value: int) -> None:
        off, _size, _fmt, _count = self.hc.fields[name]
        self._w32[off >> 2] = value & 0xFFFFFFFF

    def words(self, name: str) -> list[int]:
        try:
            off, _size, _fmt, count = self.hc.fields[name]
            if self._w32 is not None:
                return list(self._w32[off >> 2 : (off >> 2) + count])
            # a saved page whose length is not a multiple of 4: the header is still whole
            raw = bytes(self.page[off : off + 4 * count])
            return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, 4 * count, 4)]
        except (AttributeError, TypeError, ValueError, KeyError):
            raise self._no_field(name) from None

    def header(self) -> dict:
        if self.page is None:
            raise self._no_field("header")
        return self.hc.unpack(self.page)

    @property
    def status(self) -> int:
        return self.get("status")

    def offered(self) -> set[int]:
        return set(cat.bits_of(self.words("dev_features_map")))

    def device_info(self) -> dict:
        """id, name and class of the device; id None when the backend cannot know it."""
        unknown = getattr(self.backend, "device_unknown", None)
        if unknown:
            return {"id": None, "name": unknown, "class": None}
        device_id = self.get("device")
        return {"id": device_id, "name": cat.device_name(device_id), "class": cat.device_class(device_id)}

    def decode(self) -> pg.Decoded:
        """The whole page decoded (as ``dump-config`` shows it)."""
        decoded = pg.decode_page(bytes(self.page), self.abi_choice, stride=self.stride)
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
        self._drove = True
        if self.mode == "cmd":
            self.send_cmd(cat.cmd_word(cat.CMD_SET_STATUS, value))
        else:
            r = self._call(cat.L4VIRTIO_PROTOCOL, cat.OP_SET_STATUS, [value])
            r.close()
            if r.result < 0:  # L4Re devices answer 0; a cmd-only proxy refuses the IPC
                hint = ""
                if cat.CMD_CONFIG_BIT[self.abi] in self.offered():
                    hint = " (the device offers cmd mode: try --mode cmd)"
                raise ProtocolError(f"SET_STATUS({value:#x}) failed: {cat.l4_error_name(r.result)}{hint}")
        status = self.status
        self.transitions.append(Transition(self.mode, value, status))
        return status

    def send_cmd(self, word: int) -> None:
        """Post a cmd word, kick the device and wait until it is consumed."""
        self._set("cmd", word)
        self._device_irq.trigger()
        start = time.perf_counter()
        spin_until = start + CMD_SPIN
        deadline = start + self.timeout
        delay = 50e-6
        hangup = None
        while self.get("cmd"):
            now = time.perf_counter()
            if now < spin_until:
                continue
            if now > deadline:
                self._broken = True
                raise TimeoutExpired(f"the device did not consume cmd {word:#010x} within {self.timeout:g} s")
            if delay < 0.001:
                time.sleep(delay)
                delay *= 2
                continue
            if hangup is None:  # from here on, sleep on the connection: a device that dies ends the wait
                hangup = _hangup_poller(self._watch_fd())
            if hangup is None:
                time.sleep(delay)
            elif hangup.poll(1):
                self._broken = True
                raise UnavailableError(f"{self.url}: the device went away before it consumed cmd {word:#010x}")

    def _fail_check(self, after: str) -> None:
        st = self.status
        if st & cat.STATUS_FAIL_MASK:
            names, _ = cat.flag_names(st & cat.STATUS_FAIL_MASK, cat.STATUS_BITS)
            raise DeviceStateError(f"device in error state after {after}: status {st:#04x} ({'+'.join(names)})")

    def give_up(self) -> None:
        """Tell the device the driver gave up (FAILED), as far as it still listens."""
        if not self.live or self.channel is None or self.role != "driver" or self._broken:
            return
        try:
            self.write_status(self.status | cat.STATUS_FAILED)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    # -- the handshake -------------------------------------------------------------------------------

    def _choose_mode(self) -> None:
        offers_cmd = cat.CMD_CONFIG_BIT[self.abi] in self.offered()
        if self.mode_request == "auto":
            self.mode = "cmd" if offers_cmd else "ipc"
        elif self.mode_request == "cmd" and not offers_cmd:
            raise NegotiationError("cmd mode asked for, but the device does not offer L4VIRTIO_FEATURE_CMD_CONFIG")
        else:
            self.mode = self.mode_request

    def reset(self) -> int:
        """Reset the device (status 0)."""
        self._need_driver("a reset")
        self._choose_mode()
        return self.write_status(0)

    def handshake(self, want=None, require=(), refuse=(), *, queues: bool = True, queue_size: int | None = None) -> dict:
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

    def negotiate(self, want, require, refuse, device_id: int) -> dict:
        offered = self.offered()
        table = cat.feature_table(self.abi, device_id)
        required = resolve_features(require, self.abi, device_id)
        refused = resolve_features(refuse, self.abi, device_id)
        cmd_bit = cat.CMD_CONFIG_BIT[self.abi]
        implemented = SUPPORTED_TRANSPORT | implemented_features(device_id) | {cmd_bit}
        if want is None:
            wanted = (offered & implemented) | required
        elif want == "all":
            wanted = set(offered) | required
        else:
            wanted = resolve_features(want, self.abi, device_id) | required
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
        words = pg.feature_words(self.abi, accept)
        off = self.hc.fields["driver_features_map"][0]
        for i, word in enumerate(words):
            self._w32[(off >> 2) + i] = word
        st = self.write_status(self.status | cat.STATUS_FEATURES_OK)
        if not st & cat.STATUS_FEATURES_OK:
            self._fail_check("FEATURES_OK")
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

    # -- queues ------------------------------------------------------------------------------------

    def setup_queues(self, queue_size: int | None = None) -> list[QueueSetup]:
        """Lay out every queue in one registered dataspace and enable it."""
        n = self.get("num_queues")
        qoff = self.get("queues_offset")
        if n and (qoff < cat.HEADER_SIZE or qoff + n * self.stride > cat.PAGE_SIZE):
            raise ProtocolError(f"queue array at {qoff:#x} with {n} entries does not fit the page")
        geometry = ring_geometry()
        qc = pg.queue_codec(self.stride)
        plan = []
        total = 0
        for i in range(n):
            entry = qc.unpack(self.page, qoff + i * self.stride)
            num_max = entry["num_max"]
            if num_max == 0:
                raise ProtocolError(f"queue {i}: num_max is 0")
            num = min(queue_size or num_max, num_max)
            num = 1 << (num.bit_length() - 1)  # the largest power of two not above it
            layout = geometry.simple_layout(num)
            plan.append((i, num, total, layout))
            total += -(-layout["total"] // PAGE) * PAGE
        if not plan:
            return []
        for vq in self._vqs.values():  # rings of an earlier handshake are gone
            vq.close()
        self._vqs.clear()
        if self._rings is not None and self._rings[2] >= total:
            # a new handshake on the same session reuses its registered ring memory
            self.ring_memory, ring_base, _size = self._rings
            self.ring_memory[:total] = bytes(total)
        else:
            self.ring_memory, ring_base = self.alloc(total, "l4vctl-rings")
            self._rings = (self.ring_memory, ring_base, total)
        w16 = self.page.cast("H")
        w64 = self.page.cast("Q")
        self._views += [w16, w64]
        self.queues = []
        for i, num, offset, layout in plan:
            base = ring_base + offset
            q = QueueSetup(i, num, base + layout["desc"], base + layout["avail"], base + layout["used"], offset)
            entry = qoff + i * self.stride
            f = qc.fields
            w16[(entry + f["num"][0]) >> 1] = num
            w16[(entry + f["driver_notify_index"][0]) >> 1] = 0
            w64[(entry + f["desc_addr"][0]) >> 3] = q.desc
            w64[(entry + f["avail_addr"][0]) >> 3] = q.avail
            w64[(entry + f["used_addr"][0]) >> 3] = q.used
            w16[(entry + f["ready"][0]) >> 1] = 1
            if self.mode == "cmd":
                self.send_cmd(cat.cmd_word(cat.CMD_CFG_QUEUE, i))
                q.accepted = None  # cmd mode reports nothing
            else:
                r = self._call(cat.L4VIRTIO_PROTOCOL, cat.OP_CONFIG_QUEUE, [i])
                r.close()
                q.result = r.result
                q.accepted = r.result >= 0
                if r.result < 0:
                    raise NegotiationError(f"queue {i} was rejected: CONFIG_QUEUE answered {cat.l4_error_name(r.result)}")
            self.queues.append(q)
        return self.queues

    # -- memory and I/O ------------------------------------------------------------------------------

    def alloc(self, size: int, name: str = "l4vctl-buffers") -> tuple[memoryview, int]:
        """Shared memory lent to the device: a mapping and its device address."""
        self._need_driver("lending memory")
        ds = Dataspace.create(name, size)
        self._memory.append(ds)
        mem = memoryview(ds.map())
        self._views.append(mem)
        addr = self.next_address
        r = self._call(cat.L4VIRTIO_PROTOCOL, cat.OP_REGISTER_DS, [addr, 0, ds.size],
                       [Cap(cat.CAP_DATASPACE, RIGHTS_RW, 0, ds.size)], [ds.fd])  # fmt: skip
        r.close()
        if r.result < 0:
            raise ProtocolError(f"REGISTER_DS of {ds.size} bytes failed: {cat.l4_error_name(r.result)}")
        self.next_address = addr + ds.size
        return mem, addr

    def virtqueue(self, index: int):
        """The driver-side virtqueue of a configured queue."""
        from l4vctl.virtqueue import Virtqueue

        vq = self._vqs.get(index)
        if vq is not None:
            return vq
        setup = next((q for q in self.queues if q.index == index), None)
        if setup is None:
            raise UsageError(f"queue {index} is not configured")
        total = ring_geometry().simple_layout(setup.num)["total"]
        vq = Virtqueue(
            self.ring_memory[setup.offset : setup.offset + total],
            setup.num,
            kick_irq=self._kick_irq(index),
            irq=self._driver_irq,
            event_idx=cat.EVENT_IDX_BIT in self.negotiated,
            indirect=cat.INDIRECT_DESC_BIT in self.negotiated,
            index=index,
            check=self.check_device,
            watch=self._watch_fd(),
        )
        self._vqs[index] = vq
        return vq

    def _kick_irq(self, queue: int) -> Irq:
        """The device IRQ that kicks ``queue``: its device_notify_index names it.

        L4Re devices use index 0 for everything (the IRQ fetched at attach);
        a device may give each queue an IRQ of its own.
        """
        entry = pg.queue_codec(self.stride).unpack(self.page, self.get("queues_offset") + queue * self.stride)
        index = entry["device_notify_index"]
        if index == self.get("cfg_device_notify_index"):
            return self._device_irq
        irq = self._queue_irqs.get(index)
        if irq is None:
            r = self._call(cat.L4VIRTIO_PROTOCOL, cat.OP_GET_DEVICE_IRQ, [index])
            try:
                if r.result < 0:
                    raise ProtocolError(f"GET_DEVICE_IRQ({index}) for queue {queue} failed: {cat.l4_error_name(r.result)}")
                irq = self._queue_irqs[index] = Irq.adopt(r.fd(0, cat.CAP_IRQ), f"IRQ of queue {queue}")
            finally:
                r.close()
        return irq

    def check_device(self) -> None:
        """Raise if the device entered a fail state or its connection died."""
        check = getattr(self.channel, "check", None)
        if check is not None:
            try:
                check()
            except UnavailableError:
                self._broken = True
                raise
        self._fail_check("I/O")

    def _watch_fd(self) -> int | None:
        """The descriptor of the device connection, watched for a hang-up while waiting (None: nothing to watch)."""
        fileno = getattr(self.channel, "fileno", None)
        fd = fileno() if fileno is not None else -1
        return fd if fd >= 0 else None

    def wait_irq(self, timeout: float) -> None:
        """Sleep until the driver IRQ fires or ``timeout``; raise UnavailableError if the device goes away meanwhile."""
        from l4vctl.virtqueue import sleep_on

        sleep_on(self._driver_irq, self._watch_fd(), timeout, self.check_device)

    def device_config(self) -> dict:
        """The device-specific config, decoded (empty for unknown devices).

        Only fields before the queue array are decoded; the rest are absent.
        """
        nq, qoff = self.get("num_queues"), self.get("queues_offset")
        limit = qoff if nq and cat.HEADER_SIZE <= qoff <= len(self.page) else len(self.page)
        return pg.device_config_fields(self.page, self.get("device"), self.abi, limit)[0]

    # -- monitor ------------------------------------------------------------------------------------

    def stats(self) -> dict | None:
        """Device-side queue state from the emulator's monitor interface, if it has one."""
        if not self.live:
            return None
        r = self._call(cat.L4VCTL_PROTO_MONITOR, cat.MONITOR_OP_STATS)
        r.close()
        if r.result < 0:
            return None
        words = r.words
        ng = len(cat.STATS_GLOBAL)
        nq_words = len(cat.STATS_QUEUE)
        if len(words) < ng or words[0] != cat.STATS_VERSION:
            raise ProtocolError("monitor STATS reply has an unknown layout")
        out = dict(zip(cat.STATS_GLOBAL, words[:ng]))
        queues = []
        for i in range(out["num_queues"]):
            chunk = words[ng + i * nq_words : ng + (i + 1) * nq_words]
            if len(chunk) != nq_words:
                raise ProtocolError("monitor STATS reply is truncated")
            queues.append(dict(zip(cat.STATS_QUEUE, chunk)))
        out["queues"] = queues
        return out

    # -- teardown -------------------------------------------------------------------------------------

    def close(self, reset: bool = True) -> None:
        """Detach; a driver that drove the device resets it first (status 0)."""
        if self.channel is not None and reset and self._drove and self.role == "driver" and not self._broken:
            try:
                if not self.mode == "cmd" or not self.get("cmd"):
                    self.write_status(0)
            except Exception:  # noqa: BLE001 - the device may be gone already
                pass
        for vq in self._vqs.values():
            vq.close()
        self._vqs.clear()
        for view in reversed(self._views):
            if view is not None:
                view.release()
        self._views.clear()
        self.page = None
        for ds in self._memory:
            ds.close()
        self._memory.clear()
        for irq in self._queue_irqs.values():
            irq.close()
        self._queue_irqs.clear()
        for obj in (self._config_ds, self._driver_irq, self._device_irq):
            if obj is not None:
                obj.close()
        self._config_ds = self._driver_irq = self._device_irq = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.backend.close()


def _hangup_poller(fd: int | None):
    """A poll object that reports the device connection ``fd`` hanging up (None without one)."""
    if fd is None:
        return None
    import select

    from l4vctl.virtqueue import HANGUP

    p = select.poll()
    p.register(fd, HANGUP)
    return p
