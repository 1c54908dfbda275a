"""pytest fixtures that give a test emulated L4-VIRTIO devices: ``l4v_device``, ``l4v_session``, ``l4v_emu``.

l4vctl installs this module as a pytest plugin (entry point ``pytest11``,
name ``l4vctl``), so every pytest run in an environment that has l4vctl
loads it.  Loading it imports only modules pytest has already imported; the
emulator, the session and everything else are imported when a test first
asks for a fixture.  Tests that name no ``l4v_`` fixture run exactly as they
would without the plugin: there is no autouse fixture, the hooks add two
``--l4v-`` options and sections to the failure reports of tests that started
devices, and l4vctl's modules are not assertion-rewritten (see
:func:`_keep_asserts_plain`).

``l4v_device(TYPE, **options)``
    starts ``l4vctl emulate TYPE --socket PATH`` as a process, with the
    socket in the test's temporary directory, and returns an
    :class:`EmulatedDevice` (``.url``, ``.socket``, ``.image``, ``.process``,
    ``.log``, ``.inject``, ``.session()``, ``.stats()``, ``.stop()``,
    ``.kill()``, ``.restart()``).  Options are those of ``l4vctl emulate``
    with ``_`` for ``-``: ``size="64M"``, ``abi="classic"``, ``cmd_mode=True``,
    ``features=["event_idx"]``, ``inject="refuse-features-ok"`` (a string or
    a list), ``profile=...``, ``image=PATH``, ``ro=True`` ...  ``pytest
    --l4v-faults`` lists the faults the emulator can inject.
``l4v_session(TYPE, **options)``
    a device as above and a Session on it, handshaken to DRIVER_OK.
``l4v_emu(TYPE, **options)``
    an ``emu:`` device: no emulator process of its own is started (each
    session forks one from the test process, which is quicker).

At teardown, however the test went, every session is closed, every emulator
is stopped (SIGTERM, SIGKILL after a timeout) and its socket removed.  When a
test fails, the report carries the log of each emulator it started.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterable, Iterator
    from pathlib import Path

    from l4vctl.session import Session

#: Seconds a device gets to print its ready line (a fresh interpreter on a loaded machine can be slow).
START_TIMEOUT = 30.0
#: Seconds a device gets to exit after SIGTERM (then SIGKILL), and after SIGKILL.
STOP_TIMEOUT = 5.0
#: Device types the emulator serves (checked again by the emulator itself).
TYPES = ("blk", "net", "console", "rng")
#: Server options of ``l4vctl emulate`` (not device options: the models do not list them).
SERVER_OPTIONS = ("max_clients", "client_timeout", "idle_timeout")
#: Lines of an emulator's log a failure report shows.
REPORT_LINES = 200
#: Socket paths longer than this go to a short directory of their own (AF_UNIX allows 107 bytes).
MAX_SOCKET_PATH = 100


class L4vDeviceError(Exception):
    """A device of the plugin cannot be started, stopped or made as asked (bad option, emulator that exits)."""


# -- command line ------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """``--l4v-verbose`` and ``--l4v-faults``; l4vctl's own modules keep their plain asserts."""
    _keep_asserts_plain(pluginmanager)
    group = parser.getgroup("l4vctl", "l4vctl emulated devices (fixtures l4v_device, l4v_session, l4v_emu)")
    group.addoption(
        "--l4v-verbose",
        action="count",
        default=0,
        help="run the emulators of l4v_device with -v (given twice: -vv): their logs, which a failing "
        "test's report shows, tell each step of the device (connections, status writes, regions, queues)",
    )
    group.addoption(
        "--l4v-faults",
        action="store_true",
        default=False,
        help="list the faults l4v_device(..., inject=FAULT) can inject, and exit",
    )


