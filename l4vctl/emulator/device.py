"""The device side of L4-VIRTIO: config page, status machine, queues, cmd, IRQs.

This follows the rules of L4Re's generic device (protocol notes §3 and §5):
the status state machine with its ordering check and feature acceptance,
feature publication on reset, CONFIG_QUEUE validation, REGISTER_DS with all
its checks, cmd-word processing and ``irq_status``.  Where L4Re skips a
check that matters for robustness, the emulator checks it and logs that it
does.  Every field the driver may read concurrently is written with one
store through a typed memoryview.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING

from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl.caps import PAGE, RIGHT_W, RIGHTS_RO, SEAL_FUTURE_WRITE, Dataspace, Irq, dataspace_problem
from l4vctl.emulator import log
from l4vctl.emulator.ring import BadChain, DeviceRing
from l4vctl.formats.fast import SplitRingViews
from l4vctl.formats.fast import ring as ring_geometry

if TYPE_CHECKING:
    from l4vctl.emulator.server import Server

EOK = 0
EIO = -cat.L4_EIO
EINVAL = -cat.L4_EINVAL
ERANGE = -cat.L4_ERANGE
ENOMEM = -cat.L4_ENOMEM
ENOSYS = -cat.L4_ENOSYS
EMSGTOOSHORT = -cat.L4_EMSGTOOSHORT

FAIL = cat.STATUS_FAIL_MASK
CLASSIC, CURRENT = cat.Abi.CLASSIC, cat.Abi.CURRENT
ACK_DRIVER = cat.STATUS_ACKNOWLEDGE | cat.STATUS_DRIVER


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


class Region:
    """A registered dataspace region as the device sees it."""

    __slots__ = ("base", "size", "writable", "mm", "view")

    def __init__(self, base: int, size: int, writable: bool, mm: mmap.mmap):
        self.base = base
        self.size = size
        self.writable = writable
        self.mm = mm
        self.view = memoryview(mm)

    def contains(self, addr: int, length: int) -> bool:
        """Whether the region holds all of [addr, addr + length)."""
        return self.base <= addr and addr + length <= self.base + self.size

    def close(self) -> None:
        """Unmap the region (unless a ring view still uses it)."""
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass  # a ring view still refers to it; the mapping goes with the last view


class Queue:
    """Device-side state of one virtqueue."""

    __slots__ = (
        "index", "enabled", "num", "desc_addr", "avail_addr", "used_addr", "views", "next_avail",
        "completed", "notified", "signalled", "ring",
    )  # fmt: skip

    def __init__(self, index: int):
        self.index = index
        self.completed = 0
        self.notified = 0
        self.signalled = 0  # used.idx when the device last interrupted the driver for this queue
        self.disable()

    def disable(self) -> None:
        """Forget the queue's rings: not enabled, size 0, no views (the counters stay)."""
        self.enabled = False
        self.num = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.views: SplitRingViews | None = None  # typed views of the rings while enabled
        self.next_avail = 0
        self.ring: DeviceRing | None = None  # the DeviceRing while enabled

    def snapshot(self) -> dict:
        """Ring indices as the monitor shows them (0 while disabled)."""
        if not self.enabled:
            return {"avail_idx": 0, "avail_flags": 0, "used_idx": 0, "used_flags": 0, "used_event": 0,
                    "avail_event": 0}  # fmt: skip
        v = self.views
        assert v is not None  # an enabled queue has its views
        return {
            "avail_idx": v.avail_idx[0],
            "avail_flags": v.avail_flags[0],
            "used_idx": v.used_idx[0],
            "used_flags": v.used_flags[0],
            "used_event": v.used_event[0],
            "avail_event": v.avail_event[0],
        }

    # Whole-part views of an enabled queue's rings, for inspection (None while disabled).

    @property
    def desc(self) -> memoryview | None:
        """The descriptor table's bytes."""
        return self.views.desc if self.views is not None else None

    @property
    def avail(self) -> memoryview | None:
        """The available ring as 16-bit words."""
        return self.views.avail if self.views is not None else None

    @property
    def used_hdr(self) -> memoryview | None:
        """The used ring's header as 16-bit words."""
        return self.views.used_hdr if self.views is not None else None

    @property
    def used_event_view(self) -> memoryview | None:
        """The driver's used_event word (EVENT_IDX)."""
        return self.views.used_event if self.views is not None else None

    @property
    def avail_event_view(self) -> memoryview | None:
        """The device's avail_event word (EVENT_IDX)."""
        return self.views.avail_event if self.views is not None else None


