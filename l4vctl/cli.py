"""The ``l4vctl`` command: a click group whose subcommands load lazily.

``main()`` runs the group and maps every failure to one line on stderr and a
documented exit code (see :mod:`l4vctl.errors`).  A traceback is printed only
with ``--debug``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from l4vctl import __version__
from l4vctl.commands._common import Group, OutputFile
from l4vctl.errors import EXIT_CODES, EXIT_INTERRUPTED, L4vError

#: name -> (module, attribute, one-line help).  The help text lives here so
#: that ``l4vctl --help`` does not import any command module.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "backends": (
        "l4vctl.commands.backends",
        "backends",
        "List the device URL schemes and whether each is available here.",
    ),
    "check": (
        "l4vctl.commands.check",
        "check",
        "Check a device server against the transport rules: good and hostile driver cases, with verdicts.",
    ),
    "devices": (
        "l4vctl.commands.devices",
        "devices",
        "List the devices an L4Re agent holds (l4re: links), with id, class and status.",
    ),
    "diagnose": (
        "l4vctl.commands.diagnose",
        "diagnose",
        "Say why a device or queue is stuck (stalled, unsignalled, kick suppressed, ...), with the evidence.",
    ),
    "emulate": (
        "l4vctl.commands.emulate",
        "emulate",
        "Serve emulated L4-VIRTIO devices (blk, net, console, rng) on Unix sockets, one or many per process.",
    ),
    "net": (
        "l4vctl.commands.net",
        "net",
        "Network I/O: send, recv and ping Ethernet frames over virtual cables.",
    ),
    "negotiate": (
        "l4vctl.commands.negotiate",
        "negotiate",
        "Run the driver handshake to DRIVER_OK and show features and status writes.",
    ),
    "probe": (
        "l4vctl.commands.probe",
        "probe",
        "Identify a device: id, vendor, ABI, queues, offered features, status.",
    ),
    "queue-stats": (
        "l4vctl.commands.queue_stats",
        "queue_stats",
        "Show every queue: size, addresses, ring indices, requests in flight.",
    ),
    "queue-show": (
        "l4vctl.commands.queue_show",
        "queue_show",
        "Show a queue's descriptor chains in flight: buffers, flags, decoded requests.",
    ),
    "bench": (
        "l4vctl.commands.bench",
        "bench",
        "Block I/O load (randread, seqread, randwrite, seqwrite): req/s, MB/s, latency.",
    ),
    "blk": (
        "l4vctl.commands.blk",
        "blk",
        "Block device I/O: read, write, flush, id, discard, write-zeroes.",
    ),
    "console": (
        "l4vctl.commands.console",
        "console",
        "Console I/O: interactive (Ctrl-] leaves), or send and recv for scripts.",
    ),
    "dump-config": (
        "l4vctl.commands.dump_config",
        "dump_config",
        "Decode a config page: header, status, features, device config, queues.",
    ),
    "rng": (
        "l4vctl.commands.rng",
        "rng",
        "Read entropy from an rng device.",
    ),
    "trace": (
        "l4vctl.commands.trace",
        "trace",
        "Show a recorded session (trace+URL, --trace) as a timeline, or replay it against a device.",
    ),
    "layout": (
        "l4vctl.commands.layout",
        "layout",
        "Show every L4-VIRTIO struct with field offsets, sizes and meanings.",
    ),
}

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _exit_status_epilog() -> str:
    lines = ["\b", "Exit status:"]
    lines += [f"  {code:>3}  {text}" for code, text in EXIT_CODES]
    return "\n".join(lines)


class LazyGroup(Group):
    """A group that imports a subcommand's module only when it runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every subcommand name, sorted, without importing any of them."""
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        """The subcommand ``name``, importing its module; None for an unknown name."""
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        module, attr, _help = entry
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The help's command list, from the registry's short help texts (no imports)."""
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--version, as click's version_option says it (which would run gettext, and import locale, at start-up)."""
    if value and not ctx.resilient_parsing:
        click.echo(f"l4vctl, version {__version__}", color=ctx.color)
        ctx.exit()