def _keep_asserts_plain(pluginmanager: pytest.PytestPluginManager) -> None:
    """Take l4vctl off pytest's list of packages whose asserts it rewrites.

    pytest rewrites the asserts of every package that provides a ``pytest11``
    plugin, which would make every l4vctl module a test imports go through
    the rewriter (slower imports, different assertion messages from library
    code): not what a run that never uses the fixtures should get.  Only the
    package itself and this module (imported to load the plugin) were
    rewritten by then.  Without pytest's private attributes, nothing changes.
    """
    hook = getattr(pluginmanager, "rewrite_hook", None)
    marked = getattr(hook, "_must_rewrite", None)
    if not isinstance(marked, set):
        return
    ours = {name for name in marked if name == "l4vctl" or name.startswith("l4vctl.")}
    if ours:
        marked.difference_update(ours)
        cache = getattr(hook, "_marked_for_rewrite_cache", None)
        if isinstance(cache, dict):
            cache.clear()


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--l4v-faults``: print the emulator's fault list and stop."""
    if config.getoption("l4v_faults", False):
        print(faults_help())
        return 0
    return None


def faults() -> dict[str, str]:
    """The faults the emulator can inject, name -> what it does (read from the emulator, not copied)."""
    from l4vctl.emulator.models import base

    return dict(base.FAULTS)


def faults_help() -> str:
    """The fault list as ``--l4v-faults`` prints it: ``name[=VALUE]  what it does``."""
    from l4vctl.emulator.models import base

    values = getattr(base, "FAULT_VALUES", {})
    rows = [(f"{name}=VALUE" if name in values else name, text) for name, text in faults().items()]
    width = max(len(r[0]) for r in rows)
    lines = ["Faults for l4v_device(TYPE, inject=FAULT) or inject=[FAULT, ...] (l4vctl emulate --inject):"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in rows]
    return "\n".join(lines)


# -- failure reports --------------------------------------------------------------------------------

_DEVICES = pytest.StashKey["list[EmulatedDevice]"]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A failing test that started emulators gets each one's log in its report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for dev in item.stash.get(_DEVICES, ()):
            if not dev.started:
                continue  # the error says what its emulator said
            report.sections.append((f"l4v {dev.name} emulator log ({dev.url})", dev.log_tail(REPORT_LINES)))


# -- sessions ---------------------------------------------------------------------------------------


def _open_session(url: str, sessions: list[Session], handshake: bool, handshake_options: dict[str, Any],
                  session_options: dict[str, Any]) -> Session:  # fmt: skip
    """A Session on ``url``, opened (and handshaken), kept in ``sessions`` to be closed at teardown."""
    __tracebackhide__ = True
    from l4vctl.session import Session

    s = Session(url, **session_options)
    try:
        s.open()
        if handshake:
            s.handshake(**handshake_options)
    except BaseException:
        s.close()
        raise
    sessions.append(s)
    return s


def _close_sessions(sessions: list[Session]) -> None:
    """Close sessions, newest first; a device that is gone already does not stop the others."""
    while sessions:
        s = sessions.pop()
        try:
            s.close()
        except Exception:
            pass


# -- options -----------------------------------------------------------------------------------------


def _model_options(kind: str) -> dict[str, bool]:
    """Option name -> whether it is a flag, for device type ``kind`` (the emulator's own tables)."""
    from l4vctl.emulator.models import model_class
    from l4vctl.emulator.models.base import COMMON_OPTIONS

    out = {o.name: isinstance(o.default, bool) for o in (*COMMON_OPTIONS, *model_class(kind).OPTIONS)}
    out.update(dict.fromkeys(SERVER_OPTIONS, False))
    return out


