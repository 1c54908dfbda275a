"""Trace and replay of driver sessions (see docs/trace.md).

* :mod:`.record`: the recording side: a trace file written one JSON line per
  step, and the wrappers (channel, config page, IRQs, virtqueues) that feed it;
* :mod:`.read`: loading a trace file, checking every line, and describing steps;
* :mod:`.replay`: re-driving a device with the driver steps of a trace.

The ``trace+URL`` device scheme (:mod:`l4vctl.backends.trace`) and the
``--trace FILE`` root option put the recorder around a session's backend.
"""

from __future__ import annotations

#: Version of the trace format (the ``format`` key of a trace file's first line).
FORMAT_VERSION = 1

#: Step kinds a trace records (what ``trace show --kind`` filters on).
KINDS = ("ipc", "page", "cmd", "kick", "irq", "request", "status")
#: Bookkeeping records: the file header, a session's start and end, a configured queue.
META_KINDS = ("trace", "session", "queue", "end")
