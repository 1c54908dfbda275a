"""Conformance of a device server: a suite of driver behaviours, good and hostile.

Each :class:`Case` plays one driver behaviour against a device and names the
rule of the transport specification (``docs``: l4virtio-transport §3, §5) it
checks.  The outcome is a :class:`Verdict`:

``PASS``
    the device behaved as the rule says (a good request completed, a fail
    state stayed, a malformed request was dropped as the rule allows);
``REJECT``
    the device refused cleanly: an L4 error code, FEATURES_OK dropped, or a
    status bit it must set (DEVICE_NEEDS_RESET);
``WEDGED``
    the device stopped answering within the timeout (an IPC without a reply,
    a cmd word never cleared, a good request never completed);
``FAIL``
    the device accepted what it must not, or crashed / went away;
``NOT_RUN``
    the case could not run: the device is gone or wedged since an earlier
    case, or a case it depends on failed;
``NOT_APPLICABLE``
    the case does not apply to this device or backend (a vhost-user back-end
    has no L4-VIRTIO status handshake; a device without CMD_CONFIG has no
    cmd word; a device class without a request the suite can build).

:func:`run_suite` runs the cases one after another, each in a fresh session;
after each case it checks with a fresh handshake that the device is usable
again.  A device that is gone or wedged makes the remaining cases
``NOT_RUN``.  Destructive cases (those known to kill real servers) run last.
"""

from __future__ import annotations

import enum
import fnmatch
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from l4vctl.conformance.probe import Target


class Verdict(enum.StrEnum):
    """What a case found (the JSON and JUnit spelling is the value)."""

    PASS = "pass"
    REJECT = "reject"
    WEDGED = "wedged"
    FAIL = "fail"
    NOT_RUN = "not-run"
    NOT_APPLICABLE = "not-applicable"


#: Verdicts that are good news (the exit status stays 0).
GOOD = frozenset({Verdict.PASS, Verdict.REJECT, Verdict.NOT_APPLICABLE})
#: Verdicts that count as failures (JUnit <failure>).
BAD = frozenset({Verdict.FAIL, Verdict.WEDGED})
#: Exit status of ``l4vctl check`` when a case is FAIL, WEDGED or NOT_RUN (a device in an error state).
EXIT_NONCONFORMING = 6


class CaseSkipped(Exception):
    """Raised by a case that does not apply here (NOT_APPLICABLE, with the reason)."""


@dataclass
class Outcome:
    """What a case function reports: the verdict and the evidence in one line."""

    verdict: Verdict
    detail: str


@dataclass
class Case:
    """One driver behaviour and the rule it checks."""

    name: str
    section: str  # the spec section(s) the rule is in, e.g. "§5.1"
    rule: str  # what the device must do
    accept: str  # which answers are acceptable, in words
    run: Callable[[Target], Outcome]
    destructive: bool = False  # known to kill real servers: runs last
    needs_handshake: bool = False  # needs a device that completed the good handshake
    needs_request: bool = False  # needs a device that completed the good request
    wire: str = "l4virtio"  # "l4virtio": needs the L4-VIRTIO transport on the wire; "ring": any backend

    def to_json(self) -> dict[str, Any]:
        """The case as --list --json shows it."""
        return {"name": self.name, "section": self.section, "rule": self.rule, "accept": self.accept,
                "destructive": self.destructive, "wire": self.wire}  # fmt: skip


@dataclass
class CaseResult:
    """A case and what came of it."""

    case: Case
    verdict: Verdict
    detail: str
    seconds: float = 0.0
    recovery: str | None = None  # what the fresh handshake after the case found, if it failed

    def to_json(self) -> dict[str, Any]:
        """The result as --json shows it."""
        return {"name": self.case.name, "section": self.case.section, "verdict": self.verdict.value,
                "detail": self.detail, "seconds": round(self.seconds, 4), "recovery": self.recovery,
                "rule": self.case.rule}  # fmt: skip


@dataclass
class Report:
    """Every case's result, in the order they ran."""

    device: str
    results: list[CaseResult] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        """How many cases got each verdict."""
        out = {v.value: 0 for v in Verdict}
        for r in self.results:
            out[r.verdict.value] += 1
        return out

    @property
    def ok(self) -> bool:
        """True when every case is PASS, REJECT or not applicable."""
        return all(r.verdict in GOOD for r in self.results)

    def to_json(self) -> dict[str, Any]:
        """The report as --json shows it."""
        return {"device": self.device, "info": self.info, "ok": self.ok, "counts": self.counts(),
                "seconds": round(self.seconds, 3), "cases": [r.to_json() for r in self.results]}  # fmt: skip


