"""``l4vctl layout``: every struct with field offsets, sizes and meanings."""

from __future__ import annotations

import fnmatch

import click

from l4vctl.catalog import MAX_QUEUE_SIZE
from l4vctl.commands._common import Command, abi_option, begin, examples, json_option, queue_stride_option
from l4vctl.errors import UsageError


def _queue_size(ctx, param, value):
    if value is None:
        return value
    if value < 1 or value > MAX_QUEUE_SIZE or value & (value - 1):
        raise click.BadParameter(f"{value} is not a power of two between 1 and {MAX_QUEUE_SIZE}")
    return value


@click.command(
    cls=Command,
    epilog=examples(
        ("l4vctl layout", "Every struct of the current ABI:"),
        ("l4vctl layout --abi classic l4virtio_config_hdr_t", "The classic config header only:"),
        ("l4vctl layout 'vring_*' --num 128", "The split-ring structs for a 128-entry queue:"),
        ("l4vctl layout --abi classic --json | jq '.result.structs[].size'", "Sizes for a script:"),
    ),
)
@click.argument("structs", nargs=-1, metavar="[STRUCT]...")
@abi_option(auto=False)
@click.option(
    "--num",
    type=int,
    default=256,
    show_default=True,
    callback=_queue_size,
    help="Queue size used for vring_avail and vring_used (a power of two).",
)
@queue_stride_option
@json_option
@click.pass_context
def layout(ctx, structs, abi, num, queue_stride, json_mode):
    """Show the binary layout of the L4-VIRTIO structs, like pahole.

    Lists each struct with every field's offset, size, C type and meaning:
    the config header of the chosen ABI era, the queue-config entry, the cmd
    word, the split-ring structs, the device-specific configs and the
    request layouts.  Reserved words appear under their C names (_res1 ...).

    STRUCT selects structs by C name; shell-style wildcards are allowed.
    Without STRUCT every struct is shown.
    """
    out = begin(ctx, "layout", json_mode)
    out.abi = abi
    from l4vctl.formats import introspect, ring
    from l4vctl.formats.registry import layout_structs

    stride = int(queue_stride)
    available = layout_structs(abi, num=num, stride=stride)
    chosen = _select(available, structs)
    names = {id(ring.vring_used_elem): "vring_used_elem", id(ring.vring_desc): "vring_desc"}

    result_structs = {}
    described = {}
    for name in chosen:
        schema = available[name]
        fields = introspect.describe(schema, names)
        described[name] = fields
        result_structs[name] = {"size": schema.sizeof(), "fields": [f.to_json() for f in fields]}
    result = {"abi": abi, "num": num, "queue_stride": stride, "structs": result_structs}
    out.emit(result, lambda: _text(result, described))


def _select(available: dict, patterns: tuple[str, ...]) -> list[str]:
    if not patterns:
        return list(available)
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in available if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UsageError(
                f"no struct matches {pattern!r}",
                hint="known: " + ", ".join(available),
            )
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def _ctype(f) -> str:
    if f.count is None:
        return f.ctype
    return f"{f.ctype}[{f.count}]"


def _rows(fields, prefix=""):
    for f in fields:
        name = prefix + (f.name if f.name is not None else "(padding)")
        yield (f"{f.offset:#05x}", str(f.size), _ctype(f), name, f.doc)
        if f.fields:
            yield from _rows(f.fields, name + ".")


def _text(result: dict, described: dict):
    from l4vctl.output import Doc

    doc = Doc()
    abi = result["abi"]
    for name, info in result["structs"].items():
        doc.heading(f"{name}  ({abi} ABI, {info['size']} bytes)")
        doc.table(("offset", "size", "type", "name", "meaning"), _rows(described[name]), align="rrlll")
    return doc
