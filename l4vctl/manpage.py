"""Man pages generated from the click commands.

    python -m l4vctl.manpage --write man/    regenerate man/*.1
    python -m l4vctl.manpage --check man/    exit 1 if man/ is out of date

Each page has NAME, SYNOPSIS, DESCRIPTION, OPTIONS, EXIT STATUS, ENVIRONMENT,
EXAMPLES and SEE ALSO; examples come from each command's epilog.
"""

from __future__ import annotations

import pathlib
import sys

import click

from l4vctl import __version__
from l4vctl.errors import EXIT_CODES

ENVIRONMENT = (
    (
        "L4VCTL_DEVICE",
        "Default device URL (else emu:blk): emu:TYPE, unix:PATH, vhost-user:PATH?type=T or dump:FILE; see l4vctl(1).",
    ),
    ("L4VCTL_ABI", "Default for --abi (classic, current or auto)."),
    ("L4VCTL_EMU_LOG", "Log level of emu: emulators on stderr: DEBUG, INFO, WARNING or ERROR (default)."),
    ("L4VCTL_DEBUG", "If set, behave as if --debug was given: show tracebacks."),
    ("NO_COLOR", "If set, text output has no colour even on a terminal."),
    ("COLUMNS", "Width used for help texts."),
)


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _paragraphs(text: str) -> list[tuple[bool, str]]:
    """(verbatim, text) paragraphs of a click help text (``\\b`` = verbatim)."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        if lines and lines[0].strip() == "\b":
            out.append((True, "\n".join(lines[1:])))
        else:
            out.append((False, " ".join(line.strip() for line in lines)))
    return out


def _option_lines(param: click.Parameter) -> list[str]:
    """An OPTIONS entry, formatted here so that it does not vary with click's version."""
    if not isinstance(param, click.Option) or param.hidden:
        return []
    names = ", ".join(param.opts + param.secondary_opts)
    if not param.is_flag:
        if isinstance(param.type, click.Choice):
            names += " [" + "|".join(map(str, param.type.choices)) + "]"
        else:
            names += " " + (param.metavar or param.type.name.upper())
    help_text = param.help or ""
    if param.show_default and param.default not in (None, False, ()):
        help_text += f" [default: {param.default}]"
    return [".TP", f"\\fB{_esc(names)}\\fR", _esc(help_text)]


def render(command: click.Command, name: str, summary: str) -> str:
    """The man page (roff source) of ``command``, titled ``name`` with the one-line ``summary``."""
    from l4vctl.cli import CONTEXT_SETTINGS
    from l4vctl.commands._common import parse_examples

    ctx = click.Context(command, info_name=name, **CONTEXT_SETTINGS)
    title = name.upper().replace(" ", "-")
    out = [
        f'.TH "{title}" "1" "" "l4vctl {__version__}" "l4vctl manual"',
        ".SH NAME",
        f"{_esc(name.replace(' ', '-'))} \\- {_esc(summary)}",
        ".SH SYNOPSIS",
        f"\\fB{_esc(name)}\\fR {_esc(' '.join(command.collect_usage_pieces(ctx)))}",
        ".SH DESCRIPTION",
    ]
    for verbatim, para in _paragraphs(command.help or ""):
        if verbatim:
            out += [".PP", ".nf", _esc(para), ".fi"]
        else:
            out += [".PP", _esc(para)]
    if isinstance(command, click.Group):
        out.append(".SH COMMANDS")
        for sub, summary in _subcommands(command, ctx):
            page = (name + " " + sub).replace(" ", "\\-")
            out += [".TP", f"\\fB{_esc(sub)}\\fR", _esc(summary), f"See \\fB{page}\\fR(1)."]
    out.append(".SH OPTIONS")
    for param in command.get_params(ctx):
        out += _option_lines(param)
    out.append(".SH EXIT STATUS")
    for code, text in EXIT_CODES:
        out += [".TP", f"\\fB{code}\\fR", _esc(text)]
    out.append(".SH ENVIRONMENT")
    for var, text in ENVIRONMENT:
        out += [".TP", f"\\fB{var}\\fR", _esc(text)]
    examples = parse_examples(command.epilog)
    if name == "l4vctl":
        examples = [
            ("l4vctl probe emu:blk", "Identify an emulated block device started just for this:"),
            ("l4vctl emulate blk --socket /tmp/blk.sock", "Serve a device for several commands:"),
            ("l4vctl negotiate unix:/tmp/blk.sock --require flush", "Handshake with it, insisting on a feature:"),
            ("l4vctl dump-config page.bin --json", "Decode a saved config page for a script:"),
        ]
    out.append(".SH EXAMPLES")
    for cmdline, text in examples:
        out += [".PP", _esc(text), ".RS", ".nf", _esc(cmdline), ".fi", ".RE"]
    out.append(".SH SEE ALSO")
    from l4vctl.cli import COMMANDS

    own = name.replace(" ", "-")
    parent = own.rsplit("-", 1)[0] if own.count("-") > 1 else None
    others = ["l4vctl"] + ([parent] if parent else []) + [f"l4vctl-{c}" for c in sorted(COMMANDS)]
    out.append(", ".join(f"\\fB{_esc(o)}\\fR(1)" for o in others if o != own))
    return "\n".join(out) + "\n"


