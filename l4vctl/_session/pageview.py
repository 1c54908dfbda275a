"""The config page as the session sees it: single loads and stores of header fields."""

from __future__ import annotations

from typing import Any

from l4vctl import page as pg
from l4vctl.backends.base import Memory


class PageView:
    """Header fields of a config page held in a :class:`~l4vctl.backends.base.Memory`.

    A local mapping is read and written through typed memoryviews (one load
    or store per field); a memory without a local view through its ranges.
    """

    __slots__ = ("memory", "page", "abi_choice", "hc", "w32", "closed", "_casts")

    def __init__(self, memory: Memory, abi_request: str, hints: dict[str, Any]):
        self.memory = memory
        view = memory.view()
        self.page: memoryview | None = view
        self.abi_choice: pg.AbiChoice = pg.choose_abi(view if view is not None else self.snapshot(), abi_request, hints)
        self.hc = pg.header_codec(self.abi_choice.abi)
        self.w32: memoryview | None = view.cast("I") if view is not None and len(view) % 4 == 0 else None
        self._casts: list[memoryview] = []
        self.closed = False

    @property
    def abi(self) -> str:
        """The ABI era the page is read in."""
        return self.abi_choice.abi

    def snapshot(self) -> bytes:
        """The whole page, copied."""
        if self.page is not None:
            return bytes(self.page)
        return self.memory.read([(0, self.memory.size)])[0]

    def get(self, name: str) -> int:
        """One header field (KeyError for a field the layout lacks)."""
        off, size, _fmt, _count = self.hc.fields[name]
        if size == 4 and self.w32 is not None:
            return self.w32[off >> 2]
        if self.page is not None:
            return int.from_bytes(self.page[off : off + size], "little")
        return int.from_bytes(self.memory.read([(off, size)])[0], "little")

    def set(self, name: str, value: int) -> None:
        """Store a 32-bit header field (one store)."""
        off, _size, _fmt, _count = self.hc.fields[name]
        self.store32(off >> 2, value & 0xFFFFFFFF)

    def store32(self, index: int, value: int) -> None:
        """Store 32-bit word ``index`` of the page (one store)."""
        if self.w32 is not None:
            self.w32[index] = value
        else:
            self.memory.write([(index << 2, value.to_bytes(4, "little"))])

    def words(self, name: str) -> list[int]:
        """The 32-bit words of an array field."""
        off, _size, _fmt, count = self.hc.fields[name]
        if self.w32 is not None:
            return list(self.w32[off >> 2 : (off >> 2) + count])
        # a saved page whose length is not a multiple of 4, or memory elsewhere: the header is still whole
        raw = (
            bytes(self.page[off : off + 4 * count])
            if self.page is not None
            else self.memory.read([(off, 4 * count)])[0]
        )
        return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, 4 * count, 4)]

    def set_words(self, name: str, words: list[int]) -> None:
        """Store the words of an array field, one 32-bit store each."""
        off = self.hc.fields[name][0]
        for i, word in enumerate(words):
            self.store32((off >> 2) + i, word)

    def header(self) -> dict[str, Any]:
        """The header decoded."""
        return self.hc.unpack(self.page if self.page is not None else self.snapshot())

    def cast(self, fmt: str) -> memoryview:
        """A typed view of the whole page (released with the view); local mappings only."""
        assert self.page is not None, "typed views need a local mapping"
        view = self.page.cast(fmt)  # type: ignore[call-overload]  # the format is only known at run time
        self._casts.append(view)
        return view

    def release(self) -> None:
        """Release the typed views and the memory."""
        for view in reversed(self._casts):
            view.release()
        self._casts.clear()
        if self.w32 is not None:
            self.w32.release()
        self.w32 = None
        self.page = None
        self.closed = True
        self.memory.close()  # later reads fail (ValueError); the ABI choice and codec stay
