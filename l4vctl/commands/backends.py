"""``l4vctl backends``: the device URL schemes and whether they work here."""

from __future__ import annotations

import click

from l4vctl.commands._common import Command, begin, examples, json_option


@click.command(
    cls=Command,
    epilog=examples(
        ("l4vctl backends", "List the schemes:"),
        ("l4vctl backends --json | jq -r '.result.backends[] | select(.available) | .scheme'", "Usable ones:"),
    ),
)
@json_option
@click.pass_context
def backends(ctx, json_mode):
    """List the device URL schemes and whether each is available here.

    Schemes added by other packages (entry points in the group
    'l4vctl.backends') are listed without being imported.
    """
    from l4vctl.backends import list_backends

    out = begin(ctx, "backends", json_mode)
    rows = list_backends()
    out.emit({"backends": rows}, lambda: _text(rows))


def _text(rows):
    from l4vctl.output import Doc

    doc = Doc()
    doc.table(
        ("scheme", "available", "usage", "what"),
        [
            (
                r["scheme"],
                {True: "yes", False: "no", None: "?"}[r["available"]] + (f" ({r['reason']})" if r["reason"] else ""),
                r["usage"],
                r["description"],
            )
            for r in rows
        ],
        indent=0,
    )
    return doc
