"""The device under test: fresh sessions for each case, raw steps, recovery between cases."""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from l4vctl import catalog as cat
from l4vctl import page as pg
from l4vctl.errors import DeviceStateError, L4vError, NegotiationError, TimeoutExpired, UnavailableError

if TYPE_CHECKING:
    from l4vctl.conformance import Case
    from l4vctl.session import Session

#: Device classes the suite can build requests for.
REQUEST_CLASSES = ("blk", "console", "net", "rng")
#: The queue each class's requests go to (console and net: transmit).
DATA_QUEUE = {"blk": 0, "console": cat.CONSOLE_TX_QUEUE, "net": cat.NET_TX_QUEUE, "rng": 0}
#: Schemes whose wire carries no L4-VIRTIO status handshake, queue setup or cmd word.
NO_L4VIRTIO_WIRE = {"vhost-user": "no status handshake, config page or cmd word on the vhost-user wire"}


@contextlib.contextmanager
def private_device(url: str) -> Iterator[str]:
    """``emu:`` URLs: an emulator of the suite's own, served on a private socket for the whole run
    (an embedded emulator serves one connection; cases reconnect).  Other URLs as they are."""
    if not url.startswith("emu:"):
        yield url
        return
    import shutil
    import signal
    import tempfile

    from l4vctl.backends.emu import _wait_exit, build_device, parse_emu_target
    from l4vctl.emulator.server import listen

    kind, options = parse_emu_target(url[4:])
    device = build_device(kind, options)
    tmp = tempfile.mkdtemp(prefix="l4vctl-check-")
    path = os.path.join(tmp, "dev.sock")
    try:
        listener, ident = listen(path)
    except BaseException:
        device.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child serves until it is told to stop (or dies of an injected fault)
        code = 0
        try:
            from l4vctl.emulator import log
            from l4vctl.emulator.server import Server

            signal.signal(signal.SIGINT, signal.SIG_IGN)
            log.configure(os.environ.get("L4VCTL_EMU_LOG", "ERROR"), f"l4vctl check emu:{kind}")
            server = Server(device, listener=listener, path=path, socket_id=ident)
            server.install_signal_handlers()
            try:
                server.serve()
            finally:
                server.close()
                device.close()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    listener.close()
    device.close()
    try:
        yield f"unix:{path}"
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not _wait_exit(pid, 2.0):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        shutil.rmtree(tmp, ignore_errors=True)


class Target:
    """The device the suite checks: what it is, and sessions to it.

    ``url`` is where sessions connect, ``shown`` the URL the user gave.
    After a case that left the device gone or wedged, :attr:`unusable` says
    why (the remaining cases do not run) and :attr:`unusable_kind` is
    ``"gone"`` or ``"wedged"``.
    """

    def __init__(self, url: str, shown: str, *, abi: str, mode: str, timeout: float, attach: str):
        self.url = url
        self.shown = shown
        self.abi = abi
        self.mode = mode
        self.timeout = timeout
        self.attach = attach
        self.scheme = shown.partition(":")[0]
        self.device_class: str | None = None
        self.device_id: int | None = None
        self.offered: set[int] = set()
        self.page_abi = "current"
        self.num_queues = 0
        self.num_max: list[int] = []
        self.unusable: str | None = None
        self.unusable_kind: str | None = None
        self.current: str = ""  # the case that runs

    # -- sessions ------------------------------------------------------------------------

    def session(self, **kw: Any) -> Session:
        """A new, open driver session (a device that is busy with the last driver is asked again)."""
        from l4vctl.session import Session

        deadline = time.monotonic() + self.timeout
        while True:
            s = Session(self.url, abi=self.abi, mode=kw.get("mode", self.mode), timeout=self.timeout,
                        attach=self.attach)  # fmt: skip
            try:
                s.open()
                return s
            except UnavailableError as exc:
                s.close()
                # the server may not have seen the last driver leave yet
                if "device busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
            except BaseException:
                s.close()
                raise

    @contextlib.contextmanager
    def open(self, **kw: Any) -> Iterator[Session]:
        """A fresh session for one case, closed (and the device reset) at the end."""
        s = self.session(**kw)
        try:
            yield s
        finally:
            close_session(s)

    def identify(self) -> dict[str, Any]:
        """Read the page once: class, features, queues (what decides which cases apply)."""
        with self.open(mode="ipc") as s:
            if not s.live:
                raise UnavailableError(f"{self.shown} is a saved page: check needs a live device (emu:, unix:, "
                                       "vhost-user:, l4re:)")  # fmt: skip
            info = s.device_info()
            if info["id"] is not None:
                try:
                    s.reset()  # block servers publish their features only on a reset (§5.2)
                except L4vError:
                    pass  # a device that refuses it meets the cases as it is
            self.device_id = info["id"]
            self.device_class = info["class"]
            self.offered = s.offered()
            self.page_abi = s.abi
            self.num_queues = s.get("num_queues")
            qoff = s.get("queues_offset")
            page = s.page_bytes()
            qc = pg.queue_codec(s.stride)
            self.num_max = []
            for i in range(self.num_queues):
                off = qoff + i * s.stride
                if off + s.stride > len(page):
                    break
                self.num_max.append(qc.unpack(page, off)["num_max"])
        if self.mode == "cmd" and not self.offers_cmd:
            raise NegotiationError("--mode cmd asked for, but the device does not offer L4VIRTIO_FEATURE_CMD_CONFIG")
        return {"device_id": self.device_id, "device_class": self.device_class, "name": info["name"],
                "abi": self.page_abi, "num_queues": self.num_queues, "num_max": self.num_max,
                "offered": sorted(self.offered), "cmd_config": self.offers_cmd, "scheme": self.scheme}  # fmt: skip

    @property
    def offers_cmd(self) -> bool:
        """Whether the device offers L4VIRTIO_FEATURE_CMD_CONFIG (has a cmd word)."""
        return cat.CMD_CONFIG_BIT[self.page_abi] in self.offered

    def not_applicable(self, case: Case) -> str | None:
        """Why ``case`` does not apply to this device or backend (None: it does)."""
        if case.wire == "l4virtio" and self.scheme in NO_L4VIRTIO_WIRE:
            return f"not applicable: {NO_L4VIRTIO_WIRE[self.scheme]}"
        check = getattr(case.run, "applies", None)
        return check(self) if check is not None else None

    # -- recovery -------------------------------------------------------------------------------

    def recover(self, full: bool = True, request: bool = True) -> str | None:
        """Reset the device and check it is usable again: a fresh session and, with ``full``,
        a fresh handshake and (with ``request``, for a class the suite has requests for) a good
        request.  None if it is; else what went wrong (and :attr:`unusable` if the device is gone
        or wedged)."""
        try:
            with self.open() as s:
                if not full:
                    s.reset()
                    return None
                s.handshake()
                if request and self.device_class in REQUEST_CLASSES:
                    from l4vctl.conformance.cases import good_request_in

                    problem = good_request_in(s, self.device_class, self.timeout)
                    if problem is not None:
                        self.unusable_kind = "wedged"
                        self.unusable = f"not run: the device is wedged since case {self.current}"
                        return problem
        except TimeoutExpired as exc:
            self.unusable_kind = "wedged"
            self.unusable = f"not run: the device is wedged since case {self.current}"
            return f"the device did not answer a fresh session: {exc}"
        except UnavailableError as exc:
            self.unusable_kind = "gone"
            self.unusable = f"not run: the device is gone since case {self.current}"
            return f"the device is gone: {exc}"
        except (NegotiationError, DeviceStateError, L4vError) as exc:
            return f"a fresh handshake failed: {exc}"
        return None


