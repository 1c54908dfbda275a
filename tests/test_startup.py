"""Start-up: what commands import, monitors of emu: served in this process, the fast exit.

No timing is asserted here (bench/startup.py measures); these tests pin the
behaviour the start-up work must keep.
"""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4vctl.backends.base import parse_qsl, parse_query
from l4vctl.errors import UsageError

# -- device URL options without urllib.parse ------------------------------------------------------

_QUERY_CHARS = st.sampled_from([*"ab=&%+;?2Ff0cC3A9 xg", "é", "©", "€", "\U0001f600", "%e2%82", "%C3%A9"])


@given(st.lists(_QUERY_CHARS, max_size=24).map("".join))
def test_query_parsing_matches_urllib(query):
    try:
        expected = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        with pytest.raises(ValueError):
            parse_qsl(query)
    else:
        assert parse_qsl(query) == expected


def test_parse_query_options_and_errors():
    assert parse_query("blk", "emu", "?size=1M") == ("blk", {})
    assert parse_query("blk?", "emu", "?size=1M") == ("blk", {})
    assert parse_query("blk?size=1M&image=/tmp/a%20b+c&ro=", "emu", "?size=1M") == (
        "blk",
        {"size": "1M", "image": "/tmp/a b c", "ro": ""},
    )
    with pytest.raises(UsageError, match="options must look like"):
        parse_query("blk?a&&b", "emu", "?size=1M")
