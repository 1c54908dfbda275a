"""``l4vctl console``: talk to port 0 of a console device."""

from __future__ import annotations

import os
import sys
import time

import click

from l4vctl.commands._common import Driven, Group, examples, io_options
from l4vctl.errors import UnavailableError, UsageError

ESCAPE = b"\x1d"  # Ctrl-]


class ConsoleGroup(Group):
    """``l4vctl console URL`` means ``l4vctl console attach URL``."""

    def resolve_command(self, ctx, args):
        """Resolve as click does, after putting ``attach`` in front of a URL."""
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["attach", *args]
        return super().resolve_command(ctx, args)

    def parse_args(self, ctx, args):
        """Parse as click does, after putting ``attach`` in front of a URL."""
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["attach", *args]
        return super().parse_args(ctx, args)


@click.group(
    cls=ConsoleGroup,
    epilog=examples(
        ("l4vctl console emu:console", "Type into an echoing console (Ctrl-] leaves):"),
        ("l4vctl console send unix:/tmp/con.sock 'help' --newline", "Send a line from a script:"),
        ("l4vctl console recv unix:/tmp/con.sock --until '$ ' --wait 5", "Read until a prompt shows up:"),
    ),
)
def console():
    """Console I/O through real virtqueues (port 0: queues 0 and 1).

    'l4vctl console DEVICE' is interactive: your keystrokes go to the device,
    its output comes to your terminal; Ctrl-] leaves.  'send' and 'recv'
    are for scripts.
    """


def _driver(s, rx_buffers: int | None = None):
    from l4vctl.drivers.console import ConsoleDriver

    return ConsoleDriver(s, rx_buffers=rx_buffers)


@console.command(epilog=examples(("l4vctl console attach unix:/tmp/con.sock", "Same as 'l4vctl console URL':")))
@io_options
@click.pass_context
def attach(ctx, device, device_opt, abi, mode, timeout, json_mode):
    """Interactive session with port 0 (Ctrl-] leaves)."""
    from l4vctl.output import info

    run = Driven(ctx, "console", json_mode, device, device_opt, abi, mode, timeout)
    with run as s:
        drv = _driver(s)
        irq = s.driver_irq
        assert irq is not None  # a driver runs on an attached session
        fd = sys.stdin.fileno()
        restore = None
        if os.isatty(fd):
            import termios
            import tty

            restore = termios.tcgetattr(fd)
            tty.setraw(fd)
            info(f"connected to {run.url}; Ctrl-] leaves\r")
        sent = received = 0
        try:
            open_input = True
            while True:
                ready = drv.wait_readable([fd] if open_input else [], 0.2)
                if fd in ready:
                    data = os.read(fd, 4096)
                    if not data:
                        open_input = False
                        end = time.monotonic() + 0.3  # let the last answers arrive
                    else:
                        cut = data.find(ESCAPE)
                        if cut >= 0:
                            data = data[:cut]
                        if data:
                            drv.send(data)
                            sent += len(data)
                        if cut >= 0:
                            break
                out = drv.poll()
                if drv.fileno() in ready:
                    irq.drain()
                if out:
                    os.write(sys.stdout.fileno(), out)
                    received += len(out)
                if not open_input and time.monotonic() > end:
                    break
                s.check_device()
        finally:
            if restore is not None:
                import termios

                termios.tcsetattr(fd, termios.TCSADRAIN, restore)
                sys.stderr.write("\n")
    if json_mode:
        run.out.emit({"sent": sent, "received": received}, str)


@console.command(epilog=examples(("l4vctl console send emu:console hello --newline", "A line of text:")))
@io_options
@click.argument("text", required=False)
@click.option("-i", "--input", "input_path", type=click.Path(dir_okay=False), help="Send this file ('-': stdin).")
@click.option("--newline", is_flag=True, help="Append a newline to TEXT.")
@click.pass_context
def send(ctx, device, device_opt, abi, mode, timeout, json_mode, text, input_path, newline):
    """Send TEXT (or a file) to port 0."""
    if (text is None) == (input_path is None):
        raise UsageError("give exactly one of TEXT and -i/--input")
    if text is not None:
        data = text.encode() + (b"\n" if newline else b"")
    else:
        try:
            if input_path == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(input_path, "rb") as f:
                    data = f.read()
        except OSError as exc:
            raise UnavailableError(f"{input_path}: {exc.strerror or exc}") from None
    run = Driven(ctx, "console send", json_mode, device, device_opt, abi, mode, timeout)
    with run as s:
        _driver(s).send(data)
    run.out.emit({"sent": len(data)}, lambda: "")


@console.command(
    epilog=examples(
        ("l4vctl console recv unix:/tmp/con.sock --bytes 100", "The next 100 bytes:"),
        ("l4vctl console recv unix:/tmp/con.sock --until login: --wait 10", "Until a login prompt:"),
    )
)
@io_options
@click.option("--bytes", "nbytes", type=click.IntRange(min=1), help="Stop after this many bytes.")
@click.option("--until", help="Stop once this text has arrived.")
@click.option("--wait", type=click.FloatRange(min=0), default=2.0, show_default=True, metavar="SECONDS",
              help="Stop when nothing arrives for this long.")  # fmt: skip
@click.option("--rx-buffers", type=click.IntRange(min=1), metavar="N",
              help="Receive buffers to post (default: as many as the receive queue holds; a console may "
                   "use one per byte of a burst, and L4Re's cons fails when it runs out).")  # fmt: skip
@click.pass_context
def recv(ctx, device, device_opt, abi, mode, timeout, json_mode, nbytes, until, wait, rx_buffers):
    """Receive what port 0 sends, to stdout.

    Stops after --bytes, once --until has been seen, or after --wait seconds
    of silence.  With --until, not seeing the text is a timeout (exit 7).
    """
    from l4vctl.errors import TimeoutExpired

    run = Driven(ctx, "console recv", json_mode, device, device_opt, abi, mode, timeout)
    got = bytearray()
    marker = until.encode() if until else None
    with run as s:
        drv = _driver(s, rx_buffers)
        while True:
            data = drv.receive(wait)
            if not data:
                break
            got += data
            if nbytes and len(got) >= nbytes:
                del got[nbytes:]
                break
            if marker and marker in got:
                break
    if marker and marker not in got:
        raise TimeoutExpired(f"{until!r} did not arrive ({len(got)} bytes received, then {wait:g} s of silence)")
    text = got.decode("utf-8", "replace")
    if json_mode:
        run.out.emit({"bytes": len(got), "text": text, "hex": got.hex()}, str)
        return
    sys.stdout.buffer.write(got)
    sys.stdout.flush()
