"""``l4vctl rng``: entropy from an rng device."""

from __future__ import annotations

import hashlib
import sys

import click

from l4vctl.commands._common import Driven, Group, Progress, examples, io_options, write_output


@click.group(cls=Group, epilog=examples(("l4vctl rng read emu:rng --bytes 32", "32 bytes of entropy as hex:")))
def rng():
    """Entropy device I/O through a real virtqueue."""


@rng.command(
    epilog=examples(
        ("l4vctl rng read emu:rng --bytes 32", "32 bytes as hex:"),
        ("l4vctl rng read unix:/tmp/rng.sock --bytes 1M -o random.bin", "A MiB into a file:"),
    )
)
@io_options
@click.option("--bytes", "nbytes", required=True, metavar="N", help="How many bytes (suffixes K, M allowed).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the bytes to this file.")
@click.option("--raw", is_flag=True, help="Raw bytes on stdout even on a terminal (default there: hex).")
@click.pass_context
def read(ctx, device, device_opt, abi, mode, timeout, json_mode, nbytes, output, raw):
    """Read bytes from the device's entropy source.

    On a terminal the bytes are printed as hex; into a pipe they are raw;
    with --json the result holds their hex (up to 64 KiB) and SHA-256.
    """
    from l4vctl.drivers.rng import RngDriver
    from l4vctl.errors import UsageError
    from l4vctl.parsing import parse_size

    try:
        n = parse_size(nbytes)
    except ValueError as exc:
        raise UsageError(f"--bytes: {exc}") from None
    run = Driven(ctx, "rng read", json_mode, device, device_opt, abi, mode, timeout)
    with run as s:
        with Progress(n, "reading") as tick:
            data = RngDriver(s).read(n, progress=tick)
    result = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if output:
        write_output(output, data)
        result["output"] = output
    elif json_mode and len(data) <= 65536:
        result["hex"] = data.hex()
    if json_mode or output:
        run.out.emit(result, lambda: f"wrote {len(data)} bytes to {output}\n")
        return
    if sys.stdout.isatty() and not raw:
        sys.stdout.write(data.hex() + "\n")
    else:
        sys.stdout.buffer.write(data)
    sys.stdout.flush()
