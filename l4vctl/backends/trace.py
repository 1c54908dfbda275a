"""``trace+URL[?trace=FILE]`` — any live device, with every transport step recorded.

The inner URL is opened as it would be alone (``trace+emu:blk?size=1M``,
``trace+unix:/tmp/x.sock``, ``trace+l4re:...``, ``trace+vhost-user:...``); the
session's channel, config page, IRQs and virtqueues are wrapped by
:mod:`l4vctl.trace.record`.  Records go to ``?trace=FILE`` (an option taken
out of the inner URL's query), else to the file of ``l4vctl --trace FILE``,
else to ``l4vctl-trace-DATE-TIME-PID.jsonl`` in $L4VCTL_TRACE_DIR or the
current directory.  docs/trace.md describes the format.
"""

from __future__ import annotations

from typing import Any

from l4vctl.backends.base import Backend, Channel, parse_qsl
from l4vctl.errors import UsageError


def split_trace_option(target: str) -> tuple[str, str | None]:
    """``(inner URL, trace file or None)``: ``trace=FILE`` is taken out of the query of ``target``."""
    head, sep, query = target.partition("?")
    if not sep:
        return target, None
    path = None
    kept = []
    for field in query.split("&") if query else ():
        if field.startswith("trace="):
            try:
                path = parse_qsl(field)[0][1]
            except ValueError:
                raise UsageError(f"trace+{target}: bad trace= option") from None
        else:
            kept.append(field)
    if path == "":
        raise UsageError(f"trace+{target}: trace= needs a file name")
    return head + ("?" + "&".join(kept) if kept else ""), path


class TraceBackend(Backend):
    """``trace+URL``: the backend of URL, every session on it recorded."""

    scheme = "trace"

    def __init__(self, url: str, target: str, inner: Backend | None = None, path: str | None = None):
        super().__init__(url, target)
        from l4vctl.backends import TRACE_FILE, open_backend, split_url

        inner_url, option = split_trace_option(target)
        if inner is None:
            if not inner_url:
                raise UsageError("trace+ needs a device URL after it (trace+emu:blk, trace+unix:PATH)")
            if split_url(inner_url)[0] == "trace":
                raise UsageError(f"{url}: a traced device cannot be traced again")
            inner = open_backend(inner_url, traced=False)
        if not inner.live:
            inner.close()
            raise UsageError(f"{url}: a saved page has no session to trace (trace+ needs a live device)")
        self.inner = inner
        self.inner_url = inner.url
        self.path = path or option or TRACE_FILE
        self.live = True

    @classmethod
    def around(cls, inner: Backend, path: str) -> TraceBackend:
        """Trace ``inner`` (already open) into ``path``: what ``l4vctl --trace FILE`` does to every device."""
        return cls(f"trace+{inner.url}", inner.url, inner=inner, path=path)

    @property
    def device_unknown(self) -> str | None:  # type: ignore[override]
        """The inner backend's."""
        return getattr(self.inner, "device_unknown", None)

    @property
    def synthesized(self) -> str | None:  # type: ignore[override]
        """The inner backend's."""
        return getattr(self.inner, "synthesized", None)

    def connect(self, role: str = "driver", timeout: float = 5.0) -> Channel:
        """The inner backend's channel, recorded into the trace file."""
        from l4vctl.trace.record import SessionTrace, TraceChannel, TraceFile, default_path

        if self.path is None:
            self.path = default_path()
            from l4vctl.output import info

            info(f"recording the trace in {self.path}")
        channel = self.inner.connect(role, timeout)
        try:
            tf = TraceFile.get(self.path)
        except BaseException:
            channel.close()
            raise
        return TraceChannel(channel, SessionTrace(tf, self.inner_url, role))

    def load(self, fmt: str = "auto") -> tuple[bytes, str, dict[str, Any]]:
        """Never reached: a traced backend is live."""
        return self.inner.load(fmt)

    def close(self) -> None:
        """Close the inner backend."""
        self.inner.close()
