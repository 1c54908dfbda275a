"""The words of a monitor STATS reply, read into a dict (layout in docs/wire-protocol.md)."""

from __future__ import annotations

from typing import Any

from l4vctl import catalog as cat
from l4vctl.errors import ProtocolError


def parse_stats(words: list[int]) -> dict[str, Any]:
    """STATS words -> ``{stats_version, <STATS_GLOBAL>, queues: [<STATS_QUEUE>], ...}``.

    A version 2 reply (an extension after the version 1 words) adds the
    STATS_GLOBAL_V2 words, the STATS_QUEUE_V2 words of each queue and
    ``reason`` (the device's reason for its last error, "" if none);
    ``stats_version`` then says 2.  A version 1 reply has none of them.
    """
    ng = len(cat.STATS_GLOBAL)
    nq_words = len(cat.STATS_QUEUE)
    if len(words) < ng or words[0] != 1:
        raise ProtocolError("monitor STATS reply has an unknown layout")
    out: dict[str, Any] = dict(zip(cat.STATS_GLOBAL, words[:ng]))
    queues = []
    pos = ng
    for _ in range(out["num_queues"]):
        chunk = words[pos : pos + nq_words]
        if len(chunk) != nq_words:
            raise ProtocolError("monitor STATS reply is truncated")
        queues.append(dict(zip(cat.STATS_QUEUE, chunk)))
        pos += nq_words
    out["queues"] = queues
    if len(words) > pos and words[pos] >= 2:
        _extension(words, pos, out)
    return out


def _extension(words: list[int], pos: int, out: dict[str, Any]) -> None:
    """The version 2 words from ``pos`` on (a version above 2 is read as far as version 2 goes)."""
    g2, q2 = cat.STATS_GLOBAL_V2, cat.STATS_QUEUE_V2
    queues = out["queues"]
    need = 1 + len(g2) + len(q2) * len(queues) + 1
    if len(words) < pos + need:
        raise ProtocolError("monitor STATS reply: its version 2 part is truncated")
    pos += 1
    out.update(zip(g2, words[pos : pos + len(g2)]))
    pos += len(g2)
    for q in queues:
        q.update(zip(q2, words[pos : pos + len(q2)]))
        pos += len(q2)
    length = words[pos]
    pos += 1
    chars = words[pos : pos + length]
    if length > cat.STATS_REASON_MAX or len(chars) != length:
        raise ProtocolError("monitor STATS reply: its reason does not fit the reply")
    # one character per word; a word that is no character (or a surrogate) reads as U+FFFD
    out["reason"] = "".join(chr(w) if w < 0x110000 and not 0xD800 <= w < 0xE000 else "\ufffd" for w in chars)
    out["stats_version"] = 2
