"""Whole-process wall time of l4vctl commands against same-run baselines.

Baselines: ``python -c pass`` and ``python -c 'import click'`` with the same
interpreter.  Goal (issue 3): ``l4vctl probe emu:blk`` within 1.5x of
``import click``.  Each command runs ``--runs`` times, round robin; min and median are shown,
ratios are of medians against ``import click``.  The package is byte-compiled
first and PYTHONDONTWRITEBYTECODE is dropped, as for an installed package.

    python bench/startup.py [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _util import PY, machine, process_times, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()

    from l4vctl import page

    tmp = tempfile.mkdtemp()
    src = os.path.join(tmp, "page.bin")
    with open(src, "wb") as f:
        f.write(page.build_page("current", 2, features=[1, 2, 9, 28, 32]))
    env = dict(os.environ, NO_COLOR="1")
    # Measure what an installed package does: bytecode cached (pip compiles on install).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    import compileall

    import l4vctl

    compileall.compile_dir(os.path.dirname(l4vctl.__file__), quiet=1)
    cases = [
        ("python -c pass", [PY, "-c", "pass"]),
        ("python -c 'import click'", [PY, "-c", "import click"]),
        ("l4vctl --help", [PY, "-m", "l4vctl", "--help"]),
        ("l4vctl layout (construct)", [PY, "-m", "l4vctl", "layout"]),
        ("l4vctl dump-config page.bin", [PY, "-m", "l4vctl", "dump-config", src]),
        ("l4vctl dump-config --json", [PY, "-m", "l4vctl", "dump-config", src, "--json"]),
        ("l4vctl probe emu:blk", [PY, "-m", "l4vctl", "probe", "emu:blk"]),
        ("l4vctl probe emu:blk --json", [PY, "-m", "l4vctl", "probe", "emu:blk", "--json"]),
    ]
    print(f"# {machine()}; {args.runs} runs each")
    for _name, argv in cases:
        process_times(argv, 2, env)  # warm the page cache
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(args.runs):  # round robin, so that drift hits every case alike
        for name, argv in cases:
            times[name] += process_times(argv, 1, env)
    results = {name: summary(t) for name, t in times.items()}
    base = results["python -c 'import click'"][1]
    for name, (lo, med) in results.items():
        print(f"{name:32s} min {lo * 1e3:6.1f} ms  median {med * 1e3:6.1f} ms  {med / base:5.2f}x import click")
    os.unlink(src)
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