class Device:
    """One emulated L4-VIRTIO device serving a model."""

    def __init__(self, model):
        opts = model.options
        self.model = model
        model.device = self
        self.abi = opts["abi"]
        classic = self.abi == CLASSIC
        self.attach = opts.get("attach") or ("both" if classic else "config")
        if self.attach != "config" and not classic:
            raise ValueError(f"attach={self.attach}: REGISTER_IFACE exists only in the classic era (use abi=classic)")
        self.cmd_mode = opts["cmd_mode"]
        self.faults = dict(opts["inject"])
        self.max_regions = opts["max_regions"]
        self.ds_offset = opts["ds_offset"]
        if self.ds_offset % PAGE:
            raise ValueError(f"ds_offset {self.ds_offset:#x} is not a multiple of the page size")
        self.hc = pg.header_codec(self.abi)
        #: size of a queue-config entry in the page (the layout of LP64 and ARM peers)
        self.stride = cat.QUEUE_ENTRY_STRIDE
        self.qc = pg.queue_codec(self.stride)
        self.offered = self._offered_bits()
        self.offered_words = pg.feature_words(self.abi, self.offered)
        self.num_queues_cfg = model.num_queues()
        self.num_max = model.num_max()
        built = self._initial_page()  # before any resource is taken: a bad config raises ValueError here

        self.config_ds = Dataspace.create(f"l4vctl-{model.KIND}-config", self.ds_offset + cat.PAGE_SIZE)
        self._page_map = self.config_ds.map()
        page = memoryview(self._page_map)[self.ds_offset : self.ds_offset + cat.PAGE_SIZE]
        self.page = page
        self.w16 = page.cast("H")
        self.w32 = page.cast("I")
        self.w64 = page.cast("Q")
        self._mirror: Dataspace | None = None  # the read-only copy of the page monitors map
        self._mirror_page: memoryview | None = None
        self.server: Server | None = None  # the Server serving this device, once there is one
        self.last_error = ""  # the reason of the last device error
        self.kick_irq = Irq.create()  # the device IRQ drivers trigger (GET_DEVICE_IRQ 0)
        self.driver_irq: Irq | None = None  # bound with ICU bind
        self.regions: list[Region] = []
        self._last_region: Region | None = None
        self.negotiated: set[int] = set()  # features accepted at FEATURES_OK
        self.status = 0  # the trusted copy
        self.kicks = 0
        self.irqs_sent = 0
        self.device_errors = 0
        self.polling = False  # the server polls the rings (drivers need not kick meanwhile)
        self.features_refused = 0  # FEATURES_OK writes refused since the last reset
        self._arm_faults()
        self._build_page(built)
        self._cmd_index = self.hc.fields["cmd"][0] >> 2
        self._cmd_left = 0  # a cmd word left in place (never-clear-cmd): run again only when kicked
        self.queues = [Queue(i) for i in range(self.num_queues)]

    # -- page ------------------------------------------------------------------------

    def _offered_bits(self) -> set[int]:
        m = self.model
        bits = set(m.features()) | {cat.VERSION_1_BIT}
        if self.cmd_mode:
            bits.add(cat.CMD_CONFIG_BIT[self.abi])
        by_name = cat.feature_names(self.abi, m.DEVICE_ID)
        for item in m.options["features"]:
            bit = cat.feature_bit(item, by_name)
            if bit is None:
                raise ValueError(f"unknown feature {item!r} for a {m.KIND} device")
            bits.add(bit)
        words = 32 * self.hc.fields["dev_features_map"][3]
        bad = [b for b in bits if b >= words]
        if bad:
            raise ValueError(f"feature bits {bad} do not fit the {self.abi} map ({words} bits)")
        return bits

    def _initial_page(self) -> bytearray:
        m = self.model
        profile = m.profile
        # A server with late features (L4Re's block servers) shows only VERSION_1 until the
        # first reset publishes the offered set (see reset()).
        late = profile is not None and profile.late_features
        return pg.build_page(
            self.abi,
            m.DEVICE_ID,
            vendor=m.options["vendor"],
            features={cat.VERSION_1_BIT} if late else self.offered,
            device_config={**m.config(), **(profile.config if profile is not None else {})},
            num_queues=self.num_queues_cfg,
            num_max=self.num_max,
            config_size=profile.config_size if profile is not None else None,
        )

    def _build_page(self, built: bytearray) -> None:
        self.page[:] = built
        self.num_queues = self.get("num_queues")
        self.queues_offset = self.get("queues_offset")
        if self.num_queues < self.num_queues_cfg:
            log.warning("queue array does not fit the page: the device publishes no queues")
        if self.faults.get("queues-offset-outside"):
            self.queues_offset = cat.PAGE_SIZE - 8
            self.set("queues_offset", self.queues_offset)
        if self.faults.get("bad-magic"):
            self.set("magic", 0x56495254)

    def _arm_faults(self) -> None:
        """Start the countdowns of the faults that strike after a number of events (again at every reset)."""
        f = self.faults
        #: completions still published (stop-completing), interrupts still sent (drop-irqs),
        #: requests until DEVICE_NEEDS_RESET (needs-reset-at); None: no such fault
        self.completions_left: int | None = f.get("stop-completing")
        self.irqs_left: int | None = f.get("drop-irqs")
        self.reset_at: int | None = f.get("needs-reset-at")

    def monitor_ds(self) -> Dataspace:
        """The dataspace monitors map: a copy of the page nobody but the device can write.

        An fd opened read-only on the device's own memfd is no protection: it
        can be reopened read-write through /proc/self/fd/N (and chmod'ed by
        its owner).  So monitors get a memfd of their own, sealed with
        F_SEAL_FUTURE_WRITE after the device mapped it: no new writable
        mapping and no write() is possible through any fd, only the device's
        own mapping writes it.  The device refreshes it after every request
        and cmd (see :meth:`page_changed`).
        """
        if self._mirror is None:
            ds = Dataspace.create(f"l4vctl-{self.model.KIND}-config-ro", self.config_ds.size, final=False)
            try:
                m = ds.map()
                ds.seal(SEAL_FUTURE_WRITE)
            except BaseException:
                ds.close()
                raise
            self._mirror = ds
            self._mirror_page = memoryview(m)[self.ds_offset : self.ds_offset + cat.PAGE_SIZE]
            ds.rights = RIGHTS_RO
        self.page_changed()
        return self._mirror

    def page_changed(self) -> None:
        """Bring the monitors' copy of the page up to date (if a monitor ever asked for it)."""
        if self._mirror_page is not None:
            self._mirror_page[:] = self.page

    def _field(self, name: str):
        return self.hc.fields[name]

    def get(self, name: str) -> int:
        """The value of header field ``name`` in the page."""
        off, size, _fmt, _count = self.hc.fields[name]
        return self.w32[off >> 2] if size == 4 else self.w64[off >> 3]

    def set(self, name: str, value: int) -> None:
        """Store ``value`` in header field ``name`` (one store, truncated to the field's width)."""
        off, size, _fmt, _count = self.hc.fields[name]
        if size == 4:
            self.w32[off >> 2] = value & 0xFFFFFFFF
        else:
            self.w64[off >> 3] = value & 0xFFFFFFFFFFFFFFFF

    def get_words(self, name: str) -> list[int]:
        """The 32-bit words of header array ``name`` (a feature map)."""
        off, _size, _fmt, count = self.hc.fields[name]
        return list(self.w32[off >> 2 : (off >> 2) + count])

    def set_words(self, name: str, words: list[int]) -> None:
        """Store ``words`` in header array ``name``, zero-filling the rest."""
        off, _size, _fmt, count = self.hc.fields[name]
        for i in range(count):
            self.w32[(off >> 2) + i] = words[i] if i < len(words) else 0

    def queue_entry(self, index: int) -> dict:
        """The fields of queue ``index``'s config entry in the page, as the driver wrote them."""
        return self.qc.unpack(self.page, self.queues_offset + index * self.stride)

    def _queue_store(self, index: int, name: str, value: int) -> None:
        off, size, _fmt, _count = self.qc.fields[name]
        pos = self.queues_offset + index * self.stride + off
        if size == 2:
            self.w16[pos >> 1] = value
        else:
            self.w64[pos >> 3] = value

    def publish_notify_index(self, index: int, notify: int) -> None:
        """Publish ``device_notify_index`` of queue ``index`` (for devices with a kick IRQ per queue)."""
        if self._array_ok():
            self._queue_store(index, "device_notify_index", notify)

    def _store_status(self, value: int) -> None:
        self.status = value & 0xFF
        self.set("status", self.status)

    # -- reset and status (§5.1) --------------------------------------------------------

    def reset(self) -> None:
        """Driver-initiated reset: model hook, header restore, generation + 1."""
        self.model.reset()
        profile = self.model.profile
        keep = profile is not None and profile.keep_queue_entries  # e.g. L4Re's cons
        for q in self.queues:
            q.disable()
            if self._array_ok() and not keep:
                self._queue_store(q.index, "num_max", self.num_max)
                self._queue_store(q.index, "num", 0)
                self._queue_store(q.index, "ready", 0)
                self._queue_store(q.index, "device_notify_index", 0)
        self.set("magic", cat.L4VIRTIO_MAGIC if not self.faults.get("bad-magic") else 0x56495254)
        self.set("version", cat.L4VIRTIO_VERSION)
        self.set("device", self.model.DEVICE_ID)
        self.set("vendor", self.model.options["vendor"])
        self._store_status(0)
        self.negotiated = set()
        self.features_refused = 0
        self.last_error = ""
        self._arm_faults()
        self.set("irq_status", 0)
        self.set("num_queues", self.num_queues)
        self.set("queues_offset", self.queues_offset)
        self.set_words("dev_features_map", self.offered_words)
        self.set("generation", self.get("generation") + 1)
        log.info("reset: generation %d", self.get("generation"))

    def _array_ok(self) -> bool:
        return bool(self.num_queues) and self.queues_offset + self.num_queues * self.stride <= cat.PAGE_SIZE

    def set_status(self, value: int) -> None:
        """The status state machine of L4Re's generic device."""
        s = value & 0xFF
        cur = self.status
        if value == 0:
            self.reset()
            return
        if s == 0:
            self._store_status(0)
            return
        if (cur | s) & FAIL:
            if (cur & FAIL) != (s & FAIL):
                self._store_status(cur | (s & FAIL))
            log.info("status %#x in fail state: now %#x (only a reset leaves it)", value, self.status)
            return
        if (
            (s & cat.STATUS_DRIVER and not s & cat.STATUS_ACKNOWLEDGE)
            or (s & cat.STATUS_FEATURES_OK and not s & cat.STATUS_DRIVER)
            or (s & cat.STATUS_DRIVER_OK and not s & cat.STATUS_FEATURES_OK)
        ):
            log.warning("status %#x skips a step of the handshake: DEVICE_NEEDS_RESET", s)
            self.last_error = f"status {s:#x} skips a step of the handshake"
            self._store_status(cur | cat.STATUS_DEVICE_NEEDS_RESET)
            return
        if s & cat.STATUS_FEATURES_OK and not s & cat.STATUS_DRIVER_OK:
            ok, why = self._check_features()
            if not ok:
                log.warning("FEATURES_OK refused: %s", why)
                self.features_refused += 1
                s &= ~cat.STATUS_FEATURES_OK
            else:
                self.negotiated = set(cat.bits_of(self.get_words("driver_features_map")))
        if s == cat.STATUS_RUNNING:
            missing = [i for i in self.model.required_queues() if i >= len(self.queues) or not self.queues[i].enabled]
            if missing or self.faults.get("needs-reset-on-driver-ok"):
                why = f"queues {missing} not enabled" if missing else "injected fault"
                log.warning("DRIVER_OK refused (%s): DEVICE_NEEDS_RESET", why)
                self.last_error = f"DRIVER_OK refused: {why}"
                self._store_status(cur | cat.STATUS_DEVICE_NEEDS_RESET)
                return
            if self.faults.get("clear-features-ok"):
                s &= ~cat.STATUS_FEATURES_OK
                log.warning("DRIVER_OK with FEATURES_OK cleared (injected fault): status %#04x", s)
        self._store_status(s)
        log.info("status %#04x", s)

    def _check_features(self) -> tuple[bool, str]:
        if self.faults.get("refuse-features-ok"):
            return False, "injected fault"
        driver = self.get_words("driver_features_map")
        if not cat.has_bit(driver, cat.VERSION_1_BIT):
            return False, "the driver did not accept VERSION_1"
        for i, (d, o) in enumerate(zip(driver, self.offered_words)):
            if d & ~o:
                return False, f"the driver accepted bits {cat.bits_of([0] * i + [d & ~o])} that are not offered"
        if not self.model.check_features(set(cat.bits_of(driver))):
            return False, "the device-specific feature check failed"
        return True, ""

    def device_error(self, reason: str) -> None:
        """A fatal device-detected error: DEVICE_NEEDS_RESET and a config interrupt."""
        self.device_errors += 1
        self.last_error = reason
        log.warning("device error: %s: DEVICE_NEEDS_RESET", reason)
        was_running = self.status & cat.STATUS_DRIVER_OK
        self.model.reset()
        for q in self.queues:
            q.disable()
        self._store_status(self.status | cat.STATUS_DEVICE_NEEDS_RESET)
        self.page_changed()
        if was_running:
            self.notify(cat.IRQ_STATUS_CONFIG)

    def notify(self, bits: int) -> bool:
        """Interrupt the driver: set irq_status bits (current era), trigger its IRQ; False if none is bound."""
        if self.abi == CURRENT:
            self.set("irq_status", self.get("irq_status") | bits)
        if self.driver_irq is not None:
            self.driver_irq.trigger()
            self.irqs_sent += 1
            return True
        return False

    # -- queues (§5.3) ------------------------------------------------------------------

    def config_queue(self, index: int) -> int:
        """The CONFIG_QUEUE IPC: status gate, then queue setup."""
        if self.status & FAIL or (self.status & ACK_DRIVER) != ACK_DRIVER:
            log.warning("CONFIG_QUEUE %d in status %#x: -L4_EIO", index, self.status)
            return EIO
        return self.setup_queue(index)

    def setup_queue(self, index: int) -> int:
        """Enable or disable queue ``index`` from its config entry, checking every ring; an L4 result."""
        if index >= self.num_queues or not self._array_ok():
            log.warning("queue %d does not exist (%d queues): -L4_ERANGE", index, self.num_queues)
            return ERANGE
        q = self.queues[index]
        e = self.queue_entry(index)
        if e["ready"] == 0:
            q.disable()
            log.info("queue %d disabled", index)
            return EOK
        num = e["num"]
        desc, avail, used = e["desc_addr"], e["avail_addr"], e["used_addr"]
        why = None
        if num == 0 or num > self.num_max or num & (num - 1):
            why = f"num {num} is not a power of two in 1..{self.num_max}"
        elif desc % cat.DESC_ALIGN or avail % cat.AVAIL_ALIGN or used % cat.USED_ALIGN:
            why = f"misaligned rings desc={desc:#x} avail={avail:#x} used={used:#x}"
        r = ring_geometry()
        dv = self.translate(desc, r.desc_size(num))
        av = self.translate(avail, r.avail_size(num))
        uv = self.translate(used, r.used_size(num), write=True)
        if why is None:
            if dv is None:
                why = f"descriptor table {desc:#x}+{r.desc_size(num):#x} is not inside one registered region"
            elif av is None:
                why = f"available ring {avail:#x}+{r.avail_size(num):#x} is not inside one registered region"
            elif uv is None:
                why = f"used ring {used:#x}+{r.used_size(num):#x} is not inside one writable registered region"
        if why:
            q.disable()
            log.warning("queue %d rejected: %s (ready stays 1 in the page, as on L4Re)", index, why)
            return EINVAL
        q.enabled = True
        q.num = num
        q.desc_addr, q.avail_addr, q.used_addr = desc, avail, used
        assert dv is not None and av is not None and uv is not None  # else ``why`` was set above
        q.views = r.views_of(num, dv, av, uv)
        q.next_avail = 0
        q.ring = DeviceRing(self, q)
        q.signalled = q.views.used_idx[0]
        if self.faults.get("suppress-kicks"):
            q.ring.suppress_kicks(True)
        log.info("queue %d enabled: num %d desc %#x avail %#x used %#x", index, num, desc, avail, used)
        return EOK

    # -- memory (§3.4) -------------------------------------------------------------------

    def _region(self, addr: int, length: int) -> Region | None:
        """The first region that holds all of [addr, addr + length)."""
        last = self._last_region
        if last is not None and last.base <= addr and addr + length <= last.base + last.size:
            return last
        for region in self.regions:
            if region.base <= addr and addr + length <= region.base + region.size:
                self._last_region = region
                return region
        return None

    #: The region that holds all of [addr, addr + length) (the one found last, else the first), or None.
    region_of = _region

    def last_region(self) -> Region | None:
        """The region the last lookup found (the ring walker tries it first)."""
        return self._last_region

    def translate(self, addr: int, length: int, write: bool = False) -> memoryview | None:
        """The bytes at device address ``addr``, if one region holds them all
        (and, with ``write``, the region is writable)."""
        region = self._region(addr, length)
        if region is None or (write and not region.writable):
            return None
        start = addr - region.base
        return region.view[start : start + length]

    def translate_any(self, addr: int, length: int) -> tuple[memoryview | None, bool]:
        """The bytes at ``addr`` and whether the device may write them."""
        region = self._region(addr, length)
        if region is None:
            return None, False
        start = addr - region.base
        return region.view[start : start + length], region.writable

    def negotiated_bit(self, bit: int) -> bool:
        """Whether feature ``bit`` was accepted at FEATURES_OK."""
        return bit in self.negotiated

    def register_ds(self, ds_fd: int | None, rights: int, base: int, offset: int, size: int) -> int:
        """REGISTER_DS: map a driver dataspace at device address ``base``."""
        if ds_fd is None:
            log.warning("REGISTER_DS without a capability: -L4_EINVAL")
            return EINVAL
        why = dataspace_problem(ds_fd, PAGE)
        if why is not None:
            log.warning("REGISTER_DS refused: %s: -L4_EINVAL", why)
            return EINVAL
        ds_size = os.fstat(ds_fd).st_size
        if ds_size < PAGE:
            log.warning("REGISTER_DS: dataspace of %d bytes is smaller than a page: -L4_EINVAL", ds_size)
            return EINVAL
        offset_t = offset & ~(PAGE - 1)
        base_t = base & ~(PAGE - 1)
        if offset_t >= _round_up(ds_size, PAGE):
            log.warning("REGISTER_DS: offset %#x beyond the dataspace (%#x): -L4_ERANGE", offset, ds_size)
            return ERANGE
        length = _round_up(size + (offset - offset_t), PAGE)
        if size == 0 or length > _round_up(ds_size, PAGE) or offset + size > ds_size:
            log.warning("REGISTER_DS: offset %#x size %#x do not fit the dataspace (%#x): -L4_EINVAL",
                        offset, size, ds_size)  # fmt: skip
            return EINVAL
        if base + size > 1 << 64:
            log.warning("REGISTER_DS: base %#x + size %#x overflows 64 bits: -L4_EINVAL", base, size)
            return EINVAL
        if len(self.regions) >= self.max_regions:
            log.warning("REGISTER_DS: region table full (%d): -L4_ENOMEM", self.max_regions)
            return ENOMEM
        writable = bool(rights & RIGHT_W)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            mm = mmap.mmap(ds_fd, length, mmap.MAP_SHARED, prot, offset=offset_t)
        except (OSError, ValueError) as exc:
            if writable:  # e.g. a dataspace the driver can only read: map it read-only
                try:
                    mm = mmap.mmap(ds_fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset_t)
                    writable = False
                except (OSError, ValueError) as exc2:
                    log.warning("REGISTER_DS: cannot map the dataspace: %s: -L4_EINVAL", exc2)
                    return EINVAL
            else:
                log.warning("REGISTER_DS: cannot map the dataspace: %s: -L4_EINVAL", exc)
                return EINVAL
        self.regions.append(Region(base_t, length, writable, mm))
        log.info("region %#x-%#x registered (%s)", base_t, base_t + length, "rw" if writable else "ro")
        return EOK

    # -- IRQs and cmd (§5.4) -----------------------------------------------------------

    def irq_for_index(self, index: int) -> Irq | None:
        """The device IRQ behind a notify index (GET_DEVICE_IRQ); L4Re devices have only 0."""
        return self.kick_irq if index == 0 else None

    def bind(self, irq: Irq) -> None:
        """Make ``irq`` the driver's IRQ (closing the one bound before)."""
        if self.driver_irq is not None:
            self.driver_irq.close()
        self.driver_irq = irq

    def kicked(self) -> None:
        """The device IRQ fired: run a pending cmd, then look at every queue."""
        self.kicks += 1
        self._cmd_left = 0  # a kick asks for the cmd word again, even one left in place
        self.service()

    _kicks_served = 0

    def service(self) -> bool:
        """Run a pending cmd and serve every queue; True if there was work."""
        busy = False
        kicked = self.kicks != self._kicks_served
        self._kicks_served = self.kicks
        if self.cmd_mode:
            word = self.w32[self._cmd_index]
            if word and word != self._cmd_left:
                self.handle_cmd()
                busy = True
        if not self.status & cat.STATUS_DRIVER_OK or self.status & FAIL:
            return busy
        faults = self.faults
        if faults and (faults.get("ignore-kicks") or (faults.get("suppress-kicks") and not kicked)):
            return busy  # the device does not look at the available rings
        for q in self.queues:
            ring = q.ring
            if ring is None:
                continue
            try:
                before = q.next_avail
                if ring.available():
                    self.model.process(q, ring)
                if ring.pending or ring.unsignalled is not None:
                    ring.publish()  # one interrupt decision for the whole batch
                    busy = True
                elif q.next_avail != before:
                    busy = True
            except BadChain as exc:
                self.device_error(str(exc))
                return True
        return busy

    def poll_mode(self, on: bool) -> None:
        """While the server polls the rings, drivers need not kick."""
        self.polling = on
        if not self.status & cat.STATUS_DRIVER_OK:
            return
        for q in self.queues:
            if q.ring is not None:
                q.ring.suppress_kicks(on)

    def handle_cmd(self) -> None:
        """Run the command in the page's cmd word, then clear the word (unless a fault keeps it)."""
        value = self.get("cmd")
        command = value & cat.CMD_MASK
        if not command:
            return
        arg = value & cat.CMD_ARG_MASK
        if command == cat.CMD_SET_STATUS:
            self.set_status(arg)
        elif command == cat.CMD_CFG_QUEUE:
            result = self.setup_queue(arg)
            log.info("cmd CFG_QUEUE %d: %s", arg, cat.l4_error_name(result))
        elif command == cat.CMD_CFG_CHANGED and self.abi == CURRENT:
            self.model.config_changed(arg)
        elif command == cat.CMD_NOTIFY_QUEUE and self.abi == CURRENT:
            pass  # every kick already looks at all queues
        else:
            log.warning("cmd %#010x is not a command of the %s era: ignored", value, self.abi)
        if self.faults.get("never-clear-cmd"):
            # run once, not in a loop: the word stays, the server goes back to sleep until the next kick
            self._cmd_left = value
            log.warning("cmd %#010x left in place (injected fault)", value)
            self.page_changed()
            return
        self.set("cmd", 0)
        self.page_changed()

    # -- driver life cycle ---------------------------------------------------------------

    def driver_left(self) -> None:
        """The driver disconnected: forget its memory and IRQ, reset for the next one."""
        self.reset()
        for region in self.regions:
            region.close()
        self.regions.clear()
        self._last_region = None
        if self.driver_irq is not None:
            self.driver_irq.close()
            self.driver_irq = None
        self.kick_irq.drain()
        self._cmd_left = 0

    def stats(self) -> list[int]:
        """The MONITOR_OP_STATS words: the version 1 layout (device counters, then nine words per
        queue), then the version 2 extension (docs/wire-protocol.md)."""
        words = [1, 0, self.status, self.get("generation"), self.kicks, self.irqs_sent,
                 len(self.regions), self.device_errors, len(self.queues)]  # fmt: skip
        snaps = [q.snapshot() for q in self.queues]
        for q, snap in zip(self.queues, snaps):
            words += [int(q.enabled), q.num, q.next_avail, snap["avail_idx"], snap["avail_flags"],
                      snap["used_idx"], snap["used_flags"], q.completed, q.notified]  # fmt: skip
        # version 2: words a version 1 reader never looks at
        v2 = len(words)
        words += [cat.STATS_VERSION, int(self.driver_irq is not None), int(self.polling), self.features_refused]
        for q, snap in zip(self.queues, snaps):
            words += [snap["used_event"], snap["avail_event"], q.signalled]
        room = cat.MAX_WORDS - len(words) - 1
        if room < 0:
            return words[:v2]  # too many queues for the extension: the version 1 layout alone
        reason = self.last_error[: min(room, cat.STATS_REASON_MAX)]
        words.append(len(reason))
        words += [ord(c) for c in reason]  # one character (code point) per word
        return words

    def close(self) -> None:
        """Release the device: regions, IRQs, the model, the page and its dataspaces."""
        for q in self.queues:
            q.disable()
        for region in self.regions:
            region.close()
        self.regions.clear()
        if self.driver_irq is not None:
            self.driver_irq.close()
        self.kick_irq.close()
        self.model.close()
        for view in (self.w16, self.w32, self.w64, self.page, self._mirror_page):
            if view is not None:
                view.release()
        self._mirror_page = None
        if self._mirror is not None:
            self._mirror.close()
        self.config_ds.close()
