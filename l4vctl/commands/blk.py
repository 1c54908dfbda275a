"""``l4vctl blk``: read, write, flush, id, discard and write-zeroes on a block device."""

from __future__ import annotations

import hashlib
import sys

import click

from l4vctl.commands._common import Driven, Group, Progress, examples, io_options, write_output
from l4vctl.errors import UnavailableError, UsageError

SECTOR = 512


def _hexdump(data: bytes, base: int) -> str:
    from l4vctl.hexdump import format_hexdump

    lines = format_hexdump(data).splitlines()
    out = []
    for line in lines:
        head, _, rest = line.partition(" ")
        if head != "*" and all(c in "0123456789abcdef" for c in head):
            out.append(f"{int(head, 16) + base:08x}" + (" " + rest if rest else ""))
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _driver(s, **kw):
    from l4vctl.drivers.blk import BlkDriver

    return BlkDriver(s, **kw)


@click.group(
    cls=Group,
    epilog=examples(
        ("l4vctl blk read emu:blk --sector 0 --count 8", "The first 4 KiB as a hex dump:"),
        ("l4vctl blk write unix:/tmp/blk.sock --sector 2048 -i boot.img", "Write a file at 1 MiB:"),
        ("l4vctl blk read unix:/tmp/blk.sock --sector 2048 --count 64 -o back.img", "Read it back:"),
        ("l4vctl blk id unix:/tmp/blk.sock --json", "The device id for a script:"),
    ),
)
def blk():
    """Block device I/O through a real virtqueue.

    Each subcommand attaches as the driver, runs the handshake, sends its
    requests through queue 0 and reports what the device answered.  A request
    the device fails (IOERR, UNSUPP) ends with exit status 6 and the reason.
    """


def _range_checks(sector: int, count: int | None) -> None:
    if sector < 0:
        raise UsageError("--sector must not be negative")
    if count is not None and count < 0:
        raise UsageError("--count must not be negative")