def _items(value: Any) -> list[str]:
    """A string or a list of them as a list of strings (None: none)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, set, frozenset)):
        return [str(v) for v in value]
    return [str(value)]


def _check_kind(caller: str, kind: object) -> str:
    if kind not in TYPES:
        raise L4vDeviceError(f"{caller}({kind!r}): not a device type (types: {', '.join(TYPES)})")
    return str(kind)


def _normalise(caller: str, kind: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
    """Options with ``feature`` folded into ``features``; an error for one the emulator does not have."""
    known = _model_options(kind)
    out = dict(options)
    if "feature" in out:
        out["features"] = [*_items(out.pop("feature")), *_items(out.get("features"))]
    bad = sorted(k for k in out if k not in known)
    if bad:
        raise L4vDeviceError(
            f"{caller}({kind!r}): {', '.join(repr(k) for k in bad)} "
            f"{'is not an option' if len(bad) == 1 else 'are not options'} of {kind} devices "
            f"(options: {', '.join(sorted(known))})"
        )
    return out, known


def _flag_value(caller: str, name: str, value: Any) -> bool:
    from l4vctl.parsing import parse_bool

    try:
        return parse_bool(value) if isinstance(value, (bool, str)) else bool(value)
    except ValueError as exc:
        raise L4vDeviceError(f"{caller}: {name}={value!r}: {exc}") from None


def _emulate_args(caller: str, options: dict[str, Any], known: dict[str, bool]) -> list[str]:
    """``l4vctl emulate`` arguments for ``options`` (None values left out)."""
    args: list[str] = []
    for name, value in options.items():
        if value is None:
            continue
        if name in ("features", "inject"):
            for item in _items(value):
                args += ["--feature" if name == "features" else "--inject", item]
        elif known[name]:
            if _flag_value(caller, name, value):
                args.append("--" + name.replace("_", "-"))
        else:
            args += ["--" + name.replace("_", "-"), os.fspath(value) if hasattr(value, "__fspath__") else str(value)]
    return args


def _describe_call(caller: str, kind: str, options: dict[str, Any]) -> str:
    return f"{caller}({', '.join([repr(kind), *(f'{k}={v!r}' for k, v in options.items())])})"


class _Links:
    """Cable names private to one test: ``link="lab"`` of two devices of a test joins those two only."""

    count = 0

    def __init__(self) -> None:
        _Links.count += 1
        self.prefix = f"l4v-{os.getpid():x}-{_Links.count:x}-"
        self.names: dict[str, str] = {}

    def map(self, name: Any) -> str:
        text = str(name)
        if text not in self.names:
            self.names[text] = f"{self.prefix}{len(self.names):x}"
        return self.names[text]


# -- devices served by an `l4vctl emulate` process ------------------------------------------------------


class EmulatedDevice:
    """A device served by its own ``l4vctl emulate`` process, for one test.

    ``url`` (``unix:PATH``) and ``socket`` name where it listens, ``image`` is
    the image file of a block device (made in the test's temporary directory
    unless ``image=`` was given; None for other types), ``inject`` the faults
    it runs with, ``options`` the options as given, ``argv`` the command line,
    ``process`` the ``subprocess.Popen`` (None once stopped), ``pid`` its pid.
    ``log`` is what the emulator wrote on stderr so far.
    """

    def __init__(self, kind: str, name: str, socket: str, image: str | None, options: dict[str, Any],
                 argv: list[str], log_path: Path, out_path: Path, caller: str,
                 start_timeout: float, lifeline: int) -> None:  # fmt: skip
        self.kind = kind
        self.name = name
        self.socket = socket
        self.url = f"unix:{socket}"
        self.image = image
        self.options = options
        self.inject: list[str] = _items(options.get("inject"))
        self.argv = argv
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.lifeline = lifeline
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        #: Whether the emulator ever listened (a failed start has its log in the error instead).
        self.started = False
        self._out_path = out_path
        self._caller = caller
        self._sessions: list[Session] = []

    def __repr__(self) -> str:
        state = f"pid {self.process.pid}" if self.process is not None else f"exited {self.returncode}"
        return f"<EmulatedDevice {self.name} {self.url} {state}>"

    # -- what it says

    @property
    def pid(self) -> int | None:
        """The emulator's pid while this object holds its process (None once stopped and reaped)."""
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        """Whether the emulator process is still running."""
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> str:
        """Everything the emulator wrote on stderr so far (all its runs, with restarts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int) -> str:
        """The last ``lines`` lines of the log."""
        text = self.log.splitlines()
        more = f"[{len(text) - lines} earlier lines in {self.log_path}]\n" if len(text) > lines else ""
        return more + "\n".join(text[-lines:])

    # -- use it

    def session(self, handshake: bool = False, *, want: Any = None, require: Iterable[Any] = (),
                refuse: Iterable[Any] = (), queues: bool = True, queue_size: int | None = None,
                **session_options: Any) -> Session:  # fmt: skip
        """An l4vctl Session attached to the device (as driver unless ``role="monitor"``), closed at teardown.

        ``handshake=True`` brings the device to DRIVER_OK (``want``,
        ``require``, ``refuse``, ``queues`` and ``queue_size`` as in
        ``Session.handshake``); other keywords go to ``Session`` (``timeout``,
        ``mode``, ``attach``, ``abi``, ``role``).  A handshake that fails
        raises (NegotiationError, DeviceStateError ...) with the session closed.
        """
        __tracebackhide__ = True
        hs = {"want": want, "require": require, "refuse": refuse, "queues": queues, "queue_size": queue_size}
        return _open_session(self.url, self._sessions, handshake, hs, session_options)

    def stats(self) -> dict[str, Any]:
        """The emulator's monitor STATS (device-side queue state), read by a monitor while a driver may be attached."""
        from l4vctl.session import Session

        with Session(self.url, role="monitor") as s:
            out = s.stats()
        if out is None:
            raise L4vDeviceError(f"{self.url}: the device answered no STATS")
        return out

    # -- life and death

    def start(self) -> None:
        """Start the emulator and wait until it listens; L4vDeviceError with its log if it does not."""
        __tracebackhide__ = True
        import subprocess
        import sys
        import time

        if self.alive:
            raise L4vDeviceError(f"{self.name}: already running (pid {self.pid})")
        self._reap()
        _remove_socket(self.socket)  # what a killed emulator left behind
        lifeline = self.lifeline
        with open(self.log_path, "ab") as log, open(self._out_path, "w+b") as out:
            proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(lifeline), _ROOT, *self.argv],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=log, pass_fds=(lifeline,))  # fmt: skip
        self.process, self.returncode = proc, None
        deadline = time.monotonic() + self.start_timeout
        delay = 0.001
        while True:
            line = self._ready_line()
            if line is not None:
                if line != self.url:
                    self._stop(kill=True)
                    raise L4vDeviceError(self._start_failure(f"printed {line!r} where {self.url} was expected"))
                self.started = True
                return
            code = proc.poll()
            if code is not None:
                self._reap()
                raise L4vDeviceError(self._start_failure(f"exited with status {code} before it listened"))
            if time.monotonic() >= deadline:
                self._stop(kill=True)
                raise L4vDeviceError(self._start_failure(f"did not listen within {self.start_timeout:g} s"))
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _ready_line(self) -> str | None:
        try:
            data = self._out_path.read_bytes()
        except OSError:
            return None
        if b"\n" not in data:
            return None
        return data.split(b"\n", 1)[0].decode(errors="replace").strip()

    def _start_failure(self, what: str) -> str:
        log = self.log.strip() or "(nothing on stderr)"
        command = " ".join(["python -m l4vctl", *self.argv])
        return f"{self._caller}: the emulator {what}:\n{log}\ncommand: {command}"

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait until the emulator exits by itself (a die-on-status fault, say); its exit status."""
        __tracebackhide__ = True
        import subprocess

        if self.process is None:
            return self.returncode if self.returncode is not None else 0
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise L4vDeviceError(f"{self.name}: the emulator still runs after {timeout:g} s") from None
        return self._reap()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, as a user stopping it: the emulator ends cleanly and removes its socket.  Its exit status."""
        __tracebackhide__ = True
        return self._stop(kill=False, timeout=timeout)

    def kill(self) -> int:
        """SIGKILL, as a crash: drivers see the peer vanish; the socket stays until teardown or restart."""
        __tracebackhide__ = True
        if self.process is None:
            return self.returncode if self.returncode is not None else 0
        try:
            self.process.kill()
        except ProcessLookupError:
            pass
        return self.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop the emulator if it runs, then start it again with the same options (the image is kept)."""
        __tracebackhide__ = True
        self._stop(kill=False)
        self.start()

    def _stop(self, kill: bool, timeout: float = STOP_TIMEOUT) -> int:
        import signal
        import subprocess

        proc = self.process
        if proc is None:
            return self.returncode if self.returncode is not None else 0
        for sig in (signal.SIGKILL,) if kill else (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            try:
                proc.send_signal(sig)
                proc.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                if sig == signal.SIGKILL:
                    raise L4vDeviceError(f"{self.name}: the emulator (pid {proc.pid}) does not die") from None
        return self._reap()

    def _reap(self) -> int:
        proc = self.process
        if proc is not None and proc.poll() is not None:
            self.returncode = proc.returncode
            self.process = None
        return self.returncode if self.returncode is not None else 0

    def close(self) -> None:
        """Teardown: close the sessions, stop the emulator (killed if it does not end), remove its socket."""
        try:
            _close_sessions(self._sessions)
        finally:
            try:
                self._stop(kill=False)
            finally:
                _remove_socket(self.socket)


#: How an emulator is run: ``python -c LAUNCHER FD ROOT emulate ...`` is ``python -m l4vctl emulate ...``
#: with the l4vctl of the test process (the one under ROOT, also where the child would not find it or would
#: find another one first) and a thread that reads the lifeline FD and sends the process SIGTERM when it
#: ends, that is when the test run ends, however it ends (even by SIGKILL): no emulator outlives its run.
LAUNCHER = """\
import os, runpy, signal, sys, threading
fd = int(sys.argv.pop(1))
root = sys.argv.pop(1)
if root not in sys.path:
    sys.path.insert(0, root)
