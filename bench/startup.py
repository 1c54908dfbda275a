"""Whole-process wall time of the l4vctl console script against ``python -c 'import click'``.

Subject: a console script as pip writes it for the ``l4vctl`` entry point
(``from l4vctl.cli import main; sys.exit(main())``), run by its path like an
installed command, importing l4vctl from this checkout; or, with
``--script PATH``, an installed console script as it is.  Not ``python -m``.
Baseline: ``python -c 'import click'`` with the same interpreter and
environment.  Goals (issue 11): ``probe emu:blk`` <= 1.2x, ``--help`` <= 1.1x.

Each case runs subject and baseline in ``--pairs`` interleaved pairs (the
order alternates from pair to pair), unpinned and then with every process on
CPU 0 (``--cpus``).  Printed: min / median / max of both times and of the
pair-by-pair ratio, the CPUs the processes were allowed and the CPUs they
last ran on, and the load average before and after.  The package is
byte-compiled first and PYTHONDONTWRITEBYTECODE is dropped, as for an
installed package.

    python bench/startup.py [--pairs 20] [--cpus all|0] [--script PATH] [--case probe]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import PY, add_placement_args, cpus_of, describe, interleave, machine, mmm, place, placements, ratios

#: What pip writes for ``l4vctl = "l4vctl.cli:main"`` (the shebang is this interpreter).
CONSOLE_SCRIPT = """\
#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from l4vctl.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""

BASELINE = [PY, "-c", "import click"]


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall time of one process from spawn to exit, and the CPU it last ran on (-1 if unknown)."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)  # fmt: skip
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: /proc still has it
    elapsed = time.perf_counter() - t
    cpu = last_cpu(proc.pid)
    code = proc.wait()
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} exited with status {code}")
    return elapsed, cpu


def last_cpu(pid: int) -> int:
    """The CPU a process last ran on (field 39 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_placement_args(ap)
    ap.set_defaults(pairs=20)
    ap.add_argument("--script", help="time this installed console script instead of one made for this checkout")
    ap.add_argument("--case", action="append", help="run only the cases whose name contains this (repeatable)")
    args = ap.parse_args()
    if args.pairs < 5:
        ap.error("--pairs must be at least 5")

    import compileall

    import l4vctl
    from l4vctl import page

    env = dict(os.environ, NO_COLOR="1", COLUMNS="80")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode cached (pip compiles on install)
    tmp = tempfile.mkdtemp()
    src = os.path.join(tmp, "page.bin")
    with open(src, "wb") as f:
        f.write(page.build_page("current", 2, features=[1, 2, 9, 28, 32]))
    if args.script:
        script = args.script
        origin = f"installed console script {script}"
    else:
        root = os.path.dirname(os.path.dirname(os.path.abspath(l4vctl.__file__)))
        compileall.compile_dir(os.path.join(root, "l4vctl"), quiet=1)
        script = os.path.join(tmp, "l4vctl")
        with open(script, "w") as f:
            f.write(CONSOLE_SCRIPT.format(python=PY))
        os.chmod(script, 0o755)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        origin = f"console script as pip writes it, importing l4vctl from {root}"
    cases = [
        ("l4vctl --help", ["--help"], 1.1),
        ("l4vctl --version", ["--version"], None),
        ("l4vctl probe emu:blk", ["probe", "emu:blk"], 1.2),
        ("l4vctl probe emu:blk --json", ["probe", "emu:blk", "--json"], None),
        ("l4vctl dump-config page.bin", ["dump-config", src], None),
        ("l4vctl dump-config page.bin --json", ["dump-config", src, "--json"], None),
        ("l4vctl layout (construct)", ["layout"], None),
    ]
    if args.case:
        cases = [c for c in cases if any(k in c[0] for k in args.case)]

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# {machine()}; load average {load}")
    print(f"# subject: {origin}")
    print(f"# baseline: python -c 'import click'; {args.pairs} interleaved pairs per case, order alternating")
    print("# times in ms as min / median / max; ratio = subject / baseline, pair by pair")
    home = os.sched_getaffinity(0)
    try:
        for cpus in placements(args.cpus):
            place(cpus)  # the processes started from here inherit it
            print(f"\n## {describe(cpus)} (allowed: cpus {cpus_of()})")
            for _name, extra, _goal in cases:  # warm the page cache and the bytecode
                run_once([script, *extra], env)
            run_once(BASELINE, env)
            for name, extra, goal in cases:
                subject, baseline = Side([script, *extra], env), Side(BASELINE, env)
                subj, base = interleave(subject.run, baseline.run, args.pairs)
                r = ratios(subj, base)
                target = f"  goal <= {goal}x" if goal else ""
                where = f"ran on cpus {subject.cpus()} / {baseline.cpus()}"
                print(f"{name:36s} subject {mmm(subj, 1e3, '.1f')}  baseline {mmm(base, 1e3, '.1f')}  "
                      f"ratio {mmm(r, 1.0, '.2f')}{target}  {where}")  # fmt: skip
    finally:
        place(home)
        os.unlink(src)
        if not args.script:
            os.unlink(script)
        os.rmdir(tmp)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n# load average after: {load}")


class Side:
    """One side of a comparison: a command, and the CPUs its runs last ran on."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.argv = argv
        self.env = env
        self.ran: set[int] = set()

    def run(self) -> float:
        """One run's wall time."""
        elapsed, cpu = run_once(self.argv, self.env)
        self.ran.add(cpu)
        return elapsed

    def cpus(self) -> str:
        """The CPUs the runs last ran on, as text."""
        return ",".join(str(c) for c in sorted(self.ran) if c >= 0) or "?"


if __name__ == "__main__":
    main()
