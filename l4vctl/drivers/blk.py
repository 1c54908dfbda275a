"""A virtio-blk driver over a Session: read, write, flush, get-id, discard, write-zeroes.

Each request slot owns a fixed piece of lent memory: the 16-byte header, the
status byte, an indirect table and a data buffer.  Requests are chains
``header (device reads), data..., status (device writes)``, either in the
ring's descriptor table or, with VIRTIO_F_INDIRECT_DESC, as one indirect
descriptor.  Many requests may be in flight; completions are reaped in
batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat
from l4vctl.drivers.base import Driver
from l4vctl.errors import DeviceStateError, UsageError
from l4vctl.formats.fast import codec
from l4vctl.virtqueue import need_event

if TYPE_CHECKING:
    from l4vctl.session import Session
    from l4vctl.virtqueue import Virtqueue

_HDR = codec("l4virtio_block_header_t").struct
_SEG = codec("virtio_blk_discard_write_zeroes").struct
SECTOR = cat.BLK_SECTOR_SIZE
_NO_TABLE = memoryview(b"")


class BlkIOError(DeviceStateError):
    """The device answered a request with IOERR or UNSUPP."""


@dataclass(slots=True, eq=False)
class Slot:
    """One request in flight and the memory it owns (compared by identity, like any buffer)."""

    index: int
    ctrl: memoryview  # header, status byte and indirect table
    ctrl_addr: int
    data: memoryview
    data_addr: int
    type: int = 0
    sector: int = 0
    nbytes: int = 0
    status: int | None = None
    used: int = 0
    t0: int = 0
    user: Callable[[Slot], Any] | None = None
    table: memoryview = _NO_TABLE  # the indirect table, in ``ctrl`` (set when the slot is made)
    #: the buffers of the last request made with this slot, and what they depend on: (length, device writes)
    bufs: list[tuple[int, int, bool]] | None = None
    shape: tuple[int, bool] = (-1, False)


class BlkDriver(Driver):
    """Drive queue ``queue`` of a block device whose handshake is done."""

    CLASS = "blk"

    def __init__(self, session: Session, *, depth: int = 32, max_io: int = 128 * 1024, segments: int = 1,
                 indirect: bool | None = None, queue: int = 0, timeout: float | None = None) -> None:  # fmt: skip
        super().__init__(session, timeout)
        cfg = session.device_config()
        has = self.has_feature
        self.capacity = cfg.get("capacity", 0)  # sectors
        self.read_only = has(cat.BLK_F_RO)
        #: the device's logical block size (VIRTIO_BLK_F_BLK_SIZE; advice: requests stay in 512-byte sectors)
        self.block_size = cfg.get("blk_size") or SECTOR if has(cat.BLK_F_BLK_SIZE) else SECTOR
        self.flush_supported = has(cat.BLK_F_FLUSH)
        self.discard_supported = has(cat.BLK_F_DISCARD)
        self.write_zeroes_supported = has(cat.BLK_F_WRITE_ZEROES)
        if segments < 1:
            raise UsageError("segments must be at least 1")
        if has(cat.BLK_F_SEG_MAX) and cfg.get("seg_max") and segments > cfg["seg_max"]:
            raise UsageError(f"{segments} segments exceed the device's seg_max {cfg['seg_max']}")
        if has(cat.BLK_F_SIZE_MAX) and cfg.get("size_max"):
            max_io = min(max_io, cfg["size_max"] * segments)
        max_io = max(SECTOR, max_io // SECTOR * SECTOR)
        self.max_io = max_io
        self.segments = segments
        self.vq: Virtqueue[Slot] = session.virtqueue(queue)
        vq = self.vq
        if indirect and not vq.indirect:
            raise UsageError("indirect descriptors were asked for but VIRTIO_F_INDIRECT_DESC is not negotiated")
        self.indirect = vq.indirect if indirect is None else indirect
        per_request = 1 if self.indirect else segments + 2
        self.depth = max(1, min(depth, vq.num // per_request))
        table = 16 * (segments + 2)
        self.ctrl_size = -(-(32 + table) // 64) * 64
        mem, addr = session.alloc(self.depth * (self.ctrl_size + max_io), "l4vctl-blk-buffers")
        data0 = self.depth * self.ctrl_size
        self.slots = [
            Slot(
                i,
                mem[i * self.ctrl_size : (i + 1) * self.ctrl_size],
                addr + i * self.ctrl_size,
                mem[data0 + i * max_io : data0 + (i + 1) * max_io],
                addr + data0 + i * max_io,
            )
            for i in range(self.depth)
        ]
        for slot in self.slots:
            slot.table = slot.ctrl[32:]
        self.free = list(reversed(self.slots))

    # -- the asynchronous interface ---------------------------------------------------------

    def submit(self, slot: Slot, rtype: int, sector: int, nbytes: int) -> None:
        """Queue a request using ``slot``'s memory (its data buffer holds OUT data)."""
        if nbytes > self.max_io:
            raise UsageError(f"a request of {nbytes} bytes exceeds {self.max_io}")
        slot.type, slot.sector, slot.nbytes, slot.status = rtype, sector, nbytes, None
        ctrl = slot.ctrl
        _HDR.pack_into(ctrl, 0, rtype, 0, sector)
        ctrl[16] = 0xFF  # the device overwrites this
        shape = (nbytes, rtype == cat.BLK_T_IN or rtype == cat.BLK_T_GET_ID)
        bufs = slot.bufs
        if bufs is None or slot.shape != shape:
            bufs = slot.bufs = self._buffers(slot, *shape)
            slot.shape = shape
        slot.t0 = time.perf_counter_ns()
        if self.indirect:
            self.vq.add_indirect(slot.table, slot.ctrl_addr + 32, bufs, slot)
        else:
            self.vq.add(bufs, slot)

    def _buffers(self, slot: Slot, nbytes: int, device_writes: bool) -> list[tuple[int, int, bool]]:
        """A request's chain: header (device reads), the data in up to ``segments`` buffers, status."""
        bufs = [(slot.ctrl_addr, 16, False)]
        if nbytes:
            n = min(self.segments, max(1, nbytes // SECTOR))
            step = -(-(nbytes // n) // SECTOR) * SECTOR if nbytes >= SECTOR * n else nbytes
            pos = 0
            while pos < nbytes:
                length = min(step, nbytes - pos) if len(bufs) < n else nbytes - pos
                bufs.append((slot.data_addr + pos, length, device_writes))
                pos += length
        bufs.append((slot.ctrl_addr + 16, 1, True))
        return bufs

    def kick(self) -> None:
        """Publish the requests submitted so far and notify the device if it wants."""
        self.vq.kick()

    def kick_if_polled(self) -> None:
        """Publish the requests submitted so far if the device polls the ring (it wants no
        notification: publishing costs a store).  A device that sleeps is left to the next
        :meth:`kick`, so that it wakes to a whole batch rather than to the first few requests
        (on a shared CPU, waking it early hands it the CPU before the batch is complete)."""
        vq = self.vq
        if vq.event_idx:
            wanted = need_event(vq.avail_event[0], vq.avail_idx, vq.kicked_idx)
        else:
            wanted = not vq.views.used_flags[0] & cat.VRING_USED_F_NO_NOTIFY
        if not wanted:
            vq.kick()

    def wait(self, timeout: float | None = None) -> list[Slot]:
        """Completed requests (at least one); each slot's ``status`` is set."""
        done = self.vq.wait(self.timeout if timeout is None else timeout)
        out = []
        for slot, used in done:
            slot.status = slot.ctrl[16]
            slot.used = used
            out.append(slot)
        return out

    def misaligned(self, sector: int, nbytes: int) -> bool:
        """True if a request is not aligned to the device's logical block size."""
        return bool((sector * SECTOR) % self.block_size or nbytes % self.block_size)

    def check(self, slot: Slot) -> None:
        """Raise BlkIOError unless the request succeeded."""
        if slot.status == cat.BLK_S_OK:
            return
        assert slot.status is not None, "check() of a request that has not completed"
        what = cat.BLK_REQUEST_TYPES.get(slot.type, str(slot.type))
        name = cat.BLK_STATUS.get(slot.status, f"status {slot.status:#x}")
        where = f" at sector {slot.sector} ({slot.nbytes} bytes)" if slot.type in (cat.BLK_T_IN, cat.BLK_T_OUT) else ""
        hint = None
        if slot.type == cat.BLK_T_OUT and self.read_only:
            hint = "a read-only device: VIRTIO_BLK_F_RO"
        elif slot.type in (cat.BLK_T_IN, cat.BLK_T_OUT) and slot.sector + slot.nbytes // SECTOR > self.capacity:
            hint = f"the device has {self.capacity} sectors"
        elif slot.type in (cat.BLK_T_IN, cat.BLK_T_OUT) and self.misaligned(slot.sector, slot.nbytes):
            hint = (f"the device's logical block size is {self.block_size} bytes (VIRTIO_BLK_F_BLK_SIZE): "
                    f"start and length must be multiples of {self.block_size // SECTOR} sectors")  # fmt: skip
        raise BlkIOError(f"{what}{where} failed: the device answered {name}", hint=hint)

    # -- synchronous operations ------------------------------------------------------------------

    def _run(self, jobs, progress=None) -> None:
        """Run (rtype, sector, nbytes, before, after) jobs with up to ``depth`` in flight."""
        jobs = iter(jobs)
        free = self.free
        in_flight = 0
        exhausted = False
        while True:
            while free and not exhausted:
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                rtype, sector, nbytes, before, after = job
                slot = free.pop()
                if before is not None:
                    before(slot)
                slot.user = after
                self.submit(slot, rtype, sector, nbytes)
                in_flight += 1
            self.kick()
            if not in_flight:
                return
            for slot in self.wait():
                in_flight -= 1
                free.append(slot)
                self.check(slot)
                if slot.user is not None:
                    slot.user(slot)
                if progress is not None:
                    progress(slot.nbytes)

    def _check_range(self, sector: int, nbytes: int) -> None:
        if sector < 0 or nbytes < 0:
            raise UsageError("sector and length must not be negative")
        if nbytes % SECTOR:
            raise UsageError(f"{nbytes} bytes is not a whole number of 512-byte sectors")

    def read(self, sector: int, nbytes: int, out=None, progress=None) -> bytearray:
        """Read ``nbytes`` from ``sector`` on (into ``out`` if given)."""
        self._check_range(sector, nbytes)
        buf = bytearray(nbytes) if out is None else out
        view = memoryview(buf)
        chunk = self.max_io

        def jobs():
            for pos in range(0, nbytes, chunk):
                n = min(chunk, nbytes - pos)

                def copy(slot, pos=pos, n=n):
                    view[pos : pos + n] = slot.data[:n]

                yield cat.BLK_T_IN, sector + pos // SECTOR, n, None, copy

        self._run(jobs(), progress)
        return buf

    def write(self, sector: int, data, progress=None) -> None:
        """Write ``data`` (a whole number of sectors) from ``sector`` on."""
        view = memoryview(data).cast("B")
        self._check_range(sector, len(view))
        chunk = self.max_io

        def jobs():
            for pos in range(0, len(view), chunk):
                n = min(chunk, len(view) - pos)

                def fill(slot, pos=pos, n=n):
                    slot.data[:n] = view[pos : pos + n]

                yield cat.BLK_T_OUT, sector + pos // SECTOR, n, fill, None

        self._run(jobs(), progress)

    def flush(self) -> None:
        """Flush the device's write cache (VIRTIO_BLK_T_FLUSH); BlkIOError if it refuses."""
        self._run([(cat.BLK_T_FLUSH, 0, 0, None, None)])

    def get_id(self) -> str:
        """The device's id string (VIRTIO_BLK_T_GET_ID), up to its first NUL byte."""
        result = {}

        def grab(slot):
            result["id"] = bytes(slot.data[: cat.BLK_ID_BYTES])

        self._run([(cat.BLK_T_GET_ID, 0, cat.BLK_ID_BYTES, None, grab)])
        return result["id"].split(b"\0", 1)[0].decode("utf-8", "replace")

    def _ranges(self, rtype: int, sector: int, count: int) -> None:
        def fill(slot):
            _SEG.pack_into(slot.data, 0, sector, count, 0)

        # the 16-byte segment travels as device-readable data
        self._run([(rtype, 0, _SEG.size, fill, None)])

    def discard(self, sector: int, count: int) -> None:
        """Discard ``count`` sectors from ``sector`` on (one VIRTIO_BLK_T_DISCARD segment)."""
        self._ranges(cat.BLK_T_DISCARD, sector, count)

    def write_zeroes(self, sector: int, count: int) -> None:
        """Zero ``count`` sectors from ``sector`` on (one VIRTIO_BLK_T_WRITE_ZEROES segment)."""
        self._ranges(cat.BLK_T_WRITE_ZEROES, sector, count)