def _subcommands(group: click.Group, ctx: click.Context) -> list[tuple[str, str]]:
    from l4vctl.cli import COMMANDS, cli

    if group is cli:
        return [(c, COMMANDS[c][2]) for c in sorted(COMMANDS)]
    return [(n, _command(group, ctx, n).get_short_help_str(200)) for n in group.list_commands(ctx)]


def _command(group: click.Group, ctx: click.Context, name: str) -> click.Command:
    """Subcommand ``name`` of ``group``, a name its own ``list_commands`` gave."""
    command = group.get_command(ctx, name)
    assert command is not None
    return command


def pages() -> dict[str, str]:
    """File name -> man page text for the root command and every subcommand."""
    from l4vctl.cli import COMMANDS, cli

    out = {"l4vctl.1": render(cli, "l4vctl", "inspect and drive L4-VIRTIO devices")}
    ctx = click.Context(cli, info_name="l4vctl")
    for name, (_module, _attr, summary) in COMMANDS.items():
        command = _command(cli, ctx, name)
        out[f"l4vctl-{name}.1"] = render(command, f"l4vctl {name}", summary.rstrip("."))
        if isinstance(command, click.Group):
            sub_ctx = click.Context(command, info_name=name, parent=ctx)
            for sub in command.list_commands(sub_ctx):
                sc = _command(command, sub_ctx, sub)
                out[f"l4vctl-{name}-{sub}.1"] = render(
                    sc, f"l4vctl {name} {sub}", sc.get_short_help_str(200).rstrip(".")
                )
    return out


def main(argv: list[str]) -> int:
    """Write the man pages to a directory (``--write DIR``) or check them (``--check DIR``); exit status."""
    if len(argv) != 2 or argv[0] not in ("--write", "--check"):
        print("usage: python -m l4vctl.manpage --write|--check DIR", file=sys.stderr)
        return 2
    target = pathlib.Path(argv[1])
    wanted = pages()
    if argv[0] == "--write":
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("*.1"):
            if stale.name not in wanted:
                stale.unlink()
        for name, text in wanted.items():
            (target / name).write_text(text)
        print(f"wrote {len(wanted)} man pages to {target}")
        return 0
    problems = []
    for name, text in wanted.items():
        path = target / name
        if not path.exists():
            problems.append(f"{path} is missing")
        elif path.read_text() != text:
            problems.append(f"{path} is out of date")
    for path in target.glob("*.1"):
        if path.name not in wanted:
            problems.append(f"{path} has no command")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print("run: python -m l4vctl.manpage --write man/", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
