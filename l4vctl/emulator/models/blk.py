"""virtio-blk model: requests served from an image file.

Data moves straight between the file and the driver's shared buffers
(``os.preadv``/``os.pwritev`` on memoryviews of the mapped regions), never
through temporary bytes; adjacent requests of a batch that continue each
other move with one call.  An OUT request is completed only after its data
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
from typing import ClassVar, Literal

from l4vctl import catalog as cat
from l4vctl.emulator import log
from l4vctl.emulator.models import Option, Profile
from l4vctl.emulator.models.base import Model
from l4vctl.emulator.ring import MAY_WRITE, WRITE, BadChain
from l4vctl.formats.fast import codec
from l4vctl.parsing import parse_bool, parse_int, parse_size

_HDR = codec("l4virtio_block_header_t").struct
_HDR_UNPACK = _HDR.unpack_from
#: What the ring walker says of a buffer the device writes as it should: WRITE flag, writable memory.
_DEVICE_WRITES = WRITE | MAY_WRITE
_IN, _OUT = cat.BLK_T_IN, cat.BLK_T_OUT
_SEG = codec("virtio_blk_discard_write_zeroes").struct
SECTOR = cat.BLK_SECTOR_SIZE
_ZEROS = bytes(1 << 20)
#: Segments one DISCARD or WRITE_ZEROES request may carry (max_discard_seg, max_write_zeroes_seg).
MAX_ZERO_SEGS = 1
_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE, _FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10
_PUNCH = _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE
#: Completions published at a time while a batch of requests is served.
PUBLISH_EVERY = 8
#: Buffers one preadv/pwritev takes at most (IOV_MAX).
IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
#: Bytes adjacent requests move in one transfer at most.
GROUP_BYTES = 1 << 20

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
        self._threads: _Threads | None = None
        self._seg_max = options["seg_max"]
        self._size_max = options["size_max"]
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
        if self._threads is not None:
            self._threads.settle()
            self._threads.shutdown()
            self._threads = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- requests -------------------------------------------------------------------------

    def process(self, queue, ring) -> None:
        """Serve every available request, in the order the driver offered them.

        Adjacent requests that continue each other (IN after IN, or OUT after
        OUT, each starting where the one before ended) move their data with
        one ``preadv``/``pwritev``; a request is completed only after its
        data moved (an OUT's data is in the file).  Completions are made
        visible in small batches, so a driver that polls can work on the
        first ones while the device serves the rest; whether to interrupt the
        driver is decided once, for the whole batch (see ``DeviceRing.publish``).
        """
        count = ring.available()
        qi = queue.index
        pending = ring.pending
        pop = ring.pop
        walk = ring.walk
        parse = self._parse
        threads = self._pool() if self.workers > 1 and count > 1 else None
        run = self._run_group if threads is None else threads.run
        group: list = []  # the requests whose data moves at once: (head, status view, written, job)
        iov: list = []
        reading = False
        start = end = 0
        fast = self._fast_limits()
        try:
            for _ in range(count):
                head = pop()
                views, kinds = walk(head)
                # The usual request (a 16-byte header, one data buffer, a status byte; IN into memory
                # the device may write with the WRITE flag, or OUT; within every limit) is taken as it
                # is; anything else goes through the parser, which checks and explains it all.
                job: tuple | None = None
                if len(views) == 3:
                    hdr, piece, status_view = views
                    if len(hdr) == 16 and len(status_view) == 1 and kinds[2] & MAY_WRITE:
                        rtype, _prio, sector = _HDR_UNPACK(hdr, 0)
                        total = len(piece)
                        offset = sector * SECTOR
                        if (
                            0 < total <= fast[0]
                            and not total % SECTOR
                            and offset + total <= fast[1]
                            and ((rtype == _IN and kinds[1] == _DEVICE_WRITES) or (rtype == _OUT and fast[2]))
                        ):
                            is_read = rtype == _IN
                            data = [piece]
                            written = total if is_read else 0
                            job = (is_read, offset, data, total)
                if job is None:
                    status_view, status, written, job = parse(views, kinds, qi)
                if job is not None and job[0] is not None:
                    is_read, offset, data, total = job
                    if group and (
                        is_read is not reading
                        or offset != end
                        or len(iov) + len(data) > IOV_MAX
                        or end + total - start > GROUP_BYTES
                    ):
                        run(reading, start, iov, end - start, group, pending, qi)
                        group, iov = [], []
                    if not group:
                        reading = is_read
                        start = offset
                    group.append((head, status_view, written, job))
                    iov += data
                    end = offset + total
                else:
                    # anything else is served after the transfers before it, in order
                    if group:
                        run(reading, start, iov, end - start, group, pending, qi)
                        group, iov = [], []
                    if threads is not None:
                        threads.settle()
                    if job is not None:
                        _none, rtype, sector, data = job
                        status, written = self._serve_other(rtype, sector, data, qi)
                    status_view[0] = status
                    pending.append((head, written + 1))
                if len(pending) >= PUBLISH_EVERY:
                    ring.publish(notify=False)
        finally:  # also when a bad chain ends the batch: the requests taken before it are served
            if group:
                run(reading, start, iov, end - start, group, pending, qi)
            if threads is not None:
                threads.settle()

    def _fast_limits(self) -> tuple[int, int, bool]:
        """What a request taken without the parser must keep to: the largest data buffer (size_max,
        and only if seg_max allows one), the capacity in bytes, and whether OUT is allowed."""
        seg_max = self._seg_max
        largest = (self._size_max or 1 << 64) if not seg_max or seg_max >= 1 else 0
        return largest, self.capacity_bytes, not self.options["ro"]

    def _run_group(self, is_read: bool, offset: int, iov: list, total: int, group: list, pending: list,
                   qi: int) -> None:  # fmt: skip
        """Move the data of a group of adjacent requests at once, then set their status bytes and
        queue their completions."""
        if is_read and len(group) == 1:  # the most common case, with no call it does not need
            try:
                done = os.preadv(self.fd, iov, offset)
            except OSError:
                done = -1
            if done == total:
                head, status_view, written, _job = group[0]
                status_view[0] = cat.BLK_S_OK
                pending.append((head, written + 1))
                return
        self._finish(_transfer(is_read, self.fd, offset, iov, total), group, pending, qi)

    def _finish(self, error: str | None, group: list, pending: list, qi: int) -> None:
        """Status bytes and completions of a group whose transfer ended with ``error`` (None: done).
        After a failed transfer each request of the group is tried on its own, so only those whose
        own data cannot be moved fail."""
        if error is None:
            for head, status_view, written, _job in group:
                status_view[0] = cat.BLK_S_OK
                pending.append((head, written + 1))
            return
        fd = self.fd
        for head, status_view, written, job in group:
            alone = error if len(group) == 1 else _transfer(job[0], fd, job[1], job[2], job[3])
            status = cat.BLK_S_OK
            if alone is not None:
                log.warning("queue %d: %s at offset %d failed: %s: IOERR", qi, "read" if job[0] else "write", job[1],
                            alone)  # fmt: skip
                status, written = cat.BLK_S_IOERR, 0
            status_view[0] = status
            pending.append((head, written + 1))

    def _pool(self) -> _Threads:
        if self._threads is None:
            self._threads = _Threads(self, self.workers)
        return self._threads

    def _parse(self, views: list, kinds: list, qi: int):
        """One request from its chain (see ``DeviceRing.walk``): (status byte view, status, data bytes
        written, job).  The job is None when the status is final already, ``(is_read, offset, data
        views, total)`` for IN and OUT, and ``(None, type, sector, data views)`` for any other type
        (see :meth:`_serve_other`)."""
        n = len(views)
        first = views[0]
        size = len(first)
        if size < 16:
            raise BadChain(f"queue {qi}: block request header is {size} bytes, not 16")
        rtype, _prio, sector = _HDR_UNPACK(first, 0)
        last = views[-1]
        if not len(last) or not kinds[-1] & MAY_WRITE:
            raise BadChain(f"queue {qi}: the status byte (last byte of the chain) is not writable device memory")
        # the data: what follows the header in the first buffer, the buffers between, the last
        # buffer but its final byte (the status); empty pieces are left out.  ``used``: what the
        # ring walker says of the buffer each piece lies in.
        if n == 3 and size == 16 and len(last) == 1:  # header, one data buffer, status: the usual shape
            piece = views[1]
            data = [piece] if len(piece) else []
            used = [kinds[1]] if data else []
        else:
            if n == 1:
                if size == 16:
                    raise BadChain(f"queue {qi}: the header buffer has no room for the status byte")
                pieces = [first[16:-1]]
            else:
                pieces = [first[16:], *views[1:-1], last[:-1]]
            data = []
            used = []
            for piece, kind in zip(pieces, kinds):
                if len(piece):
                    data.append(piece)
                    used.append(kind)
        status_view = last[-1:]
        if rtype == cat.BLK_T_IN or rtype == cat.BLK_T_OUT:
            total = len(data[0]) if len(data) == 1 else sum(map(len, data))
            if total % SECTOR:
                log.warning("queue %d: %s of %d bytes is not a multiple of 512: IOERR", qi,
                            cat.BLK_REQUEST_TYPES[rtype], total)  # fmt: skip
                return status_view, cat.BLK_S_IOERR, 0, None
            if self._seg_max and len(data) > self._seg_max:
                log.warning("queue %d: %d data segments exceed seg_max %d: IOERR", qi, len(data), self._seg_max)
                return status_view, cat.BLK_S_IOERR, 0, None
            size_max = self._size_max
            if size_max and total > size_max and any(len(d) > size_max for d in data):
                log.warning("queue %d: a segment exceeds size_max %d: IOERR", qi, size_max)
                return status_view, cat.BLK_S_IOERR, 0, None
            offset = sector * SECTOR
            if offset + total > self.capacity_bytes:
                log.warning("queue %d: %s sector %d + %d bytes beyond capacity %d sectors: IOERR", qi,
                            cat.BLK_REQUEST_TYPES[rtype], sector, total, self.capacity_bytes // SECTOR)  # fmt: skip
                return status_view, cat.BLK_S_IOERR, 0, None
            if rtype == cat.BLK_T_IN:
                if used.count(_DEVICE_WRITES) != len(used):
                    self._check_writable(used, qi)
                return status_view, cat.BLK_S_OK, total, (True, offset, data, total)
            if self.options["ro"]:
                log.warning("queue %d: OUT on a read-only device: IOERR", qi)
                return status_view, cat.BLK_S_IOERR, 0, None
            return status_view, cat.BLK_S_OK, 0, (False, offset, data, total)
        if rtype == cat.BLK_T_GET_ID:
            self._check_writable(used, qi)
        return status_view, cat.BLK_S_OK, 0, (None, rtype, sector, data)

    def _serve_other(self, rtype: int, sector: int, data: list, qi: int) -> tuple[int, int]:
        """Status and data bytes written of a request that is neither IN nor OUT (served in its turn)."""
        o = self.options
        if rtype == cat.BLK_T_FLUSH:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                log.warning("queue %d: FLUSH failed: %s: IOERR", qi, exc.strerror)
                return cat.BLK_S_IOERR, 0
            return cat.BLK_S_OK, 0
        if rtype == cat.BLK_T_GET_ID:
            if not data:
                return cat.BLK_S_IOERR, 0
            view = data[0]
            n = min(len(view), cat.BLK_ID_BYTES)
            view[:n] = self.id_bytes.ljust(cat.BLK_ID_BYTES, b"\0")[:n]
            return cat.BLK_S_OK, n
        if rtype in (cat.BLK_T_DISCARD, cat.BLK_T_WRITE_ZEROES):
            if o["ro"]:
                return cat.BLK_S_IOERR, 0
            bit = cat.BLK_F_DISCARD if rtype == cat.BLK_T_DISCARD else cat.BLK_F_WRITE_ZEROES
            if self.device is not None and bit not in self.device.offered:  # e.g. a profile without it
                log.info("queue %d: %s is not offered: UNSUPP", qi, cat.BLK_REQUEST_TYPES[rtype])
                return cat.BLK_S_UNSUPP, 0
            # The payload length is checked before a byte of it is read: descriptors
            # may name hundreds of MiB, the request holds MAX_ZERO_SEGS segments at most.
            total = sum(len(d) for d in data)
            name = cat.BLK_REQUEST_TYPES[rtype]
            if not total or total % _SEG.size:
                log.warning("queue %d: %s payload of %d bytes is not whole 16-byte segments: IOERR", qi, name, total)
                return cat.BLK_S_IOERR, 0
            if total > MAX_ZERO_SEGS * _SEG.size:
                log.warning("queue %d: %s with %d segments, more than the %d the device allows: IOERR", qi, name,
                            total // _SEG.size, MAX_ZERO_SEGS)  # fmt: skip
                return cat.BLK_S_IOERR, 0
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
                    return cat.BLK_S_IOERR, 0
            try:
                for start, count, _flags in ranges:
                    self._zero(start * SECTOR, count * SECTOR, rtype == cat.BLK_T_DISCARD)
            except OSError as exc:
                log.warning("queue %d: %s failed: %s: IOERR", qi, cat.BLK_REQUEST_TYPES[rtype], exc.strerror)
                return cat.BLK_S_IOERR, 0
            return cat.BLK_S_OK, 0
        log.info("queue %d: request type %d is not supported: UNSUPP", qi, rtype)
        return cat.BLK_S_UNSUPP, 0

    def _check_writable(self, used: list, qi: int) -> None:
        """The device is about to write data pieces that lie in buffers ``used`` describes (see
        ``DeviceRing.walk``): each must lie in writable memory."""
        for kind in used:
            if not kind & MAY_WRITE:
                raise BadChain(f"queue {qi}: the device must write into a buffer in read-only memory")
        if not self._warned_flags and any(not kind & WRITE for kind in used):
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


def _transfer(is_read: bool, fd: int, offset: int, data: list, total: int) -> str | None:
    """Move ``total`` bytes between the image at ``offset`` and the buffers ``data``; None or the error."""
    if not total:
        return None
    try:
        if is_read:
            done = os.preadv(fd, data, offset)
            while done < total:  # short: the rest, until the end of the file
                more = os.preadv(fd, _skip(data, done), offset + done)
                if more <= 0:  # a short image: the rest reads as zeros
                    _zero_tail(data, done)
                    break
                done += more
        else:
            done = os.pwritev(fd, data, offset)
            while done < total:  # pwritev may be short: finish before completing
                more = os.pwritev(fd, _skip(data, done), offset + done)
                if more <= 0:
                    return "the write made no progress"
                done += more
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


class _Threads:
    """The transfers of a batch spread over threads (``io_threads`` above 1).

    A transfer whose byte range meets one still running (and one of the two
    writes) waits for the running ones first, and :meth:`settle` (before any
    request that is not IN or OUT, and at the end of a batch) waits for all:
    the outcome is that of serving the requests in order.
    """

    def __init__(self, model: BlkModel, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        self.model = model
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="l4vctl-blk-io")
        self.running: list = []  # (future, is_read, start, end, group, pending, queue index)

    def run(self, is_read: bool, offset: int, iov: list, total: int, group: list, pending: list, qi: int) -> None:
        """Start the transfer of a group (as :meth:`BlkModel._run_group` does it at once)."""
        end = offset + total
        if any(s < end and offset < e and not (r and is_read) for _f, r, s, e, *_rest in self.running):
            self.settle()
        future = self.pool.submit(_transfer, is_read, self.model.fd, offset, iov, total)
        self.running.append((future, is_read, offset, end, group, pending, qi))

    def settle(self) -> None:
        """Wait for every running transfer; set the status bytes and queue the completions."""
        for future, _r, _s, _e, group, pending, qi in self.running:
            self.model._finish(future.result(), group, pending, qi)
        self.running.clear()

    def shutdown(self) -> None:
        """Wait for the threads to end."""
        self.pool.shutdown(wait=True)
