"""Decoding a 32768-entry split queue: derived fast codecs against the baseline.

Baseline: ``struct.iter_unpack`` over the descriptor table plus a plain
``struct.unpack_from`` of both rings, written directly in this script.
Measured: l4vctl's derived ring codecs (``l4vctl.formats.fast.ring()``) and,
for reference, the Construct schemas (parse and compiled parse).

    python bench/decode.py [--num 32768]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _util import best_of, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=32768)
    ap.add_argument("--skip-construct", action="store_true")
    args = ap.parse_args()
    num = args.num

    from l4vctl.formats import fast

    r = fast.ring()
    layout = r.simple_layout(num)
    buf = bytearray(os.urandom(layout["total"]))
    mv = memoryview(buf)
    d0, a0, u0 = layout["desc"], layout["avail"], layout["used"]

    def baseline():
        descs = list(struct.iter_unpack("<QIHH", mv[d0 : d0 + 16 * num]))
        avail = struct.unpack_from(f"<HH{num}HH", buf, a0)
        used = list(struct.iter_unpack("<II", mv[u0 + 4 : u0 + 4 + 8 * num]))
        return descs, avail, used

    def derived():
        return r.descriptors(buf, num, d0), r.avail(buf, num, a0), r.used(buf, num, u0)

    print(f"# {machine()}")
    print(f"# queue size {num}: {layout['total']} bytes (descriptors + both rings)")
    base = best_of(baseline, repeat=15)
    print(f"baseline struct.iter_unpack      {base * 1e3:8.2f} ms   1.00x")
    t = best_of(derived, repeat=15)
    print(f"l4vctl derived ring codecs       {t * 1e3:8.2f} ms   {t / base:.2f}x")
    if not args.skip_construct:
        from l4vctl.formats import ring

        schemas = (ring.desc_table(num), ring.vring_avail(num), ring.vring_used(num))

        def parse():
            return [s.parse(bytes(buf[o : o + s.sizeof()])) for s, o in zip(schemas, (d0, a0, u0))]

        compiled = [s.compile() for s in schemas]

        def parse_compiled():
            return [s.parse(bytes(buf[o : o + s.sizeof()])) for s, o in zip(compiled, (d0, a0, u0))]

        t = best_of(parse, repeat=3)
        print(f"construct parse                  {t * 1e3:8.2f} ms   {t / base:.2f}x")
        t = best_of(parse_compiled, repeat=3)
        print(f"construct compiled parse         {t * 1e3:8.2f} ms   {t / base:.2f}x")


if __name__ == "__main__":
    main()
