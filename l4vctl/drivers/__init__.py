"""Device-class drivers on top of a Session and its virtqueues."""

from __future__ import annotations

#: What each driver needs, as a noun for messages.
NOUNS = {"blk": "a block device", "net": "a network device", "console": "a console", "rng": "an entropy device"}


def require_class(session, cls: str, what: str | None = None) -> None:
    """Refuse a device that is not of class ``cls`` before any request of that class is sent.

    A device of another class is a missing device (NegotiationError, exit 5);
    a device whose class the backend cannot know (vhost-user without
    ``?type=``) is a usage error (exit 2): the user must say what it is.
    """
    from l4vctl import catalog as cat
    from l4vctl.errors import NegotiationError, UsageError

    noun = NOUNS.get(cls, f"a {cls} device")
    what = what or f"{cls} I/O"
    unknown = getattr(session.backend, "device_unknown", None)
    if unknown:
        url = session.url
        suggestion = url + ("&" if "?" in url else "?") + f"type={cls}"
        raise UsageError(
            f"{url}: device type {unknown}; {what} needs {noun}",
            hint=f"if it is {noun}, say so: {suggestion}",
        )
    device_id = session.get("device")
    if device_id != cat.DEVICE_CLASSES[cls]:
        raise NegotiationError(
            f"{session.url} is not {noun} (it is {cat.device_name(device_id)}, id {device_id}): {what} needs {noun}"
        )
