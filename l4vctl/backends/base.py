"""The backend contract: what a session needs from the way it reaches a device.

A :class:`Backend` is named by a device URL (``SCHEME:REST``).  It either
*connects* (``live``: a :class:`Channel` to the device in a role) or *loads*
(a saved page: bytes, no handshake).  It may say that the page it presents
is synthesised (:attr:`Backend.synthesized`) or that the device id on it is
not the device's own (:attr:`Backend.device_unknown`).

A :class:`Channel` carries L4-VIRTIO requests (:meth:`Channel.call`, one
:class:`Response` each), tells when the device hung up (:meth:`Channel.check`,
:meth:`Channel.hung_up`, :meth:`Channel.fileno` for waiting on it) and gives
access to the memory driver and device share: the config page the device
hands out (:meth:`Channel.map_config`) and the dataspaces the driver lends
(:meth:`Channel.lend`).  That memory is a :class:`Memory`: batched reads and
writes of byte ranges, which every backend provides, and a memoryview for
the ones where it is a local mapping (:class:`LocalMemory`: the socket and
vhost-user backends), so hot paths keep their single-store typed views while
a backend whose memory lives elsewhere (behind a serial link) fits the same
contract.

Third-party schemes subclass :class:`Backend` and :class:`Channel` and are
registered through the ``l4vctl.backends`` entry-point group (see README).
Nothing here imports more than the standard library's light modules: the
contract is on every command's start-up path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from l4vctl.errors import ProtocolError, UnavailableError, UsageError

if TYPE_CHECKING:
    from l4vctl.caps import Dataspace, Irq
    from l4vctl.wire import Cap

#: A byte range of a memory: (offset, length).
Range = tuple[int, int]


# -- replies ------------------------------------------------------------------------


class Response:
    """A reply: result code, output words, capability items and their fds."""

    __slots__ = ("result", "words", "caps", "fds")

    def __init__(self, result: int, words: Sequence[int], caps: Sequence[Any], fds: list[int]):
        self.result = result
        self.words = words
        self.caps = caps
        self.fds = fds

    def fd(self, index: int = 0, kind: int | None = None) -> int:
        """Take the descriptor of capability ``index`` (the caller now owns it)."""
        from l4vctl import catalog as cat

        cap = self.caps[index] if index < len(self.caps) else None
        if cap is None or (kind is not None and cap.type != kind) or not 0 <= cap.handle < len(self.fds):
            what = "capability" if kind is None else cat.CAP_TYPES.get(kind, "capability")
            raise ProtocolError(f"reply lacks the expected {what} item")
        fd = self.fds[cap.handle]
        self.fds[cap.handle] = -1
        return fd

    def close(self) -> None:
        """Close the descriptors nobody took."""
        from l4vctl.caps import close_fds

        close_fds(fd for fd in self.fds if fd >= 0)
        self.fds = []


class CapItem:
    """A capability item of a reply that did not cross a socket (the fields of :class:`l4vctl.wire.Cap`)."""

    __slots__ = ("type", "rights", "handle", "size")

    def __init__(self, type: int, rights: int = 0, handle: int = 0, size: int = 0):
        self.type = type
        self.rights = rights
        self.handle = handle
        self.size = size


# -- memory -------------------------------------------------------------------------


class Memory(ABC):
    """Memory shared between driver and device: a config page or a lent dataspace.

    Every memory serves batched reads and writes of byte ranges; only a local
    mapping also offers a :meth:`view` (None otherwise), which hot paths use
    for single-store typed access.
    """

    #: Bytes the memory spans.
    size: int = 0

    @abstractmethod
    def read(self, ranges: Iterable[Range]) -> list[bytes]:
        """The bytes of every ``(offset, length)`` range, in one round trip."""

    @abstractmethod
    def write(self, items: Iterable[tuple[int, bytes]]) -> None:
        """Store every ``(offset, data)`` item, in order, in one round trip."""

    def view(self) -> memoryview | None:
        """The memory as a byte memoryview if it is mapped in this process, else None."""
        return None

    def close(self) -> None:  # noqa: B027 - a no-op by default; memories that hold something override it
        """Release the memory (a local mapping ends with its last view)."""


class LocalMemory(Memory):
    """Memory mapped in this process (or plain bytes): a memoryview does everything."""

    __slots__ = ("mem", "size", "owner")

    def __init__(self, mem: memoryview, owner: Dataspace | None = None):
        self.mem = mem
        self.size = len(mem)
        self.owner = owner  # the dataspace behind the mapping, closed with the memory

    def read(self, ranges: Iterable[Range]) -> list[bytes]:
        """The bytes of every ``(offset, length)`` range."""
        mem = self.mem
        out = []
        for off, length in ranges:
            if off < 0 or length < 0 or off + length > self.size:
                raise ValueError(f"range {off:#x}+{length:#x} is outside the {self.size:#x}-byte memory")
            out.append(bytes(mem[off : off + length]))
        return out

    def write(self, items: Iterable[tuple[int, bytes]]) -> None:
        """Store every ``(offset, data)`` item."""
        mem = self.mem
        for off, data in items:
            if off < 0 or off + len(data) > self.size:
                raise ValueError(f"write {off:#x}+{len(data):#x} is outside the {self.size:#x}-byte memory")
            mem[off : off + len(data)] = data

    def view(self) -> memoryview:
        """The mapping itself."""
        return self.mem

    def close(self) -> None:
        """Release the view and close the dataspace behind it."""
        self.mem.release()
        if self.owner is not None:
            self.owner.close()
            self.owner = None


class Lent:
    """A dataspace the driver lends to the device: its memory and how to pass it."""

    __slots__ = ("memory", "size", "cap", "fds", "dataspace")

    def __init__(self, memory: Memory, size: int, cap: Cap, fds: list[int], dataspace: Dataspace | None = None):
        self.memory = memory
        self.size = size
        self.cap = cap  # the capability item of REGISTER_DS
        self.fds = fds  # what travels with it (fd profile)
        self.dataspace = dataspace

    def close(self) -> None:
        """Release the memory and the dataspace."""
        self.memory.close()
        if self.dataspace is not None:
            self.dataspace.close()


def map_local(fd: int, size: int, offset: int, writable: bool) -> LocalMemory:
    """The config page in a received dataspace ``fd``, checked and mapped here.

    ``size`` is the dataspace size the capability item names, ``offset`` where
    the page starts in it.  Takes ownership of ``fd``.  Raises ProtocolError
    or FormatError for a dataspace that is not safe to map or too small.
    """
    import os

    from l4vctl.caps import PAGE, RIGHTS_RW, Dataspace, close_fds
    from l4vctl.catalog import PAGE_SIZE

    if offset % PAGE:
        close_fds([fd])
        raise ProtocolError(f"config page offset {offset:#x} is not page aligned")
    ds = Dataspace.adopt(fd, size, RIGHTS_RW if writable else 0, "config", need=offset + PAGE_SIZE,
                         what="config dataspace")  # fmt: skip
    try:
        real = os.fstat(ds.fd).st_size
        if real < offset + PAGE_SIZE:
            raise ProtocolError(f"config dataspace of {real} bytes is too small for a page at {offset:#x}")
        m = ds.map(offset, PAGE_SIZE, writable=writable)
    except OSError as exc:
        ds.close()
        raise ProtocolError(f"cannot map the config page: {exc.strerror or exc}") from None
    except BaseException:
        ds.close()
        raise
    return LocalMemory(memoryview(m), ds)


def lend_local(size: int, name: str) -> Lent:
    """A new memfd of ``size`` bytes mapped here, ready for REGISTER_DS."""
    from l4vctl import catalog as cat
    from l4vctl.caps import RIGHTS_RW, Dataspace
    from l4vctl.wire import Cap

    ds = Dataspace.create(name, size)
    try:
        mem = memoryview(ds.map())
    except BaseException:
        ds.close()
        raise
    return Lent(LocalMemory(mem), ds.size, Cap(cat.CAP_DATASPACE, RIGHTS_RW, 0, ds.size), [ds.fd], ds)


# -- channels -------------------------------------------------------------------------


class Channel(ABC):
    """A connection to a device: requests, hang-up detection, shared memory."""

    #: What error messages call the device (a path or URL).
    name: str = ""

    @abstractmethod
    def call(self, label: int, opcode: int, words: Sequence[int] = (), caps: Sequence[Any] = (),
             fds: Sequence[int] = (), timeout: float | None = None) -> Response:  # fmt: skip
        """One request and its reply (raises TimeoutExpired, UnavailableError, ProtocolError)."""

    @abstractmethod
    def close(self) -> None:
        """End the connection."""

    def fileno(self) -> int:
        """A descriptor that reports a hang-up (POLLHUP) when the device goes away; -1 if none."""
        return -1

    def hung_up(self) -> bool:
        """True if the device went away."""
        return False

    def check(self) -> None:
        """Raise UnavailableError if the device went away (called while waiting for completions)."""
        if self.hung_up():
            raise UnavailableError(f"{self.name}: the device went away")

    def map_config(self, fd: int, size: int, offset: int, writable: bool) -> Memory:
        """The config page the device handed out: ``fd`` (now owned here), ``size`` bytes, page at ``offset``."""
        return map_local(fd, size, offset, writable)

    def config_memory(self, r: Response, index: int, offset: int, writable: bool) -> Memory:
        """The config page in dataspace item ``index`` of a reply (DEVICE_CONFIG, REGISTER_IFACE)."""
        from l4vctl import catalog as cat

        fd = r.fd(index, cat.CAP_DATASPACE)  # raises unless the item is a dataspace
        return self.map_config(fd, r.caps[index].size, offset, writable)

    def adopt_irq(self, r: Response, index: int, what: str) -> Irq:
        """The device IRQ in item ``index`` of a reply (GET_DEVICE_IRQ, REGISTER_IFACE)."""
        from l4vctl import catalog as cat
        from l4vctl.caps import Irq

        return Irq.adopt(r.fd(index, cat.CAP_IRQ), what)

    def new_irq(self) -> tuple[Irq, Cap, list[int]]:
        """A new driver IRQ: the object, its capability item for ICU bind and the descriptors sent with it."""
        from l4vctl import catalog as cat
        from l4vctl.caps import RIGHT_W, Irq
        from l4vctl.wire import Cap

        irq = Irq.create()
        return irq, Cap(cat.CAP_IRQ, RIGHT_W, 0), [irq.fd]

    #: First device address the driver lends memory at (L4Re drivers start at the superpage size).
    device_address_base = 0x200000

    def lend(self, size: int, name: str) -> Lent:
        """New memory for the driver to lend to the device with REGISTER_DS."""
        return lend_local(size, name)


# -- backends ---------------------------------------------------------------------------


class Backend:
    """Base of every backend: a URL that names one device.

    A live backend implements :meth:`connect`; a saved page (``live`` False)
    implements :meth:`load`.  :meth:`available` says whether the scheme can
    work on this machine at all; :meth:`close` releases what the backend holds.
    """

    scheme = ""
    live = True  # False: no handshake possible (a saved page)
    #: Why the device id on the page is not the device's own ("unknown (...)"), or None.
    device_unknown: str | None = None
    #: A note that the page is synthesised by the backend (shown first among the notes), or None.
    synthesized: str | None = None

    def __init__(self, url: str, target: str):
        self.url = url
        self.target = target

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(True, "") if the scheme works here, else (False, why)."""
        from l4vctl.backends import builtin_available

        return builtin_available(cls.scheme)

    def connect(self, role: str = "driver", timeout: float = 5.0) -> Channel:
        """A Channel to the device in the given role ('driver' or 'monitor')."""
        raise UnavailableError(f"{self.url}: cannot be connected to")

    def load(self, fmt: str = "auto") -> tuple[bytes, str, dict[str, Any]]:
        """A saved page: its bytes, how they were stored ('raw'/'hex') and hex dump hints."""
        raise UnavailableError(f"{self.url}: not a saved page")

    def close(self) -> None:
        """Release what the backend holds (processes, files)."""


