"""Records of split-ring data: a descriptor and a used element.

Field names and order are those of the ``vring_desc`` and ``vring_used_elem``
schemas (a test checks them).  Hot paths unpack straight into locals in
this order, through the derived codecs; a record is for code that keeps,
compares or shows one.  Kept apart from :mod:`l4vctl.formats.fast` because
building the classes costs start-up time that the I/O path need not pay.
"""

from __future__ import annotations

from typing import NamedTuple


class Descriptor(NamedTuple):
    """One split-ring descriptor as a record; fields in the order of ``vring_desc``.

    Bulk and per-request paths unpack descriptors straight into locals in this
    order (``Ring.desc.struct``); a record is for code that keeps or shows one.
    """

    addr: int
    len: int
    flags: int
    next: int


class UsedElem(NamedTuple):
    """One used-ring element as a record; fields in the order of ``vring_used_elem``."""

    id: int
    len: int
