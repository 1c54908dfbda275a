"""``l4vctl check``: conformance of a device server against the transport rules (a suite of cases)."""

from __future__ import annotations

import inspect  # click imports it already

import click

from l4vctl.commands._common import Command, attach_of, begin, examples, io_options, resolve_device

JSON_KEYS = """\b
JSON result keys: device, info {device_id, device_class, name, abi,
num_queues, num_max, offered, cmd_config, scheme}, ok, counts {pass,
reject, wedged, fail, not-run, not-applicable}, seconds, cases [{name,
section, verdict, detail, seconds, recovery, rule}].  With --list: cases
[{name, section, rule, accept, destructive, wire}]."""


@click.command(
    cls=Command,
    epilog=examples(
        ("l4vctl check emu:blk", "Check l4vctl's own block emulator:"),
        ("l4vctl check unix:/tmp/blk.sock --mode cmd", "A running device server, status through the cmd word:"),
        ("l4vctl check 'vhost-user:/tmp/vhost.sock?type=blk'", "qemu-storage-daemon's vhost-user-blk export:"),
        ("l4vctl check emu:blk --case 'queue-*' --case desc-loop", "Only some cases (globs):"),
        ("l4vctl check emu:blk --junit check.xml", "JUnit XML for a CI system as well:"),
        ("l4vctl check --list", "Every case with the rule it checks:"),
    ),
)
@io_options
@click.option("--case", "patterns", multiple=True, metavar="GLOB",
              help="Run only the cases matching GLOB (repeatable).")  # fmt: skip
@click.option("--list", "list_only", is_flag=True, help="List the cases (and the rules they check) and exit.")
@click.option("--junit", "junit", metavar="FILE", default=None, help="Also write the results as JUnit XML to FILE.")
@click.option("--progress", is_flag=True, help="Name each case on stderr as it starts and ends.")
@click.pass_context
def check(ctx, device, device_opt, abi, mode, timeout, json_mode, patterns, list_only, junit, progress):
    """Check a device server against the L4-VIRTIO transport rules.

    Runs a suite of driver behaviours, good and hostile, one after another
    against one device: the good handshake and request, wrong status
    orders, features after FEATURES_OK and unknown feature bits, bad queue
    sizes and ring addresses, REGISTER_DS with bad offsets, sizes and
    bases or without a dataspace, cmd-word abuse, descriptor loops, heads
    and nexts out of range, nested and empty indirect tables, buffers
    outside registered memory, console receive starvation and a driver
    that vanishes mid-request.  Each case cites the rule it checks (spec
    section) and gets a verdict:

    \b
      PASS            the device behaved as the rule says
      REJECT          it refused cleanly (an L4 error, FEATURES_OK dropped,
                      DEVICE_NEEDS_RESET set, an error status, or a
                      connection ended while the next driver is served)
      WEDGED          it stopped answering within --timeout
      FAIL            it accepted what it must not, or crashed / went away
      NOT-RUN         not run: the device is gone or wedged since an earlier
                      case, or the good handshake/request it needs failed
      N/A             does not apply to this device or backend

    After each case the device is reset, and a fresh handshake and a good
    request must work before the next case; a device that is gone or wedged leaves the
    remaining cases not run.  Cases known to kill real servers run last.
    emu: devices are served on a private socket for the run; vhost-user
    back-ends have no status handshake on the wire, so the cases about it
    are not applicable there.

    Exit status: 0 when every case is PASS, REJECT or N/A; 6 when a case
    is FAIL, WEDGED or NOT-RUN; errors before the first case as usual.

    """
    from l4vctl import conformance as conf

    out = begin(ctx, "check", json_mode)
    cases = conf.select(patterns)
    if list_only:
        rows = [c.to_json() for c in cases]
        out.emit({"cases": rows}, lambda: _list_text(cases))
        return
    url = resolve_device(ctx, device, device_opt)
    out.device = url
    on_start = on_result = None
    if progress:
        from l4vctl.output import info

        total = len(cases)
        order = {c.name: i + 1 for i, c in enumerate(cases)}

        def on_start(c):
            info(f"check: [{order[c.name]}/{total}] {c.name} ...")

        def on_result(r):
            info(f"check: [{order[r.case.name]}/{total}] {r.case.name}: {_label(r.verdict)}")

    report = conf.run_suite(url, cases, abi=abi, mode=mode, timeout=timeout, attach=attach_of(ctx),
                            on_start=on_start, on_result=on_result)  # fmt: skip
    out.abi = report.info.get("abi")
    if junit:
        from l4vctl.commands._common import write_output
        from l4vctl.conformance.junit import junit_xml

        write_output(junit, junit_xml(report))
    out.emit(report.to_json(), lambda: _text(report))
    if not report.ok:
        ctx.exit(conf.EXIT_NONCONFORMING)


check.help = inspect.cleandoc(check.help or "") + "\n\n" + JSON_KEYS

LABELS = {"pass": "PASS", "reject": "REJECT", "wedged": "WEDGED", "fail": "FAIL", "not-run": "NOT-RUN",
          "not-applicable": "N/A"}  # fmt: skip


def _label(verdict) -> str:
    return LABELS[str(verdict.value if hasattr(verdict, "value") else verdict)]


def _list_text(cases):
    from l4vctl.output import Doc

    doc = Doc()
    doc.table(["case", "section", "rule"], [(c.name + (" *" if c.destructive else ""), c.section, c.rule)
                                           for c in cases], indent=0)  # fmt: skip
    doc.line("* destructive: runs last (known to kill real servers)")
    return doc


def _text(report):
    from l4vctl.output import Doc

    doc = Doc()
    i = report.info
    cls = i.get("device_class") or "unknown"
    doc.kv([("device", report.device), ("class", f"{cls} ({i.get('name')})"), ("abi", str(i.get("abi")))], indent=0)
    rows = [(r.case.name, _label(r.verdict), r.case.section, r.detail) for r in report.results]
    doc.table(["case", "verdict", "section", "detail"], rows, indent=0)
    counts = report.counts()
    summary = ", ".join(f"{counts[k]} {LABELS[k]}" for k in LABELS if counts[k])
    doc.line(f"{len(report.results)} cases in {report.seconds:.1f} s: {summary}")
    doc.line("conforming" if report.ok else "NOT conforming")
    return doc
