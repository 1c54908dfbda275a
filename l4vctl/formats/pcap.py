"""The classic libpcap capture file: a file header, then a record header before each frame.

Written in the writer's byte order; readers tell it by the magic number
(0xa1b2c3d4: microsecond timestamps).  LINKTYPE_ETHERNET frames start with
the Ethernet header (the virtio-net header is not part of them).
"""

from __future__ import annotations

from construct import Int16ul, Int32ul, Struct

#: Magic number of a capture with microsecond timestamps.
PCAP_MAGIC = 0xA1B2C3D4
PCAP_VERSION = (2, 4)
#: Link type of Ethernet frames (DLT_EN10MB).
LINKTYPE_ETHERNET = 1

pcap_file_header = Struct(
    "magic" / Int32ul * "0xa1b2c3d4: microsecond timestamps, in the writer's byte order",
    "version_major" / Int16ul * "2",
    "version_minor" / Int16ul * "4",
    "thiszone" / Int32ul * "GMT offset of the timestamps (0)",
    "sigfigs" / Int32ul * "accuracy of the timestamps (0)",
    "snaplen" / Int32ul * "longest frame part kept",
    "linktype" / Int32ul * "LINKTYPE_ETHERNET (1)",
)

pcap_record_header = Struct(
    "ts_sec" / Int32ul * "seconds since the epoch",
    "ts_usec" / Int32ul * "microseconds",
    "incl_len" / Int32ul * "bytes of the frame in the file",
    "orig_len" / Int32ul * "bytes of the frame on the wire",
)