def all_cases() -> list[Case]:
    """Every case in running order (destructive cases last)."""
    from l4vctl.conformance.cases import CASES

    return [c for c in CASES if not c.destructive] + [c for c in CASES if c.destructive]


def select(patterns: Iterable[str]) -> list[Case]:
    """The cases whose names match any of the glob ``patterns`` (every case without patterns).

    A pattern that matches nothing is a usage error.
    """
    from l4vctl.errors import UsageError

    cases = all_cases()
    pats = list(patterns)
    if not pats:
        return cases
    for p in pats:
        if not any(fnmatch.fnmatchcase(c.name, p) for c in cases):
            raise UsageError(f"--case {p!r} matches no case", hint="'l4vctl check --list' names them")
    return [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in pats)]


def run_suite(url: str, cases: list[Case], *, abi: str = "auto", mode: str = "auto", timeout: float = 5.0,
              attach: str = "auto", on_start: Callable[[Case], None] | None = None,
              on_result: Callable[[CaseResult], None] | None = None) -> Report:  # fmt: skip
    """Run ``cases`` against the device at ``url`` and report every one of them.

    ``emu:`` URLs get an emulator of their own served on a private socket for
    the whole run (a case may reconnect).  Errors that keep the suite from
    starting at all (an unknown scheme, nothing listening) are raised.
    """
    from l4vctl.conformance.probe import Target, private_device

    start = time.monotonic()
    report = Report(url)
    with private_device(url) as real_url:
        target = Target(real_url, url, abi=abi, mode=mode, timeout=timeout, attach=attach)
        report.info = target.identify()
        gone: str | None = None  # why the remaining cases cannot run
        failed_dep: dict[str, str] = {}
        for case in cases:
            if on_start is not None:
                on_start(case)
            result = _one(target, case, gone, failed_dep)
            report.results.append(result)
            if on_result is not None:
                on_result(result)
            if result.verdict in BAD and gone is None and target.unusable:
                gone = target.unusable
    report.seconds = time.monotonic() - start
    return report


def _one(target: Target, case: Case, gone: str | None, failed_dep: dict[str, str]) -> CaseResult:
    from l4vctl.errors import L4vError, TimeoutExpired, UnavailableError

    if gone is not None:
        return CaseResult(case, Verdict.NOT_RUN, gone)
    why = target.not_applicable(case)
    if why:
        return CaseResult(case, Verdict.NOT_APPLICABLE, why)
    for dep, flag in (("handshake", case.needs_handshake), ("request", case.needs_request)):
        if flag and dep in failed_dep:
            return CaseResult(case, Verdict.NOT_RUN, f"needs a good {dep}, which failed in case {failed_dep[dep]}")
    t0 = time.monotonic()
    target.current = case.name
    try:
        outcome = case.run(target)
    except CaseSkipped as exc:
        return CaseResult(case, Verdict.NOT_APPLICABLE, str(exc))
    except TimeoutExpired as exc:
        outcome = Outcome(Verdict.WEDGED, f"no answer within {target.timeout:g} s: {exc}")
    except UnavailableError as exc:
        outcome = Outcome(Verdict.FAIL, f"the device went away: {exc}")
    except L4vError as exc:
        if "REGISTER_DS" in str(exc) and "-L4_ENOMEM" in str(exc):
            # §3.4: a full region table is a clean refusal; registrations outlive sessions and resets
            return CaseResult(case, Verdict.NOT_RUN, f"not run: the device's region table is full ({exc})")
        outcome = Outcome(Verdict.FAIL, f"{type(exc).__name__}: {exc}")
    result = CaseResult(case, outcome.verdict, outcome.detail, time.monotonic() - t0)
    if case.name in ("handshake", "request") and outcome.verdict not in GOOD:
        failed_dep[case.name] = case.name
    problem = target.recover(full="handshake" not in failed_dep, request="request" not in failed_dep)
    if problem is not None:
        result.recovery = problem
        if result.verdict in GOOD:
            result.verdict = Verdict.WEDGED if target.unusable_kind == "wedged" else Verdict.FAIL
            result.detail = f"{result.detail}; then {problem}"
    result.seconds = time.monotonic() - t0
    return result
