"""Structs of the host's kernel interface that l4vctl passes to system calls (Linux, 64-bit)."""

from __future__ import annotations

from construct import Int64sl, Struct

#: ``struct timeval`` of SO_SNDTIMEO/SO_RCVTIMEO on 64-bit Linux.
timeval = Struct(
    "tv_sec" / Int64sl * "whole seconds",
    "tv_usec" / Int64sl * "microseconds",
)
