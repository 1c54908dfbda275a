"""Golden text files: expected output where layout matters.

Set L4VCTL_UPDATE_GOLDEN=1 to rewrite them from the current output (then
review the diff before committing).
"""

from __future__ import annotations

import os
import pathlib

HERE = pathlib.Path(__file__).parent


def check_golden(name: str, text: str) -> None:
    path = HERE / name
    if os.environ.get("L4VCTL_UPDATE_GOLDEN"):
        path.write_text(text)
        return
    assert path.exists(), f"golden file {name} is missing; run with L4VCTL_UPDATE_GOLDEN=1"
    expected = path.read_text()
    assert text == expected, f"output differs from golden file {name}"