# -- raw steps shared by the cases ---------------------------------------------------------------

#: Views into a session's memory that the cases made (released before the session closes).
_VIEWS: weakref.WeakKeyDictionary[Session, list[memoryview]] = weakref.WeakKeyDictionary()


def keep_view(s: Session, view: memoryview) -> memoryview:
    """Remember ``view`` (of ``s``'s memory) to release it when ``s`` closes; returns it."""
    _VIEWS.setdefault(s, []).append(view)
    return view


def close_session(s: Session, reset: bool = True) -> None:
    """Release the views the cases made into the session's memory, then close it."""
    for view in _VIEWS.pop(s, []):
        view.release()
    s.close(reset=reset)


def status_steps(s: Session, values: list[int]) -> int:
    """Reset, then write each status value (IPC or cmd, as the session does); the status shown last."""
    s.reset()
    st = s.status
    for v in values:
        st = s.write_status(v)
    return st


def up_to_features_ok(s: Session) -> None:
    """Reset, ACKNOWLEDGE, DRIVER, the session's default features and FEATURES_OK (checked)."""
    s.reset()
    s.write_status(cat.STATUS_ACKNOWLEDGE)
    s.write_status(cat.STATUS_ACKNOWLEDGE | cat.STATUS_DRIVER)
    s.negotiate(None, (), (), s.get("device"))


def write_queue_entry(s: Session, index: int, **fields: int) -> None:
    """Store queue-config fields of entry ``index`` in the page (single stores, or one write where it
    is not mapped here)."""
    from l4vctl._session.queues import _page_stores

    assert s._view is not None
    store = _page_stores(s._view)
    qc = pg.queue_codec(s.stride)
    base = s.get("queues_offset") + index * s.stride
    for name, value in fields.items():
        off, size = qc.fields[name][0], qc.fields[name][1]
        store(base + off, size, value)


def config_queue(s: Session, index: int) -> int | None:
    """Configure queue ``index`` as the session does (IPC: the result; cmd: None, nothing is reported)."""
    if s.mode == "cmd":
        s.send_cmd(cat.cmd_word(cat.CMD_CFG_QUEUE, index))
        return None
    r = s._call(cat.L4VIRTIO_PROTOCOL, cat.OP_CONFIG_QUEUE, [index])
    r.close()
    return int(r.result)


def queue_enabled(s: Session, index: int) -> bool | None:
    """Whether the device enabled queue ``index``, where it can tell (an emulator's monitor); else None."""
    try:
        stats = s.stats()
    except L4vError:
        return None
    if not stats or index >= len(stats["queues"]):
        return None
    return bool(stats["queues"][index]["enabled"])


def fail_bits(status: int) -> str:
    """The names of the fail bits of ``status`` (DEVICE_NEEDS_RESET+FAILED)."""
    names, _ = cat.flag_names(status & cat.STATUS_FAIL_MASK, cat.STATUS_BITS)
    return "+".join(names)
