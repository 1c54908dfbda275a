"""A conformance report as JUnit XML (the format CI systems read).

One ``<testcase>`` per case; FAIL and WEDGED are ``<failure>`` elements,
NOT_RUN and NOT_APPLICABLE ``<skipped>`` ones; the suite's counts are on
``<testsuite>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from l4vctl.conformance import Report


def junit_xml(report: Report) -> bytes:
    """The report as a JUnit XML document (UTF-8 bytes)."""
    import xml.etree.ElementTree as ET

    from l4vctl.conformance import BAD, Verdict

    failures = sum(1 for r in report.results if r.verdict in BAD)
    skipped = sum(1 for r in report.results if r.verdict in (Verdict.NOT_RUN, Verdict.NOT_APPLICABLE))
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", {
        "name": "l4vctl check", "tests": str(len(report.results)), "failures": str(failures), "errors": "0",
        "skipped": str(skipped), "time": f"{report.seconds:.3f}",
    })  # fmt: skip
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", {"name": "device", "value": report.device})
    for key in ("device_class", "abi", "scheme"):
        ET.SubElement(props, "property", {"name": key, "value": str(report.info.get(key))})
    for r in report.results:
        tc = ET.SubElement(suite, "testcase", {"classname": f"l4vctl.check.{report.info.get('device_class')}",
                                               "name": r.case.name, "time": f"{r.seconds:.3f}"})  # fmt: skip
        message = f"{r.verdict.value.upper()}: {r.detail}"
        if r.verdict in BAD:
            el = ET.SubElement(tc, "failure", {"type": r.verdict.value, "message": message})
            el.text = f"{r.case.section}: {r.case.rule}\n{r.detail}"
        elif r.verdict in (Verdict.NOT_RUN, Verdict.NOT_APPLICABLE):
            ET.SubElement(tc, "skipped", {"message": message})
        else:
            out = ET.SubElement(tc, "system-out")
            out.text = message
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"