def parse_query(target: str, scheme: str, example: str) -> tuple[str, dict[str, str]]:
    """``(head, options)`` of ``HEAD?OPT=VALUE&...``; a usage error names ``example``.

    An empty query gives no options; a malformed one (``?a&&b``) is refused.
    Names and values are decoded as ``urllib.parse.parse_qsl`` (blank values
    kept, strict) decodes them: ``+`` is a space, ``%XX`` a byte of UTF-8.
    """
    head, _, query = target.partition("?")
    if not query:
        return head, {}
    try:
        pairs = parse_qsl(query)
    except ValueError:
        raise UsageError(f"{scheme}:{target}: options must look like {example}") from None
    return head, dict(pairs)


def parse_qsl(query: str) -> list[tuple[str, str]]:
    """``urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)``, without
    importing urllib.parse (and ipaddress with it) on every command's path."""
    out = []
    for field in query.split("&") if query else ():
        name, eq, value = field.partition("=")
        if not eq:
            raise ValueError(f"bad query field: {field!r}")
        out.append((unquote_plus(name), unquote_plus(value)))
    return out


def unquote_plus(text: str) -> str:
    """``urllib.parse.unquote_plus``: ``+`` is a space, ``%XX`` a byte; runs of ASCII are decoded as
    UTF-8 with invalid bytes replaced, other characters are kept as they are."""
    text = text.replace("+", " ")
    if "%" not in text:
        return text
    parts = []
    start = 0
    n = len(text)
    while start < n:
        ascii_run = text[start].isascii()
        end = start + 1
        while end < n and text[end].isascii() == ascii_run:
            end += 1
        run = text[start:end]
        parts.append(_unquote_ascii(run) if ascii_run else run)
        start = end
    return "".join(parts)


def _unquote_ascii(run: str) -> str:
    bits = run.encode("ascii").split(b"%")
    out = bytearray(bits[0])
    for item in bits[1:]:
        pair = item[:2]
        if len(pair) == 2 and all(c in _HEX for c in pair):
            out += bytes.fromhex(pair.decode())
            out += item[2:]
        else:
            out += b"%" + item
    return out.decode("utf-8", "replace")


_HEX = frozenset(b"0123456789abcdefABCDEF")
