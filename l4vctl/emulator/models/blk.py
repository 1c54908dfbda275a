"""virtio-blk model: requests served from an image file.

Data moves straight between the file and the driver's shared buffers
(``os.preadv``/``os.pwritev`` on memoryviews of the mapped regions), never
through temporary bytes.  An OUT request is completed only after its data
is in the file; FLUSH is ``fdatasync``.  Request parsing follows L4Re's block
server: the first buffer holds the 16-byte header (data may follow in the
same buffer), the status byte is the last byte of the last buffer; a request
that breaks that structure puts the device into DEVICE_NEEDS_RESET, while
a well-formed request the device cannot serve gets IOERR or UNSUPP.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import TYPE_CHECKING, ClassVar, Literal

from l4vctl import catalog as cat
from l4vctl.emulator import log
from l4vctl.emulator.models import Option, Profile
from l4vctl.emulator.models.base import Model
from l4vctl.emulator.ring import BadChain
from l4vctl.formats.fast import codec
from l4vctl.parsing import parse_bool, parse_int, parse_size

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

_HDR = codec("l4virtio_block_header_t").struct
_SEG = codec("virtio_blk_discard_write_zeroes").struct
SECTOR = cat.BLK_SECTOR_SIZE
_ZEROS = bytes(1 << 20)
#: Segments one DISCARD or WRITE_ZEROES request may carry (max_discard_seg, max_write_zeroes_seg).
MAX_ZERO_SEGS = 1
_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE, _FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10
_PUNCH = _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE
#: Completions published at a time while a batch of requests is served.
PUBLISH_EVERY = 8

#: What L4Re's block servers offer besides the bits their options imply.
_L4RE_BLK = frozenset({cat.INDIRECT_DESC_BIT, cat.BLK_F_FLUSH, cat.BLK_F_CONFIG_WCE})


class BlkModel(Model):
    """A block device on an image file or in memory: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES."""

    KIND = "blk"
    DEVICE_ID = cat.DEVICE_ID_BLK
    DEFAULT_QUEUES = 1
    DEFAULT_NUM_MAX = 256
    FEATURES = frozenset({cat.INDIRECT_DESC_BIT, cat.BLK_F_FLUSH, cat.BLK_F_DISCARD, cat.BLK_F_WRITE_ZEROES})
    PROFILES: ClassVar[dict[str, Profile]] = {
        # ahci-drv: SIZE_MAX 4 MiB, SEG_MAX 24, FLUSH, CONFIG_WCE, INDIRECT_DESC, published at the first reset
        "l4re-ahci": Profile(
            "l4re-ahci",
            options={"num_max": "256", "size_max": "0x400000", "seg_max": "24", "blk_size": "0"},
            features=_L4RE_BLK,
            late_features=True,
        ),
        # nvme-drv on QEMU's NVMe device: as ahci-drv plus WRITE_ZEROES (NVMe's 65536 blocks, one segment),
        # and the segment limits it derives from the controller
        "l4re-nvme": Profile(
            "l4re-nvme",
            options={"num_max": "256", "size_max": "0x4000", "seg_max": "32", "blk_size": "0"},
            features=_L4RE_BLK | {cat.BLK_F_WRITE_ZEROES},
            config={"max_write_zeroes_sectors": 0x10000},
            late_features=True,
        ),
    }
    OPTIONS = (
        Option("image", str, None, "image file (created with --size if missing; default: in memory)"),
        Option("size", parse_size, None, "capacity in bytes, e.g. 64M (default: the image's size, else 64M)"),
        Option("ro", parse_bool, False, "read-only device (VIRTIO_BLK_F_RO)"),
        Option("seg_max", parse_int, 126, "most data segments per request (0: not offered)"),
        Option("size_max", parse_int, 1 << 20, "largest segment in bytes (0: not offered)"),
        Option("blk_size", parse_int, 512, "logical block size in bytes (0: VIRTIO_BLK_F_BLK_SIZE not offered)"),
        Option("serial", str, None, "device id for GET_ID (20 bytes at most; default from the image name)"),
        Option("io_threads", parse_int, 1, "threads that move the data of a batch of requests (1: none)"),
    )

    def __init__(self, options: dict):
        super().__init__(options)
        self.fd = -1
        self.capacity_bytes = 0
        self._open_image()
        self.id_bytes = self._serial().encode()[: cat.BLK_ID_BYTES]
        self._warned_flags = False
        self.workers = max(1, min(4, options["io_threads"]))
        self._executor: ThreadPoolExecutor | None = None
        self._falloc_unsupported: set[int] = set()

    def _open_image(self) -> None:
        o = self.options
        path = o["image"]
        size = o["size"]
        if size is not None and (size <= 0 or size % SECTOR):
            raise ValueError(f"size {size} is not a positive multiple of {SECTOR} bytes")
        if path is None:
            self.fd = os.memfd_create("l4vctl-blk-image", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self.fd, size or 64 << 20)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        else:
            flags = os.O_RDONLY if o["ro"] else os.O_RDWR
            exists = os.path.exists(path)
            if not exists:
                if size is None:
                    raise ValueError(f"image {path} does not exist; give --size to create it")
                flags |= os.O_CREAT | os.O_EXCL
            try:
                self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ValueError(f"cannot open image {path}: {exc.strerror}") from None
            real = os.fstat(self.fd).st_size
            if not exists:
                os.ftruncate(self.fd, size)
            elif size is not None and size != real:
                os.close(self.fd)
                self.fd = -1
                raise ValueError(f"image {path} has {real} bytes, not the {size} given with --size")
            if real % SECTOR and exists:
                log.warning(
                    "image size %d is not a multiple of 512: the last %d bytes are not used", real, real % SECTOR
                )
        self.capacity_bytes = os.fstat(self.fd).st_size // SECTOR * SECTOR

    def _serial(self) -> str:
        if self.options["serial"]:
            return self.options["serial"]
        path = self.options["image"]
        return ("l4vctl-" + os.path.basename(path)) if path else "l4vctl-memory"

    # -- identity -----------------------------------------------------------------------

    def features(self) -> set[int]:
        """The base bits (INDIRECT_DESC, FLUSH, DISCARD, WRITE_ZEROES, or the profile's) and those the
        options ask for (SEG_MAX, SIZE_MAX, BLK_SIZE, RO); RO drops DISCARD and WRITE_ZEROES."""
        o = self.options
        bits = self.base_features()
        for bit, option in ((cat.BLK_F_SEG_MAX, "seg_max"), (cat.BLK_F_SIZE_MAX, "size_max"),
                            (cat.BLK_F_BLK_SIZE, "blk_size"), (cat.BLK_F_RO, "ro")):  # fmt: skip
            if o[option]:
                bits.add(bit)
        if o["ro"]:
            bits -= {cat.BLK_F_DISCARD, cat.BLK_F_WRITE_ZEROES}
        return bits

    def config(self) -> dict:
        """Capacity in sectors, the segment limits, and the block size and the DISCARD / WRITE_ZEROES
        limits where their feature is offered (0 otherwise, as the specification leaves them undefined)."""
        o = self.options
        sectors = self.capacity_bytes // SECTOR
        offered = self.features()
        out = {"capacity": sectors, "size_max": o["size_max"], "seg_max": o["seg_max"], "blk_size": o["blk_size"]}
        if cat.BLK_F_DISCARD in offered:
            out.update(max_discard_sectors=min(sectors, 0xFFFFFFFF), max_discard_seg=MAX_ZERO_SEGS,
                       discard_sector_alignment=1)  # fmt: skip
        if cat.BLK_F_WRITE_ZEROES in offered:
            out.update(max_write_zeroes_sectors=min(sectors, 0xFFFFFFFF), max_write_zeroes_seg=MAX_ZERO_SEGS,
                       write_zeroes_may_unmap=0)  # fmt: skip
        return out

    def describe(self) -> str:
        """Capacity, image and whether the device is read-only."""
        where = self.options["image"] or "memory"
        return f"blk {self.capacity_bytes >> 20} MiB ({where}){' read-only' if self.options['ro'] else ''}"

    def close(self) -> None:
        """Wait for the I/O threads, then close the image."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- requests -------------------------------------------------------------------------

    def process(self, queue, ring) -> None:
        """Serve every available request.  Completions are published in small
        batches, so the driver can work on the first ones while the device
        serves the rest."""
        parallel = self.workers > 1 and ring.available() > 1
        if parallel:
            self._process_parallel(queue, ring)
            return
        for _ in range(ring.available()):
            head = ring.pop()
            status_view, status, written, job = self.request(ring.chain(head), queue.index)
            if job is not None:
                error = _transfer(job)
                if error is not None:
                    status, written = self._failed(queue.index, job, error)
            status_view[0] = status
            ring.complete(head, written + 1)
            if len(ring.pending) >= PUBLISH_EVERY:
                ring.publish()

    def _process_parallel(self, queue, ring) -> None:
        done = []
        jobs = []
        for _ in range(ring.available()):
            head = ring.pop()
            status_view, status, written, job = self.request(ring.chain(head), queue.index)
            done.append((head, status_view, status, written, job))
            if job is not None:
                jobs.append(job)
        outcome = iter(self._pool().map(_transfer, jobs))
        for head, status_view, status, written, job in done:
            if job is not None:
                error = next(outcome)
                if error is not None:
                    status, written = self._failed(queue.index, job, error)
            status_view[0] = status
            ring.complete(head, written + 1)

    @staticmethod
    def _failed(qi: int, job, error: str) -> tuple[int, int]:
        log.warning("queue %d: %s at offset %d failed: %s: IOERR", qi, "read" if job[0] else "write", job[2], error)
        return cat.BLK_S_IOERR, 0

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="l4vctl-blk-io")
        return self._executor

    def request(self, segs, qi: int):
        """Parse one request: (status byte view, status, bytes written, transfer job or None)."""
        first = segs[0]
        if len(first) < 16:
            raise BadChain(f"queue {qi}: block request header is {len(first)} bytes, not 16")
        rtype, _prio, sector = _HDR.unpack_from(first.view, 0)
        last = segs[-1]
        if len(last) == 0 or not last.writable:
            raise BadChain(f"queue {qi}: the status byte (last byte of the chain) is not writable device memory")
        if len(segs) == 1 and len(first) == 16:
            raise BadChain(f"queue {qi}: the header buffer has no room for the status byte")
        parts = [(first.view[16:], first)] if len(first) > 16 else []
        parts += [(s.view, s) for s in segs[1:]]
        view, seg = parts[-1]
        status_view = view[-1:]
        parts[-1] = (view[:-1], seg)
        parts = [(v, s) for v, s in parts if len(v)]
        status, written, job = self._serve(rtype, sector, parts, qi)
        return status_view, status, written, job

    def _serve(self, rtype: int, sector: int, parts, qi: int):
        """Status, data bytes written and the data transfer (or None) of a request."""
        data = [v for v, _s in parts]
        o = self.options
        if rtype in (cat.BLK_T_IN, cat.BLK_T_OUT):
            total = sum(len(d) for d in data)
            if total % SECTOR:
                log.warning("queue %d: %s of %d bytes is not a multiple of 512: IOERR", qi,
                            cat.BLK_REQUEST_TYPES[rtype], total)  # fmt: skip
                return cat.BLK_S_IOERR, 0, None
            if o["seg_max"] and len(data) > o["seg_max"]:
                log.warning("queue %d: %d data segments exceed seg_max %d: IOERR", qi, len(data), o["seg_max"])
                return cat.BLK_S_IOERR, 0, None
            if o["size_max"] and any(len(d) > o["size_max"] for d in data):
                log.warning("queue %d: a segment exceeds size_max %d: IOERR", qi, o["size_max"])
                return cat.BLK_S_IOERR, 0, None
            offset = sector * SECTOR
            if sector > self.capacity_bytes // SECTOR or offset + total > self.capacity_bytes:
                log.warning("queue %d: %s sector %d + %d bytes beyond capacity %d sectors: IOERR", qi,
                            cat.BLK_REQUEST_TYPES[rtype], sector, total, self.capacity_bytes // SECTOR)  # fmt: skip
                return cat.BLK_S_IOERR, 0, None
            if rtype == cat.BLK_T_IN:
                self._check_writable(parts, qi)
                return cat.BLK_S_OK, total, (True, self.fd, offset, data, total)
            if o["ro"]:
                log.warning("queue %d: OUT on a read-only device: IOERR", qi)
                return cat.BLK_S_IOERR, 0, None
            return cat.BLK_S_OK, 0, (False, self.fd, offset, data, total)
        if rtype == cat.BLK_T_FLUSH:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                log.warning("queue %d: FLUSH failed: %s: IOERR", qi, exc.strerror)
                return cat.BLK_S_IOERR, 0, None
            return cat.BLK_S_OK, 0, None
        if rtype == cat.BLK_T_GET_ID:
            if not data:
                return cat.BLK_S_IOERR, 0, None
            self._check_writable(parts, qi)
            view = data[0]
            n = min(len(view), cat.BLK_ID_BYTES)
            view[:n] = self.id_bytes.ljust(cat.BLK_ID_BYTES, b"\0")[:n]
            return cat.BLK_S_OK, n, None
        if rtype in (cat.BLK_T_DISCARD, cat.BLK_T_WRITE_ZEROES):
            if o["ro"]:
                return cat.BLK_S_IOERR, 0, None
            bit = cat.BLK_F_DISCARD if rtype == cat.BLK_T_DISCARD else cat.BLK_F_WRITE_ZEROES
            if self.device is not None and bit not in self.device.offered:  # e.g. a profile without it
                log.info("queue %d: %s is not offered: UNSUPP", qi, cat.BLK_REQUEST_TYPES[rtype])
                return cat.BLK_S_UNSUPP, 0, None
            # The payload length is checked before a byte of it is read: descriptors
            # may name hundreds of MiB, the request holds MAX_ZERO_SEGS segments at most.
            total = sum(len(d) for d in data)
            name = cat.BLK_REQUEST_TYPES[rtype]
            if not total or total % _SEG.size:
                log.warning("queue %d: %s payload of %d bytes is not whole 16-byte segments: IOERR", qi, name, total)
                return cat.BLK_S_IOERR, 0, None
            if total > MAX_ZERO_SEGS * _SEG.size:
                log.warning("queue %d: %s with %d segments, more than the %d the device allows: IOERR", qi, name,
                            total // _SEG.size, MAX_ZERO_SEGS)  # fmt: skip
                return cat.BLK_S_IOERR, 0, None
            raw = bytearray(total)
            pos = 0
            for d in data:
                raw[pos : pos + len(d)] = d
                pos += len(d)
            ranges = [_SEG.unpack_from(raw, i) for i in range(0, total, _SEG.size)]
            for start, count, _flags in ranges:
                if (start + count) * SECTOR > self.capacity_bytes:
                    log.warning("queue %d: %s of sectors %d+%d beyond capacity %d sectors: IOERR", qi, name, start,
                                count, self.capacity_bytes // SECTOR)  # fmt: skip
                    return cat.BLK_S_IOERR, 0, None
            try:
                for start, count, _flags in ranges:
                    self._zero(start * SECTOR, count * SECTOR, rtype == cat.BLK_T_DISCARD)
            except OSError as exc:
                log.warning("queue %d: %s failed: %s: IOERR", qi, cat.BLK_REQUEST_TYPES[rtype], exc.strerror)
                return cat.BLK_S_IOERR, 0, None
            return cat.BLK_S_OK, 0, None
        log.info("queue %d: request type %d is not supported: UNSUPP", qi, rtype)
        return cat.BLK_S_UNSUPP, 0, None

    def _check_writable(self, parts, qi: int) -> None:
        for _view, s in parts:
            if not s.writable:
                raise BadChain(f"queue {qi}: the device must write into a buffer in read-only memory")
            if not s.write_flag and not self._warned_flags:
                # The native L4Re block client sets WRITE the other way round on data
                # descriptors; L4Re servers do not look, so the emulator only says so.
                log.info("queue %d: device writes a buffer without the WRITE flag (tolerated, as L4Re does)", qi)
                self._warned_flags = True

    def _zero(self, offset: int, length: int, discard: bool) -> None:
        """Zero a byte range of the image: the file system does it (punching a
        hole, or ZERO_RANGE), in time that does not grow with the length;
        writing zeros is the fallback where neither exists."""
        if not length:
            return
        for mode in (_PUNCH, _FALLOC_ZERO_RANGE) if discard else (_FALLOC_ZERO_RANGE, _PUNCH):
            if mode in self._falloc_unsupported:
                continue
            if _fallocate(self.fd, mode, offset, length):
                return
            self._falloc_unsupported.add(mode)
        while length:
            n = min(length, len(_ZEROS))
            os.pwrite(self.fd, _ZEROS[:n], offset)
            offset += n
            length -= n


_libc: ctypes.CDLL | Literal[False] | None = None  # None: not loaded yet; False: no fallocate


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with a mode; False where the file system does not support it."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _zero_tail(views, done: int) -> None:
    for v in views:
        if done >= len(v):
            done -= len(v)
            continue
        v[done:] = bytes(len(v) - done)
        done = 0


def _transfer(job) -> str | None:
    """Move a request's data between the image and the shared buffers; None or the error."""
    is_read, fd, offset, data, total = job
    try:
        if is_read:
            done = os.preadv(fd, data, offset) if data else 0
            if done < total:  # a short image: the rest reads as zeros
                _zero_tail(data, done)
        else:
            done = 0
            while done < total:  # pwritev may be short: finish before completing
                done += os.pwritev(fd, _skip(data, done), offset + done)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _skip(views, n: int) -> list:
    """The views with their first ``n`` bytes dropped."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out