class Settings:
    """Root options, available to subcommands as ``ctx.obj``."""

    def __init__(self, debug: bool = False, color: str = "auto"):
        self.debug = debug
        self.color = color


@click.group(
    cls=LazyGroup,
    context_settings=CONTEXT_SETTINGS,
    epilog=_exit_status_epilog(),
)
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version and exit.")  # fmt: skip
@click.option(
    "--debug",
    is_flag=True,
    envvar="L4VCTL_DEBUG",
    help="Show a Python traceback when a command fails.",
)
@click.option(
    "--color",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Colour in text output; auto = only on a terminal and without NO_COLOR.",
)
@click.option(
    "--trace",
    "trace_file",
    type=OutputFile(),
    envvar="L4VCTL_TRACE",
    metavar="FILE",
    help="Record every transport step of the command's device sessions in FILE (JSON lines; "
    "see 'l4vctl trace'). The same as giving each device as trace+URL?trace=FILE.",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool, color: str, trace_file: str | None) -> None:
    """Inspect and drive L4-VIRTIO devices.

    L4-VIRTIO is the virtio transport of the L4Re microkernel runtime: the
    device config lives in a shared page, payload memory is lent as
    dataspaces and notifications are IRQs.  Every command prints text for
    people and, with --json, one JSON envelope for scripts.

    \b
    Devices are named by URLs:
      emu:TYPE[?OPT=VALUE&...]    an emulator started for one command
                                  (blk, net, console, rng)
      unix:PATH                   a running 'l4vctl emulate TYPE --socket PATH'
      vhost-user:PATH[?type=T]    a vhost-user back-end (qemu-storage-daemon,
                                  testpmd); T: blk, net, rng or console, as
                                  the device type is unknown without ?type=
      dump:FILE, or a plain FILE  a saved config page (read-only)
      trace+URL[?trace=FILE]      any live URL above, every transport step
                                  recorded (l4vctl trace show/replay)

    Run 'l4vctl COMMAND --help' for the options and examples of a command,
    'l4vctl backends' for the schemes that work here.
    """
    ctx.obj = Settings(debug=debug, color=color)
    if trace_file:
        import l4vctl.backends

        l4vctl.backends.TRACE_FILE = trace_file
        ctx.call_on_close(lambda: setattr(l4vctl.backends, "TRACE_FILE", None))  # for this command only
    if debug:  # let embedded emulators log what they do
        os.environ.setdefault("L4VCTL_EMU_LOG", "INFO")


