"""Writing Ethernet frames to a classic libpcap file (what ``net --pcap FILE`` makes).

Wireshark and tcpdump read it: the file header (LINKTYPE_ETHERNET,
microsecond timestamps), then for each frame its record header and its
bytes.  Every frame is flushed as it is written, so a capture that ends early
is still readable up to its last frame.
"""

from __future__ import annotations

import time

from l4vctl.errors import UnavailableError
from l4vctl.formats.fast import codec
from l4vctl.formats.pcap import LINKTYPE_ETHERNET, PCAP_MAGIC, PCAP_VERSION

#: Longest frame part kept (every frame l4vctl handles is shorter).
SNAPLEN = 65535


class PcapWriter:
    """A capture file being written (a context manager)."""

    def __init__(self, path: str):
        self.path = path
        self.frames = 0
        try:
            self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise UnavailableError(f"{path}: {exc.strerror or exc}") from None
        self._record = codec("pcap_record_header")
        self._write(codec("pcap_file_header").pack({
            "magic": PCAP_MAGIC, "version_major": PCAP_VERSION[0], "version_minor": PCAP_VERSION[1],
            "thiszone": 0, "sigfigs": 0, "snaplen": SNAPLEN, "linktype": LINKTYPE_ETHERNET,
        }))  # fmt: skip

    def _write(self, data: bytes) -> None:
        try:
            self.f.write(data)
            self.f.flush()
        except OSError as exc:
            raise UnavailableError(f"{self.path}: {exc.strerror or exc}") from None

    def frame(self, data: bytes, when: float | None = None) -> None:
        """Add one Ethernet frame (without its virtio-net header), stamped ``when`` (default: now)."""
        when = time.time() if when is None else when
        sec = int(when)
        usec = min(int((when - sec) * 1e6), 999_999)
        kept = bytes(data[:SNAPLEN])
        header = self._record.pack({"ts_sec": sec, "ts_usec": usec, "incl_len": len(kept), "orig_len": len(data)})
        self._write(header + kept)
        self.frames += 1

    def close(self) -> None:
        """Close the file."""
        if not self.f.closed:
            self.f.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoCapture:
    """What a command without --pcap writes frames to: nothing."""

    frames = 0

    def frame(self, data: bytes, when: float | None = None) -> None:
        """Drop the frame."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> NoCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def capture(path: str | None) -> PcapWriter | NoCapture:
    """A writer for ``path``, or one that drops frames when there is no path."""
    return PcapWriter(path) if path else NoCapture()
