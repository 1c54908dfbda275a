"""man/ is generated from the click commands and must not drift."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

from l4vctl import manpage
from l4vctl.cli import COMMANDS

MAN = pathlib.Path(__file__).resolve().parent.parent / "man"


def test_man_pages_are_current():
    assert manpage.main(["--check", str(MAN)]) == 0, "run: python -m l4vctl.manpage --write man/"


def test_every_command_has_a_page_with_required_sections():
    pages = manpage.pages()
    assert {"l4vctl.1"} | {f"l4vctl-{c}.1" for c in COMMANDS} <= set(pages)
    for name, text in pages.items():
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "ENVIRONMENT", "EXAMPLES"):
            assert f".SH {section}\n" in text, (name, section)
        assert "\\fB4\\fR" in text
        examples = text.split(".SH EXAMPLES\n", 1)[1].split(".SH SEE ALSO", 1)[0]
        assert ".nf\nl4vctl" in examples, f"{name} has no example"


def test_check_detects_drift(tmp_path):
    assert manpage.main(["--write", str(tmp_path)]) == 0
    assert manpage.main(["--check", str(tmp_path)]) == 0
    page = tmp_path / "l4vctl-layout.1"
    page.write_text(page.read_text() + '.\\" edited\n')
    assert manpage.main(["--check", str(tmp_path)]) == 1


def test_pages_render_with_man(tmp_path):
    man = shutil.which("man")
    assert man, "man is required to render the pages (.ci/run installs man-db)"
    r = subprocess.run([man, "-l", str(MAN / "l4vctl-dump-config.1")], capture_output=True, text=True,
                       env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "MANPAGER": "cat", "PAGER": "cat"})  # fmt: skip
    assert r.returncode == 0
    assert "EXIT STATUS" in r.stdout and "l4vctl dump-config page.bin" in r.stdout