def _scan(argv: list[str]) -> tuple[bool, bool, str]:
    """--json, --debug and the subcommand name, read from raw arguments.

    Used to report errors that happen before click has parsed everything.
    """
    json_mode = debug = False
    command = ""
    for arg in argv:
        if arg == "--":
            break
        if arg == "--json":
            json_mode = True
        elif arg == "--debug":
            debug = True
        elif not command and arg in COMMANDS:
            command = arg
    if os.environ.get("L4VCTL_DEBUG"):
        debug = True
    return json_mode, debug, command


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code.

    Run as the program itself (the ``l4vctl`` console script or ``python -m
    l4vctl``, with the arguments of the command line), it ends the process
    when the command is done instead of returning: see :func:`_exit_now`.
    Called with ``argv``, or from other code, it always returns.
    """
    code = _run(argv)
    if argv is None and _called_as_program(sys._getframe(1)):
        _exit_now(code)
    return code


def _run(argv: list[str] | None) -> int:
    from l4vctl import output
    from l4vctl.commands import _common

    _common.reset()
    backends: Any = sys.modules.get("l4vctl.backends")
    if backends is not None:
        backends.TRACE_FILE = None  # --trace applies to one run
    args = list(sys.argv[1:] if argv is None else argv)
    json_mode, debug, command = _scan(args)
    out = output.Output(command or "l4vctl", json_mode=json_mode)
    try:
        code = cli.main(args=args, prog_name="l4vctl", standalone_mode=False)
        # ctx.exit(N) of a command that wrote its result comes back here as N (not raised)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort as exc:
        message = "aborted: end of input" if isinstance(exc.__cause__, EOFError) else "interrupted"
        _current_output(out).fail("interrupted", message, EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        # --json promises an envelope on every failure, Ctrl-C included
        _current_output(out).fail("interrupted", "interrupted", EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except _NO_ARGS as exc:
        # 'l4vctl' or 'l4vctl blk' alone: asking for help is not an error
        sys.stdout.write(exc.ctx.get_help() + "\n")
        sys.stdout.flush()
        return 0
    except click.UsageError as exc:
        hint = None
        if exc.ctx is not None:
            hint = f"see '{exc.ctx.command_path} --help'"
        out.fail("usage", exc.format_message(), 2, hint)
        return 2
    except click.ClickException as exc:
        out.fail("usage", exc.format_message(), exc.exit_code)
        return exc.exit_code
    except L4vError as exc:
        _current_output(out).fail(exc.type, exc.message, exc.exit_code, exc.hint)
        if debug:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (l4vctl ... | head): not an error of ours.
        _silence_stdout()
        return 0
    except Exception as exc:
        hint = None if debug else "a bug in l4vctl; --debug shows a traceback"
        _current_output(out).fail("internal", f"internal error: {type(exc).__name__}: {exc}", 1, hint)
        if debug:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        return 1


#: click's "a group was called without a command" (click 8.2 and later).
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _current_output(fallback):
    """The Output of the running command (it knows device and abi), else fallback."""
    from l4vctl.commands import _common

    return _common.current_output() or fallback


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# -- leaving the process ------------------------------------------------------------------------


def _called_as_program(caller: Any) -> bool:
    """Whether ``main()`` was called by the program's own entry point, about to exit with its result.

    That is the top level of the ``__main__`` module, which imported this
    ``main`` and is either ``l4vctl/__main__.py`` (``python -m l4vctl``) or a
    console script named ``l4vctl``; and nobody traces or profiles the
    process (a debugger, a profiler printing its report at the end).
    """
    top = sys.modules.get("__main__")
    if top is None or caller.f_globals is not getattr(top, "__dict__", None) or caller.f_code.co_name != "<module>":
        return False
    if getattr(top, "main", None) is not main or sys.gettrace() is not None or sys.getprofile() is not None:
        return False
    spec = getattr(top, "__spec__", None)
    if spec is not None:
        return spec.name == "l4vctl.__main__"
    return os.path.basename(getattr(top, "__file__", None) or "") == "l4vctl"


def _exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown (10 ms and more).

    What the teardown would do that matters is done first: an emulator child
    still running is reaped, atexit handlers run (weakref finalizers, temporary
    directories, logging), standard output and error are flushed (a failed
    flush is reported like a failed write).  If a thread that is not a daemon
    still runs, this returns and the interpreter waits for it as usual.
    """
    unix = sys.modules.get("l4vctl.backends.unix")
    if unix is not None:
        for sock in list(unix.OPEN_CHANNELS):  # an emulator child ends when its connection closes
            sock.close()
    emu = sys.modules.get("l4vctl.backends.emu")
    if emu is not None:
        for backend in list(emu.LIVE):
            try:
                backend.close()  # reaps it
            except Exception:
                pass
    threading = sys.modules.get("threading")
    if threading is not None:
        main_thread = threading.main_thread()
        if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
            return
    import atexit

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None:
        return  # no way to run them here: leave it to the interpreter
    run_exitfuncs()
    code = _flush_output(code)
    os._exit(code & 0xFF)


def _flush_output(code: int) -> int:
    """Flush stdout and stderr; the exit code to leave with (1 if output that was due could not be written)."""
    for stream in dict.fromkeys((sys.stdout, sys.__stdout__)):
        if stream is None:
            continue
        try:
            stream.flush()
        except BrokenPipeError:
            _silence_stdout()  # the reader went away (l4vctl ... | head): not an error of ours
        except ValueError:
            pass  # closed
        except OSError as exc:
            if code == 0:  # else the failure was reported already (a write of the command failed too)
                try:
                    sys.stderr.write(f"l4vctl: error: cannot write the output: {exc.strerror or exc}\n")
                except (OSError, ValueError):
                    pass
                code = 1
    for stream in dict.fromkeys((sys.stderr, sys.__stderr__)):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    return code
