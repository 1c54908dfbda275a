"""The same l4vctl bench workloads against our emulator and qemu-storage-daemon, in one run.

Both serve a block device backed by an image file of the same size on the
same file system; the driver side (l4vctl's session, virtqueue and blk
driver) is identical, so the ratio compares the devices.  Printed as
emulator / qemu-storage-daemon; goal (issue 5): at least 1.0x on the QD32
workloads.

    python bench/vhost.py [--time 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import PY, machine

SIZE = 256 << 20


def bench(url: str, args: list[str]) -> dict:
    out = subprocess.run([PY, "-m", "l4vctl", "bench", url, *args, "--json"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return json.loads(out.stdout)["result"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", type=float, default=5.0)
    args = ap.parse_args()
    qsd_bin = shutil.which("qemu-storage-daemon")
    if not qsd_bin:
        sys.exit("qemu-storage-daemon is not installed (apt-get install qemu-system-common)")
    tmp = tempfile.mkdtemp()
    emu_img, qsd_img = os.path.join(tmp, "emu.img"), os.path.join(tmp, "qsd.img")
    for path in (emu_img, qsd_img):
        with open(path, "wb") as f:
            f.truncate(SIZE)
    emu_sock, qsd_sock = os.path.join(tmp, "emu.sock"), os.path.join(tmp, "qsd.sock")
    emu = subprocess.Popen([PY, "-m", "l4vctl", "emulate", "blk", "--socket", emu_sock, "--image", emu_img, "-q"],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    qsd = subprocess.Popen([qsd_bin, "--blockdev", f"driver=file,node-name=f0,filename={qsd_img}",
                            "--blockdev", "driver=raw,node-name=d0,file=f0", "--export",
                            f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={qsd_sock},writable=on"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        emu.stdout.readline()
        deadline = time.monotonic() + 20
        while not os.path.exists(qsd_sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        t = f"{args.time}s"
        cases = [
            ("4 KiB randread QD1", ["--workload", "randread", "--bs", "4k", "--qd", "1"]),
            ("4 KiB randread QD32", ["--workload", "randread", "--bs", "4k", "--qd", "32"]),
            ("64 KiB seqread QD32", ["--workload", "seqread", "--bs", "64k", "--qd", "32"]),
        ]
        print(f"# {machine()}; image files of {SIZE >> 20} MiB in {tmp}")
        print(f"{'workload':24s} {'emulator':>14s} {'qemu-storage-daemon':>22s} {'ratio':>7s}")
        for name, cargs in cases:
            e = bench(f"unix:{emu_sock}", [*cargs, "--time", t])
            q = bench(f"vhost-user:{qsd_sock}?type=blk", [*cargs, "--time", t])
            unit, ev, qv = (
                ("MB/s", e["mb_per_s"], q["mb_per_s"]) if "64 KiB" in name else ("req/s", e["iops"], q["iops"])
            )
            print(f"{name:24s} {ev:9,.0f} {unit:5s} {qv:14,.0f} {unit:5s}   {ev / qv:5.2f}x   "
                  f"(p50 {e['latency_us']['p50']:.0f} vs {q['latency_us']['p50']:.0f} us)")  # fmt: skip
    finally:
        emu.terminate()
        qsd.terminate()
        emu.wait(10)
        qsd.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