def watch():
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, name="l4v-lifeline", daemon=True).start()
runpy.run_module("l4vctl", run_name="__main__", alter_sys=True)
"""


#: The directory that holds the l4vctl package of this process.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def _l4v_lifeline() -> Iterator[int]:
    """The read end of a pipe whose write end only this process holds: the emulators' lifeline.

    Made before the first test that starts an emulator sets up its other
    fixtures (a fixture that checks a test for leaked descriptors does not
    count it), closed when the run ends.
    """
    read_end, write_end = os.pipe()  # neither end is inherited; the read end is passed on explicitly
    try:
        yield read_end
    finally:
        os.close(read_end)
        os.close(write_end)


def _remove_socket(path: str) -> None:
    """Remove the socket file at ``path`` if there is one (nothing else)."""
    import stat

    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


class DeviceFactory:
    """``l4v_device(TYPE, **options)``: an :class:`EmulatedDevice` served by its own process.

    ``start_timeout`` (seconds, default 30) bounds the wait for the emulator
    to listen.  ``devices`` lists the devices made so far in this test.
    """

    def __init__(self, tmp_path: Path, verbose: int, node: pytest.Item, lifeline: int) -> None:
        self.tmp_path = tmp_path
        self.lifeline = lifeline
        self.verbose = verbose
        self.devices: list[EmulatedDevice] = []
        self._counts: dict[str, int] = {}
        self._links = _Links()
        self._short_dir: str | None = None
        node.stash[_DEVICES] = self.devices

    def __call__(self, kind: str = "blk", *, start_timeout: float = START_TIMEOUT, **options: Any) -> EmulatedDevice:
        """Start a device of type ``kind`` with ``options`` and wait until it listens."""
        __tracebackhide__ = True
        caller = _describe_call("l4v_device", kind, options)
        kind = _check_kind("l4v_device", kind)
        options, known = _normalise("l4v_device", kind, options)
        n = self._counts.get(kind, 0)
        self._counts[kind] = n + 1
        name = f"{kind}{n}"
        socket = self._socket_path(f"l4v-{name}.sock")
        emu = dict(options)
        if emu.get("link") is not None:
            emu["link"] = self._links.map(emu["link"])
        if kind == "console" and emu.get("io") is None and not _flag_value(caller, "pty", emu.get("pty") or False):
            emu["io"] = "echo"  # not the terminal of the test run (emulate's default for a console)
        image = None
        if kind == "blk":
            if emu.get("image") is None:
                image = str(self.tmp_path / f"l4v-{name}.img")
                self._make_image(caller, image, emu.get("size"))
                emu["image"] = image
            else:
                image = os.fspath(emu["image"])
        argv = ["emulate", kind, "--socket", socket, *_emulate_args(caller, emu, known)]
        if self.verbose:
            argv.append("-" + "v" * min(self.verbose, 2))
        dev = EmulatedDevice(kind, name, socket, image, options, argv, self.tmp_path / f"l4v-{name}.log",
                             self.tmp_path / f"l4v-{name}.out", caller, start_timeout, self.lifeline)  # fmt: skip
        self.devices.append(dev)  # torn down even if it does not start
        dev.start()
        return dev

    def _socket_path(self, filename: str) -> str:
        path = str(self.tmp_path / filename)
        if len(path.encode()) <= MAX_SOCKET_PATH:
            return path
        if self._short_dir is None:
            import tempfile

            self._short_dir = tempfile.mkdtemp(prefix="l4v-", dir="/tmp" if os.path.isdir("/tmp") else None)
        return os.path.join(self._short_dir, filename)

    @staticmethod
    def _make_image(caller: str, path: str, size: Any) -> None:
        """A sparse image of ``size`` (64 MiB by default) for a block device the test gave none."""
        from l4vctl.parsing import parse_size

        try:
            nbytes = parse_size(size) if size is not None else 64 << 20
        except ValueError as exc:
            raise L4vDeviceError(f"{caller}: size: {exc}") from None
        with open(path, "wb") as f:
            f.truncate(nbytes)

    def close(self) -> None:
        """Tear every device down, newest first; the first error is raised after all are down."""
        error: BaseException | None = None
        for dev in reversed(self.devices):  # the list stays: failure reports of teardown show the logs
            try:
                dev.close()
            except BaseException as exc:
                error = error or exc
        if self._short_dir is not None:
            import shutil

            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None
        if error is not None:
            raise error


@pytest.fixture
def l4v_device(request: pytest.FixtureRequest, tmp_path: Path, _l4v_lifeline: int) -> Iterator[DeviceFactory]:
    """``l4v_device("blk", size="1M", inject=...)``: a device served by its own ``l4vctl emulate`` process.

    ``dev = l4v_device("blk", size="1M", abi="classic")``, also "net",
    "console", "rng"; keywords are the options of ``l4vctl emulate`` with
    ``_`` for ``-`` (``cmd_mode=True``, ``features=[...]``, ``image=PATH``,
    ``ro=True``, ``profile=NAME``, ``inject="FAULT"`` or a list of faults:
    ``pytest --l4v-faults`` lists them).  The device has ``.url``,
    ``.socket``, ``.image`` (blk: made in tmp_path unless given), ``.log``,
    ``.inject``, ``.process``, ``.session(handshake=False, **kw)``,
    ``.stats()``, ``.stop()``, ``.kill()``, ``.restart()``, ``.wait()``.  A
    console talks to an echo unless ``io=`` says otherwise; ``link=NAME``
    cables are private to the test.  Everything is stopped and removed at
    teardown.
    """
    factory = DeviceFactory(tmp_path, request.config.getoption("l4v_verbose", 0) or 0, request.node, _l4v_lifeline)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def l4v_session(l4v_device: DeviceFactory) -> Callable[..., Session]:
    """``l4v_session("blk", size="1M", want=...)``: a Session handshaken on a fresh device of ``l4v_device``.

    ``s = l4v_session("blk", size="1M")``: device options as for
    ``l4v_device``; ``want``, ``require``, ``refuse`` and ``queue_size`` go to
    the handshake, ``session_options={...}`` to ``Session`` (``timeout``,
    ``mode`` ...).  The device is ``l4v_device.devices[-1]``.  A handshake
    that fails raises (``NegotiationError`` for ``inject="refuse-features-ok"``).
    """

    def make(kind: str = "blk", *, want: Any = None, require: Iterable[Any] = (), refuse: Iterable[Any] = (),
             queue_size: int | None = None, session_options: dict[str, Any] | None = None,
             **device_options: Any) -> Session:  # fmt: skip
        __tracebackhide__ = True
        dev = l4v_device(kind, **device_options)
        return dev.session(True, want=want, require=require, refuse=refuse, queue_size=queue_size,
                           **(session_options or {}))  # fmt: skip

    return make


# -- emu: devices ---------------------------------------------------------------------------------------


class EmuDevice:
    """An ``emu:`` device URL: each session builds the device anew, in a process forked from the test's.

    No emulator process is started until a session opens; a monitor session
    (``role="monitor"``) is served inside the test process.
    """

    def __init__(self, kind: str, url: str, options: dict[str, Any], sessions: list[Session]) -> None:
        self.kind = kind
        self.url = url
        self.options = options
        self.inject: list[str] = _items(options.get("inject"))
        self._sessions = sessions

    def __repr__(self) -> str:
        return f"<EmuDevice {self.url}>"

    def session(self, handshake: bool = False, *, want: Any = None, require: Iterable[Any] = (),
                refuse: Iterable[Any] = (), queues: bool = True, queue_size: int | None = None,
                **session_options: Any) -> Session:  # fmt: skip
        """A Session on a new instance of the device, as :meth:`EmulatedDevice.session`."""
        __tracebackhide__ = True
        hs = {"want": want, "require": require, "refuse": refuse, "queues": queues, "queue_size": queue_size}
        return _open_session(self.url, self._sessions, handshake, hs, session_options)


class EmuFactory:
    """``l4v_emu(TYPE, **options)``: an :class:`EmuDevice` with the options of ``l4v_device``."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self._links = _Links()

    def __call__(self, kind: str = "blk", **options: Any) -> EmuDevice:
        """The ``emu:`` URL of a device of type ``kind`` with ``options`` (checked here, built per session)."""
        __tracebackhide__ = True
        from urllib.parse import quote

        caller = _describe_call("l4v_emu", kind, options)
        kind = _check_kind("l4v_emu", kind)
        options, known = _normalise("l4v_emu", kind, options)
        bad = [k for k in SERVER_OPTIONS if k in options]
        if bad:
            raise L4vDeviceError(f"{caller}: {', '.join(bad)}: an option of emulator processes (use l4v_device)")
        query = []
        for name, value in options.items():
            if value is None:
                continue
            if name == "link":
                value = self._links.map(value)
            if known[name]:
                text = "1" if _flag_value(caller, name, value) else "0"
            elif name in ("features", "inject"):
                text = ",".join(_items(value))
            else:
                text = os.fspath(value) if hasattr(value, "__fspath__") else str(value)
            query.append(f"{quote(name)}={quote(text, safe=',=:/')}")
        url = f"emu:{kind}" + ("?" + "&".join(query) if query else "")
        return EmuDevice(kind, url, options, self.sessions)

    def close(self) -> None:
        """Close every session (each one reaps the emulator it forked)."""
        _close_sessions(self.sessions)


@pytest.fixture
def l4v_emu() -> Iterator[EmuFactory]:
    """``l4v_emu("blk", size="1M").session(handshake=True)``: an ``emu:`` device, forked for each session.

    Options as for ``l4v_device`` (not the server ones); no emulator process
    is started until a session opens, and each session gets a new device
    served by a process forked from the test process.  Sessions are closed
    (and their emulators reaped) at teardown.
    """
    factory = EmuFactory()
    try:
        yield factory
    finally:
        factory.close()
