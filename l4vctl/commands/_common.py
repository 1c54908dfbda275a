"""Options and helpers shared by every subcommand."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from l4vctl.output import Output

if TYPE_CHECKING:
    from l4vctl.session import Session

_current: Output | None = None

#: What -h/--help says (click's text).
HELP_OPTION_TEXT = "Show this message and exit."


def _show_help(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(ctx.get_help(), color=ctx.color)
        ctx.exit()


class Command(click.Command):
    """A click command whose -h/--help is made here.

    click's own help option translates its text through gettext whenever a
    command runs, and gettext imports locale (a millisecond of every
    command's start-up) although no command needs it unless help is shown.
    """

    _plain_help: click.Option | None = None

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        """The -h/--help option (one object per command: click orders eager options by identity)."""
        names = self.get_help_option_names(ctx)
        if not names or not self.add_help_option:
            return None
        if self._plain_help is None:
            self._plain_help = click.Option(names, is_flag=True, expose_value=False, is_eager=True,
                                            help=HELP_OPTION_TEXT, callback=_show_help)  # fmt: skip
        return self._plain_help


class OutputFile(click.ParamType):
    """A file to write: ``click.Path(dir_okay=False, writable=True)``, same checks and messages,
    but without the gettext call (and locale import) click.Path makes when a command is defined."""

    name = "file"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The path, unless it names a directory or a file that cannot be read and written."""
        import os
        import stat

        try:
            st = os.stat(value)
        except OSError:
            return value  # it need not exist
        shown = click.format_filename(value)
        if stat.S_ISDIR(st.st_mode):
            self.fail(f"File {shown!r} is a directory.", param, ctx)
        if not os.access(value, os.R_OK):
            self.fail(f"File {shown!r} is not readable.", param, ctx)
        if not os.access(value, os.W_OK):
            self.fail(f"File {shown!r} is not writable.", param, ctx)
        return value

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        """Complete file names (as click.Path does)."""
        from click.shell_completion import CompletionItem

        return [CompletionItem(incomplete, type="file")]


class Group(Command, click.Group):
    """A click group whose subcommands (and their help options) are :class:`Command` ones."""

    command_class = Command
    group_class = type  # subgroups are of this group's class


def current_output() -> Output | None:
    """The Output of the command that is running, if one started."""
    return _current


def reset() -> None:
    global _current
    _current = None


def begin(ctx: click.Context, command: str, json_mode: bool) -> Output:
    """Create the command's Output and make it the one errors are reported on."""
    global _current
    settings = ctx.find_root().obj
    color = getattr(settings, "color", "auto")
    _current = Output(command, json_mode=json_mode, color=color)
    return _current


def json_option(f):
    return click.option(
        "--json",
        "json_mode",
        is_flag=True,
        help="Print one JSON envelope on stdout instead of text.",
    )(f)


def _no_page_abi(ctx, param, value):
    return "current" if value == "auto" else value


class _FromEnvironment(str):
    """An option value that came from an environment variable, which it names."""

    origin = "--abi"


def _page_abi(ctx, param, value):
    """Mark an ABI set by L4VCTL_ABI, so that outputs say where the choice came from."""
    from click.core import ParameterSource

    if value != "auto" and ctx.get_parameter_source(param.name) == ParameterSource.ENVIRONMENT:
        marked = _FromEnvironment(value)
        marked.origin = param.envvar
        return marked
    return value


def abi_option(*, auto: bool):
    """--abi (also L4VCTL_ABI).  ``auto`` guesses from the page; commands
    without a page (``auto=False``) treat it as the default, current."""
    from l4vctl.catalog import ABIS, DEFAULT_ABI

    choices = [*ABIS, "auto"]
    default = "auto" if auto else DEFAULT_ABI
    text = (
        "Header layout era: classic (l4virtio before 2024-01: feature maps at "
        "0xA8/0xC8, cmd at 0xF8) or current (shm fields at 0xAC, maps at 0xC0/0xE0, "
        "cmd at 0x7C)."
    )
    if auto:
        text += " auto guesses from the page and says why."
    else:
        text += " auto means current here (there is no page to guess from)."
    return click.option(
        "--abi",
        type=click.Choice(choices),
        default=default,
        show_default=True,
        envvar="L4VCTL_ABI",
        help=text,
        callback=_page_abi if auto else _no_page_abi,
    )


def _keep_attach(ctx, param, value):
    ctx.meta["l4vctl.attach"] = value
    return value


def attach_option(f):
    """--attach (also L4VCTL_ATTACH): how a driver attaches; kept in ``ctx.meta`` for :func:`attach_of`."""
    return click.option(
        "--attach",
        type=click.Choice(["auto", "config", "iface"]),
        default="auto",
        show_default=True,
        envvar="L4VCTL_ATTACH",
        expose_value=False,
        callback=_keep_attach,
        help="How the driver attaches: config = DEVICE_CONFIG + GET_DEVICE_IRQ + ICU bind, iface = "
        "REGISTER_IFACE (classic-era devices before 2022-09); auto = DEVICE_CONFIG, and REGISTER_IFACE "
        "if the device answers -L4_ENOSYS.",
    )(f)


def attach_of(ctx: click.Context) -> str:
    return ctx.meta.get("l4vctl.attach", "auto")


def examples(*pairs: tuple[str, str]) -> str:
    """An epilog listing examples; also read by the man page generator."""
    lines = ["\b", "Examples:"]
    for command, text in pairs:
        lines.append(f"  {text}")
        lines.append(f"    $ {command}")
    return "\n".join(lines)


def parse_examples(epilog: str | None) -> list[tuple[str, str]]:
    """The (command, description) pairs of an epilog made by :func:`examples`."""
    if not epilog:
        return []
    out = []
    text = None
    for line in epilog.splitlines():
        stripped = line.strip()
        if stripped.startswith("$ "):
            out.append((stripped[2:], text or ""))
            text = None
        elif stripped and stripped not in ("\b", "Examples:"):
            text = stripped
    return out


DEVICE_HELP = (
    "Device URL: emu:TYPE[?opt=value&...] (an emulator started for this command), "
    "unix:PATH (a running 'l4vctl emulate'), vhost-user:PATH[?type=blk] (a vhost-user back-end "
    "such as qemu-storage-daemon; without ?type= its device type is unknown), "
    "l4re:LINK?dev=NAME (a real device in L4Re through l4vagent; LINK: unix:PATH, tcp:HOST:PORT, serial:DEV), "
    "dump:FILE or a plain file (a saved page); trace+URL[?trace=FILE] records the session of any live URL "
    "(l4vctl trace). Default: $L4VCTL_DEVICE, else emu:blk."
)


def device_options(f):
    """[DEVICE] argument plus -d/--device (and L4VCTL_DEVICE)."""
    f = click.option("-d", "--device", "device_opt", envvar="L4VCTL_DEVICE", metavar="URL", help=DEVICE_HELP)(f)
    f = click.argument("device", required=False, metavar="[DEVICE]")(f)
    return f


def resolve_device(ctx: click.Context, device: str | None, device_opt: str | None) -> str:
    """The device URL: the argument, else -d, else $L4VCTL_DEVICE, else emu:blk."""
    from click.core import ParameterSource

    from l4vctl.backends import DEFAULT_DEVICE
    from l4vctl.errors import UsageError

    from_env = ctx.get_parameter_source("device_opt") == ParameterSource.ENVIRONMENT
    if device and device_opt and device != device_opt and not from_env:
        raise UsageError(f"two devices given: {device!r} and -d {device_opt!r}")
    return device or device_opt or DEFAULT_DEVICE


class Seconds(click.FloatRange):
    """A FloatRange that also refuses NaN (which every range comparison lets through)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        rv = super().convert(value, param, ctx)
        if rv != rv:
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return rv


def timeout_option(f):
    return click.option(
        "--timeout",
        type=Seconds(min=0.001),
        default=5.0,
        show_default=True,
        metavar="SECONDS",
        help="Longest wait for any answer from the device.",
    )(f)


def queue_stride_option(f):
    from l4vctl.catalog import QUEUE_ENTRY_STRIDE, QUEUE_ENTRY_STRIDE_I386

    return click.option(
        "--queue-stride",
        type=click.Choice([str(QUEUE_ENTRY_STRIDE), str(QUEUE_ENTRY_STRIDE_I386)]),
        default=str(QUEUE_ENTRY_STRIDE),
        show_default=True,
        help="Size of a queue-config entry: 40 (64-bit and ARM peers) or 36 (32-bit x86 peers).",
    )(f)


def io_options(f):
    """The options of every command that drives a device: device, --abi, --mode, --timeout, --json."""
    f = json_option(f)
    f = timeout_option(f)
    from l4vctl.catalog import MODES, Mode

    f = click.option(
        "--mode",
        type=click.Choice(MODES),
        default=Mode.AUTO.value,
        show_default=True,
        help="Status and queue setup by IPC or through the cmd word (auto: cmd if offered).",
    )(f)
    f = attach_option(f)
    f = abi_option(auto=True)(f)
    f = device_options(f)
    return f


class Driven:
    """A session brought to DRIVER_OK for an I/O command (a context manager).

    Entering it opens the session, refuses a device of another class than
    ``device_class`` (the command's first word unless given) and does the
    handshake; leaving it closes the session.
    """

    def __init__(self, ctx: click.Context, command: str, json_mode: bool, device: str | None,
                 device_opt: str | None, abi: str, mode: str, timeout: float,
                 device_class: str | None = None, **handshake: Any) -> None:  # fmt: skip
        self.url = resolve_device(ctx, device, device_opt)
        self.out = begin(ctx, command, json_mode)
        self.out.device = self.url
        self.command = command
        self.args: dict[str, Any] = dict(abi=abi, mode=mode, timeout=timeout, attach=attach_of(ctx))
        self.device_class = device_class or command.split()[0]
        self.handshake = handshake
        self.session: Session | None = None

    def __enter__(self) -> Session:
        from l4vctl.drivers import require_class
        from l4vctl.session import Session

        self.session = Session(self.url, **self.args)
        try:
            self.session.open()
            self.out.abi = self.session.abi
            # before the handshake: a device of another class gets no request at all
            require_class(self.session, self.device_class, f"'l4vctl {self.command}'")
            self.session.handshake(**self.handshake)
        except BaseException:
            self.session.close()
            raise
        return self.session

    def __exit__(self, *exc: object) -> None:
        if self.session is not None:
            self.session.close()


class Progress:
    """A progress bar on stderr for long transfers, only on a terminal (a context manager).

    Entering it gives the function to call with each byte count done, or
    None when no bar is shown.
    """

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        import sys

        self.bar: Any = None
        if enabled and total >= (4 << 20) and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, TransferSpeedColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self.task = self.bar.add_task(label, total=total)

    def __enter__(self) -> Callable[[int], None] | None:
        if self.bar is not None:
            self.bar.start()
        return self.advance if self.bar is not None else None

    def advance(self, n: int) -> None:
        """Count ``n`` more bytes done."""
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def write_output(path: str, data) -> None:
    """Write a command's data file; a file that cannot be written is 'unavailable'."""
    from l4vctl.errors import UnavailableError

    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise UnavailableError(f"{path}: {exc.strerror or exc}") from None