@blk.command(
    epilog=examples(
        ("l4vctl blk read emu:blk --sector 0 --count 1", "One sector as a hex dump:"),
        ("l4vctl blk read unix:/tmp/blk.sock --sector 0 --count 2048 -o first-MiB.bin", "To a file:"),
    )
)
@io_options
@click.option("--sector", type=int, required=True, help="First 512-byte sector.")
@click.option("--count", type=int, required=True, help="Number of sectors.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the data to this file.")
@click.option("--hex", "as_hex", is_flag=True, help="Print a hex dump (the default on a terminal).")
@click.option("--depth", type=click.IntRange(1, 1024), default=32, show_default=True, help="Requests in flight.")
@click.pass_context
def read(ctx, device, device_opt, abi, mode, timeout, json_mode, sector, count, output, as_hex, depth):
    """Read sectors: to a file, as a hex dump, or raw to a pipe.

    Without -o, the data goes to stdout: as a hex dump on a terminal or with
    --hex, as raw bytes into a pipe.  With --json the result carries the
    SHA-256 of the data and, up to 64 KiB, the data as hex.
    """
    _range_checks(sector, count)
    run = Driven(ctx, "blk read", json_mode, device, device_opt, abi, mode, timeout)
    with run as s:
        drv = _driver(s, depth=depth)
        with Progress(count * SECTOR, "reading") as tick:
            data = drv.read(sector, count * SECTOR, progress=tick)
    o = run.out
    result = {"sector": sector, "count": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if output:
        write_output(output, data)
        result["output"] = output
    if json_mode:
        if len(data) <= 65536 and not output:
            result["hex"] = bytes(data).hex()
        o.emit(result, str)
        return
    if output:
        from l4vctl.output import info

        info(f"read {len(data)} bytes from sector {sector} into {output}")
        return
    if as_hex or sys.stdout.isatty():
        sys.stdout.write(_hexdump(bytes(data), sector * SECTOR))
    else:
        sys.stdout.buffer.write(data)
    sys.stdout.flush()


def _pattern(text: str) -> bytes:
    t = text[2:] if text.lower().startswith("0x") else text
    try:
        raw = bytes.fromhex(t)
    except ValueError:
        raw = b""
    if not raw:
        raise UsageError(f"--pattern {text!r} is not hex bytes (like 0xa5 or deadbeef)")
    return raw


@blk.command(
    epilog=examples(
        ("l4vctl blk write unix:/tmp/blk.sock --sector 0 -i disk.img", "A file (padded with zeros to whole sectors):"),
        ("l4vctl blk write emu:blk --sector 8 --count 8 --pattern 0xa5", "Eight sectors of 0xa5:"),
    )
)
@io_options
@click.option("--sector", type=int, required=True, help="First 512-byte sector.")
@click.option("-i", "--input", "input_path", type=click.Path(dir_okay=False), help="Data from this file ('-': stdin).")
@click.option("--pattern", help="Fill with these hex bytes, repeated (needs --count).")
@click.option("--count", type=int, help="Number of sectors (with --pattern; with -i, at most this many).")
@click.option("--flush", "then_flush", is_flag=True, help="Flush the device's cache afterwards.")
@click.option("--depth", type=click.IntRange(1, 1024), default=32, show_default=True, help="Requests in flight.")
@click.pass_context
def write(
    ctx, device, device_opt, abi, mode, timeout, json_mode, sector, input_path, pattern, count, then_flush, depth
):
    """Write sectors from a file, stdin or a byte pattern.

    Data that does not fill its last sector is padded with zeros (and the
    output says so).  The command returns once the device has acknowledged
    every request: for the emulator, the data is then in the image file.
    """
    _range_checks(sector, count)
    if (input_path is None) == (pattern is None):
        raise UsageError("give exactly one of -i/--input and --pattern")
    if pattern is not None:
        if count is None:
            raise UsageError("--pattern needs --count")
        unit = _pattern(pattern)
        total = count * SECTOR
        data = (unit * (total // len(unit) + 1))[:total]
    else:
        data = _read_input(input_path, None if count is None else count * SECTOR)
    padded = -len(data) % SECTOR
    if padded:
        data = data + bytes(padded)
    run = Driven(ctx, "blk write", json_mode, device, device_opt, abi, mode, timeout)
    with run as s:
        drv = _driver(s, depth=depth)
        with Progress(len(data), "writing") as tick:
            drv.write(sector, data, progress=tick)
        if then_flush:
            drv.flush()
    o = run.out
    result = {"sector": sector, "count": len(data) // SECTOR, "bytes": len(data), "padded": padded,
              "flushed": then_flush, "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    o.emit(
        result,
        lambda: (
            f"wrote {len(data)} bytes ({len(data) // SECTOR} sectors) at sector {sector}"
            + (f", {padded} bytes of zero padding" if padded else "")
            + (", flushed" if then_flush else "")
            + "\n"
        ),
    )


def _read_input(path: str, limit: int | None) -> bytes:
    try:
        if path == "-":
            data = sys.stdin.buffer.read() if limit is None else sys.stdin.buffer.read(limit)
        else:
            with open(path, "rb") as f:
                data = f.read() if limit is None else f.read(limit)
    except OSError as exc:
        raise UnavailableError(f"{path}: {exc.strerror or exc}") from None
    if not data:
        raise UsageError(f"{path}: no data to write")
    return data


@blk.command(epilog=examples(("l4vctl blk flush unix:/tmp/blk.sock", "Make written data durable:")))
@io_options
@click.pass_context
def flush(ctx, device, device_opt, abi, mode, timeout, json_mode):
    """Flush the device's write cache (VIRTIO_BLK_T_FLUSH)."""
    run = Driven(ctx, "blk flush", json_mode, device, device_opt, abi, mode, timeout)
    with run as s:
        drv = _driver(s, depth=1)
        drv.flush()
        negotiated = drv.flush_supported
    run.out.emit(
        {"flushed": True, "flush_negotiated": negotiated},
        lambda: "flushed" + ("" if negotiated else " (VIRTIO_BLK_F_FLUSH was not negotiated)") + "\n",
    )


@blk.command(name="id", epilog=examples(("l4vctl blk id unix:/tmp/blk.sock", "Print the id:")))
@io_options
@click.pass_context
def get_id(ctx, device, device_opt, abi, mode, timeout, json_mode):
    """Print the device id string (VIRTIO_BLK_T_GET_ID, 20 bytes at most)."""
    run = Driven(ctx, "blk id", json_mode, device, device_opt, abi, mode, timeout)
    from l4vctl.output import escape

    with run as s:
        ident = _driver(s, depth=1).get_id()
    run.out.emit({"id": ident}, lambda: escape(ident) + "\n")


def _range_command(name: str, method: str, what: str):
    @blk.command(
        name=name,
        help=f"{what} a range of sectors (VIRTIO_BLK_T_{name.upper().replace('-', '_')}).",
        epilog=examples((f"l4vctl blk {name} unix:/tmp/blk.sock --sector 2048 --count 8", f"{what} 4 KiB at 1 MiB:")),
    )
    @io_options
    @click.option("--sector", type=int, required=True, help="First 512-byte sector.")
    @click.option("--count", type=int, required=True, help="Number of sectors.")
    @click.pass_context
    def command(ctx, device, device_opt, abi, mode, timeout, json_mode, sector, count):
        _range_checks(sector, count)
        run = Driven(ctx, f"blk {name}", json_mode, device, device_opt, abi, mode, timeout)
        with run as s:
            getattr(_driver(s, depth=1), method)(sector, count)
        run.out.emit({"sector": sector, "count": count}, lambda: f"{name}: {count} sectors at {sector}\n")

    return command


discard = _range_command("discard", "discard", "Discard")
write_zeroes = _range_command("write-zeroes", "write_zeroes", "Zero")
