"""One exception hierarchy for everything l4vctl reports to a user.

Every class carries the process exit code and a short ``type`` string that
appears in the JSON error envelope.  Library code raises these; the CLI's
``main()`` turns them into one line on stderr and the exit code.
"""

from __future__ import annotations


class L4vError(Exception):
    """Base class: an error with a user-facing one-line message."""

    exit_code = 1
    type = "internal"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(L4vError):
    """Bad command line: unknown option value, conflicting options."""

    exit_code = 2
    type = "usage"


class UnavailableError(L4vError):
    """The device or backend cannot be reached or is not available here."""

    exit_code = 3
    type = "unavailable"


class ProtocolError(L4vError):
    """The peer broke the protocol: bad magic, malformed frame, bad reply."""

    exit_code = 4
    type = "protocol"


class FormatError(ProtocolError):
    """Bytes that do not decode: short file, malformed page or hex dump."""

    type = "format"


class NegotiationError(L4vError):
    """Feature negotiation failed or a required feature/device is missing."""

    exit_code = 5
    type = "negotiation"


class DeviceStateError(L4vError):
    """The device is in a fail state (DEVICE_NEEDS_RESET or FAILED)."""

    exit_code = 6
    type = "device_error"


class TimeoutExpired(L4vError):
    """A wait ran out of time."""

    exit_code = 7
    type = "timeout"


#: Exit codes as documented in README.md and the man pages.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (1, "internal error (a bug in l4vctl; run with --debug for a traceback)"),
    (2, "usage error: bad option, argument or option value"),
    (3, "device or backend unavailable"),
    (4, "protocol or format error: bad magic, malformed page, frame or file"),
    (5, "negotiation failed: FEATURES_OK refused, a required feature or device missing"),
    (6, "device error: DEVICE_NEEDS_RESET or FAILED, or a request failed with IOERR or UNSUPP"),
    (7, "timeout"),
    (130, "interrupted (Ctrl-C)"),
)

EXIT_INTERRUPTED = 130
