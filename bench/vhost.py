"""The same l4vctl bench workloads against our emulator and qemu-storage-daemon, in one run.

Both devices run as long-lived processes (``l4vctl emulate blk`` on a Unix
socket, qemu-storage-daemon exporting vhost-user-blk), each on an image file
of the same size on the same file system, written with the same random data
first so that reads return real data from the page cache.  The driver side
(l4vctl's session, virtqueue and blk driver, one ``l4vctl bench`` process per
sample) is identical, so the ratio compares the devices.

Each workload is warmed up on both devices, then measured in ``--pairs``
pairs; the pairs alternate which device runs first.  Every case runs twice by
default: unpinned, and with every process (this one, the bench driver, the
emulator and every thread of qemu-storage-daemon) on CPU 0.  Printed:
min / median / max of each device's figure and of the pairwise ratio
emulator / qemu-storage-daemon, the CPU time each device process used per
second of the run, and the CPUs each process may run on and was seen on.

Goals (issue 11): emulator / qemu-storage-daemon >= 1.0x median for 4 KiB
randread QD1 and QD32 and 64 KiB seqread QD32, unpinned and on one CPU;
64 KiB seqread >= 2 GB/s.

The reverse direction (``--direction linux``): Linux drives both devices.
One guest (Debian's kernel under QEMU TCG, tests/linux_guest.py) boots with
two vhost-user-blk disks, ``l4vctl emulate blk --vhost-user`` and
qemu-storage-daemon, on images of the same random data, and runs busybox
``dd`` with ``iflag=direct`` on each in interleaved pairs (alternating which
disk goes first): 4 KiB reads (one at a time, so req/s) and 64 KiB
sequential reads (MB/s), timed around each dd by the guest's clock.  Goals
(issue 13): emulator / qemu-storage-daemon >= 0.8x median for 4 KiB reads
and >= 1.0x for 64 KiB sequential reads.  ``--linux-subject qsd`` puts a
second qemu-storage-daemon in the emulator's place: the ratio of two equal
devices shows how far the harness itself can be trusted on this machine.

    python bench/vhost.py [--direction both|l4vctl|linux] [--linux-subject emulator|qsd] [--pairs 5] [--time 2]
                          [--cpus all|0] [--size 256] [--guest-pairs 21] [--guest-4k N] [--guest-64k-mib N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.linux_guest
from _util import (
    PY,
    add_placement_args,
    cpus_of,
    describe,
    interleave,
    machine,
    mmm,
    place,
    placements,
    print_goals,
    ratios,
)

#: (name, l4vctl bench arguments, figure) of the compared workloads.
CASES = [
    ("4 KiB randread QD1", ["--workload", "randread", "--bs", "4k", "--qd", "1"], "iops"),
    ("4 KiB randread QD32", ["--workload", "randread", "--bs", "4k", "--qd", "32"], "iops"),
    ("64 KiB seqread QD32", ["--workload", "seqread", "--bs", "64k", "--qd", "32"], "mb_per_s"),
]
UNITS = {"iops": "req/s", "mb_per_s": "MB/s"}
#: Seconds of the warm-up run of each device before a workload's pairs.
WARM_UP = 0.5
#: Seconds between looks at the CPUs the processes run on while a sample runs.
SAMPLE_EVERY = 0.1


# -- processes and the CPUs they run on -------------------------------------------------------


def threads_of(pid: int) -> list[int]:
    """The thread ids of a process (just ``pid`` if they cannot be listed)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid`` (e.g. the emulator an ``emu:`` bench forked)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return []


def pin(cpus: set[int] | None, pid: int) -> None:
    """Place every thread of process ``pid`` (see ``_util.place``)."""
    for tid in threads_of(pid):
        try:
            place(cpus, tid)
        except OSError:
            pass  # the thread ended meanwhile


def _stat(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used so far (all its threads)."""
    fields = _stat(f"/proc/{pid}/stat")
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Seen:
    """The CPUs processes (every thread of them) were seen running on."""

    def __init__(self) -> None:
        self.cpus: dict[str, set[int]] = {}

    def sample(self, name: str, pid: int) -> None:
        for tid in threads_of(pid):
            fields = _stat(f"/proc/{pid}/task/{tid}/stat")
            if fields is not None and len(fields) > 36:
                self.cpus.setdefault(name, set()).add(int(fields[36]))

    def ran_on(self, name: str) -> str:
        return ",".join(map(str, sorted(self.cpus.get(name, ())))) or "?"


def bench(url: str, args: list[str], seconds: float, cpus: set[int] | None, seen: Seen,
          device: tuple[str, int] | None = None, child: str | None = None) -> dict:  # fmt: skip
    """One ``l4vctl bench`` run (a process of its own, placed on ``cpus``); its JSON result.

    While it runs, the CPUs of the driver, of ``device`` (name, pid) and of
    the bench's own children (named ``child``: an ``emu:`` emulator) are
    sampled; ``result["device_cpu"]`` is the CPU time the device process used
    per second of the run.
    """
    cmd = [PY, "-m", "l4vctl", "bench", url, *args, "--time", f"{seconds}s", "--json"]
    before = cpu_seconds(device[1]) if device else 0.0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pin(cpus, proc.pid)  # it inherited this process's placement already; made sure of
    kids: set[int] = set()
    while True:
        try:
            proc.wait(SAMPLE_EVERY)
            break
        except subprocess.TimeoutExpired:
            pass
        seen.sample("driver", proc.pid)
        if device:
            seen.sample(*device)
        if child:
            for kid in children_of(proc.pid):
                if kid not in kids:  # inherited the placement at fork; made sure of, by pid
                    kids.add(kid)
                    pin(cpus, kid)
                seen.sample(child, kid)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()}")
    result = json.loads(out)["result"]
    if device:
        result["device_cpu"] = (cpu_seconds(device[1]) - before) / wall
    return result


# -- the devices ----------------------------------------------------------------------------------


def write_images(paths: list[str], size: int) -> None:
    """Fill each image with the same random data (so reads move real bytes)."""
    files = [open(p, "wb") for p in paths]  # noqa: SIM115 - closed below
    try:
        chunk = 1 << 20
        for _ in range(size // chunk):
            data = os.urandom(chunk)
            for f in files:
                f.write(data)
    finally:
        for f in files:
            f.close()


def qsd_command(binary: str, image: str, sock: str) -> list[str]:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk at ``sock`` (its defaults otherwise)."""
    export = f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},writable=on"
    return [binary, "--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--blockdev", "driver=raw,node-name=d0,file=f0", "--export", export]  # fmt: skip


def start_qsd(binary: str, image: str, sock: str, cpus: set[int] | None) -> subprocess.Popen:
    """Start qemu-storage-daemon, wait for its socket, place all its threads."""
    proc = subprocess.Popen(qsd_command(binary, image, sock), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"qemu-storage-daemon did not start: {err.strip()}")
        time.sleep(0.02)
    pin(cpus, proc.pid)
    return proc


def start_emulator(image: str, sock: str, cpus: set[int] | None, *extra: str) -> subprocess.Popen:
    """Start ``l4vctl emulate blk`` on ``image``, wait until it is ready, place it.

    ``extra`` arguments go to the emulator (``--vhost-user PATH`` serves over vhost-user instead).
    """
    where = list(extra) if "--vhost-user" in extra else ["--socket", sock, *extra]
    proc = subprocess.Popen([PY, "-m", "l4vctl", "emulate", "blk", *where, "--image", image, "-q"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.readline()  # the URL: ready
    pin(cpus, proc.pid)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def report(name: str, figure: str, subj: list[dict], base: list[dict], subj_name: str, base_name: str) -> float:
    """Print one workload's figures; returns the median ratio."""
    unit = UNITS[figure]
    s = [r[figure] for r in subj]
    b = [r[figure] for r in base]
    ratio = ratios(s, b)
    fmt = ",.0f"
    print(f"{name}")
    print(f"  {subj_name:22s} {unit:6s} {mmm(s, 1.0, fmt)}")
    print(f"  {base_name:22s} {unit:6s} {mmm(b, 1.0, fmt)}")
    print(f"  {'ratio':22s} {'x':6s} {mmm(ratio, 1.0, '.2f')}")
    p50s = statistics.median(r["latency_us"]["p50"] for r in subj)
    p50b = statistics.median(r["latency_us"]["p50"] for r in base)
    print(f"  p50 latency (median of the samples): {subj_name} {p50s:.1f} us, {base_name} {p50b:.1f} us")
    if "device_cpu" in subj[0] and "device_cpu" in base[0]:
        cs = statistics.median(r["device_cpu"] for r in subj)
        cb = statistics.median(r["device_cpu"] for r in base)
        print(f"  device CPU per second of run (median): {subj_name} {cs:.2f} s, {base_name} {cb:.2f} s")
    return statistics.median(ratio)


def run_placement(cpus: set[int] | None, args, qsd_bin: str, emu_img: str, qsd_img: str, tmp: str) -> dict:
    place(cpus)  # this process first: everything it starts inherits the placement
    emu_sock, qsd_sock = os.path.join(tmp, "emu.sock"), os.path.join(tmp, "qsd.sock")
    emu = start_emulator(emu_img, emu_sock, cpus)
    qsd = start_qsd(qsd_bin, qsd_img, qsd_sock, cpus)
    seen = Seen()
    results = {}
    try:
        allowed = f"bench driver {cpus_of(0)}, emulator {cpus_of(emu.pid)}, qemu-storage-daemon " + "/".join(
            sorted({cpus_of(t) for t in threads_of(qsd.pid)})
        )
        print(f"\n## {describe(cpus)}; {args.pairs} pairs of {args.time:g} s per workload; min / median / max")
        print(f"CPUs allowed: {allowed}")
        for name, cargs, figure in CASES:

            def subject(seconds=args.time, cargs=cargs):
                return bench(f"unix:{emu_sock}", cargs, seconds, cpus, seen, ("emulator", emu.pid))

            def baseline(seconds=args.time, cargs=cargs):
                return bench(f"vhost-user:{qsd_sock}?type=blk", cargs, seconds, cpus, seen,
                             ("qemu-storage-daemon", qsd.pid))  # fmt: skip

            baseline(WARM_UP)  # warm up both (page cache, code paths), in the other order than the first pair
            subject(WARM_UP)
            subj, base = interleave(subject, baseline, args.pairs)
            results[name] = (report(name, figure, subj, base, "emulator", "qemu-storage-daemon"), subj, figure)
        ran = ", ".join(f"{n} {seen.ran_on(n)}" for n in ("driver", "emulator", "qemu-storage-daemon"))
        print(f"CPUs seen: {ran}")
    finally:
        stop(emu)
        stop(qsd)
        place(None)
    return results


# -- the reverse direction: a Linux guest drives both devices ------------------------------------

#: (name, dd block size, figure) of the guest's workloads; the counts come from the options.
GUEST_CASES = [
    ("4 KiB reads (dd iflag=direct, QD1)", 4096, "iops"),
    ("64 KiB seqread (dd iflag=direct)", 65536, "mb_per_s"),
]
#: The serial our device reports (GET_ID), by which the guest tells the two disks apart.
SERIAL = "l4vctl-bench"

GUEST_SCRIPT = """
{pick}
[ -n "$ours" ] && [ -n "$theirs" ] || {{ echo "disks: ours '$ours' theirs '$theirs'"; exit 1; }}
now() {{  # seconds.microseconds (busybox date has no %N)
    adjtimex | awk '/tv_sec/ {{ s = $2 }} /tv_usec/ {{ u = $2 }} END {{ printf "%d.%06d", s, u }}'
}}
sample() {{  # CASE WHO DEV BS COUNT
    t0=$(now)
    out=$(dd if=/dev/$3 of=/dev/null bs=$4 count=$5 iflag=direct 2>&1)
    t1=$(now)
    recs=$(echo "$out" | sed -n 's/^\\([0-9]*\\)+0 records in$/\\1/p')
    [ "$recs" = $5 ] || {{ echo "sample $1 $2 failed: $out"; return; }}
    echo "sample $1 $2 $(($5 * $4)) $t0 $t1"
}}
pair() {{  # I CASE BS COUNT: alternate which disk goes first
    if [ $(($1 % 2)) = 0 ]; then
        sample $2 emulator $ours $3 $4; sample $2 qsd $theirs $3 $4
    else
        sample $2 qsd $theirs $3 $4; sample $2 emulator $ours $3 $4
    fi
}}
for c in {cases}; do
    set -- $(echo $c | tr : ' ')
    sample warm qsd $theirs $2 $(($3 / 4 + 1)); sample warm emulator $ours $2 $(($3 / 4 + 1))
    i=0
    while [ $i -lt {pairs} ]; do pair $i $1 $2 $3; i=$((i+1)); done
done
"""
DD_LINE = re.compile(r"^sample (\S+) (\S+) (\d+) ([\d.]+) ([\d.]+)$")


#: How the guest finds the subject's disk: by our serial; or, when the subject is a second
#: qemu-storage-daemon (no serial to tell them apart), as the first disk (the lower PCI slot).
PICK_BY_SERIAL = f"""ours=; theirs=
for d in /sys/block/vd*; do
    if [ "$(cat $d/serial 2>/dev/null)" = {SERIAL} ]; then ours=${{d##*/}}; else theirs=${{d##*/}}; fi
done"""
PICK_BY_ORDER = "ours=vda; theirs=vdb"


def guest_script(pairs: int, n4k: int, mib64: int, by_serial: bool = True) -> str:
    """The guest's check: interleaved dd pairs of every case, one ``sample CASE WHO BYTES T0 T1`` line each."""
    counts = {4096: n4k, 65536: mib64 * 16}
    cases = " ".join(f"{i}:{bs}:{counts[bs]}" for i, (_n, bs, _f) in enumerate(GUEST_CASES))
    pick = PICK_BY_SERIAL if by_serial else PICK_BY_ORDER
    return GUEST_SCRIPT.format(pick=pick, cases=cases, pairs=pairs)


def guest_samples(lines: list[str]) -> dict[int, dict[str, list[dict]]]:
    """case index -> device -> samples ({"iops", "mb_per_s"}) from the guest's dd lines."""
    out: dict[int, dict[str, list[dict]]] = {}
    for line in lines:
        m = DD_LINE.match(line)
        if not m:
            if line.startswith("sample"):
                raise RuntimeError(f"the guest's dd failed: {line}")
            continue
        case, who, nbytes, secs = m.group(1), m.group(2), int(m.group(3)), float(m.group(5)) - float(m.group(4))
        if case == "warm" or secs <= 0:
            continue
        bs = GUEST_CASES[int(case)][1]
        out.setdefault(int(case), {}).setdefault(who, []).append(
            {"iops": nbytes / bs / secs, "mb_per_s": nbytes / 1e6 / secs, "seconds": secs}
        )
    return out


def run_linux(cpus: set[int] | None, args, qsd_bin: str, emu_img: str, qsd_img: str, tmp: str) -> dict:
    """One guest, both devices, every guest case in interleaved pairs; name -> (median ratio, samples, figure)."""
    from tests import linux_guest as lg

    place(cpus)  # this process first: the emulator, qemu-storage-daemon and QEMU inherit the placement
    emu_sock, qsd_sock = os.path.join(tmp, "emu-vu.sock"), os.path.join(tmp, "qsd-vu.sock")
    workdir = tempfile.mkdtemp(dir=tmp)
    guest = lg.guest(Path(workdir))
    if args.linux_subject == "qsd":  # the harness against itself: a second qemu-storage-daemon as the subject
        emu = start_qsd(qsd_bin, emu_img, emu_sock, cpus)
    else:
        emu = start_emulator(emu_img, emu_sock, cpus, "--vhost-user", emu_sock, "--serial", SERIAL)
    subject = "emulator" if args.linux_subject == "emulator" else "qsd (subject)"
    qsd = start_qsd(qsd_bin, qsd_img, qsd_sock, cpus)
    results = {}
    try:
        cpu0 = {"emulator": cpu_seconds(emu.pid), "qemu-storage-daemon": cpu_seconds(qsd.pid)}
        script = guest_script(args.guest_pairs, args.guest_4k, args.guest_64k_mib, args.linux_subject == "emulator")
        seen, done = Seen(), threading.Event()
        allowed: dict[str, str] = {}

        def watch() -> None:  # the CPUs QEMU (every thread) and both devices run on, while the guest runs
            while not done.wait(SAMPLE_EVERY):
                qemu = guest.proc
                for name, pid in (("QEMU", qemu.pid if qemu else 0), (subject, emu.pid),
                                  ("qemu-storage-daemon", qsd.pid)):  # fmt: skip
                    if pid:
                        seen.sample(name, pid)
                        allowed.setdefault(name, "/".join(sorted({cpus_of(t) for t in threads_of(pid)})))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            r = guest.boot({"bench": script}, lg.blk(emu_sock, 0) + lg.blk(qsd_sock, 1), timeout=1800,
                           append="L4VG_CHECK_TIMEOUT=1500")  # fmt: skip
        finally:
            done.set()
            watcher.join(5)
        check = r.ok("bench")
        used = {"emulator": cpu_seconds(emu.pid) - cpu0["emulator"],
                "qemu-storage-daemon": cpu_seconds(qsd.pid) - cpu0["qemu-storage-daemon"]}  # fmt: skip
        samples = guest_samples(check.lines)
        print(f"\n## a Linux guest (kernel {guest.img.release}, QEMU TCG {guest.machine}) reads both disks; "
              f"{describe(cpus)}; {args.guest_pairs} pairs; min / median / max")  # fmt: skip
        print(f"guest boot to power-off: {r.seconds:.1f} s; device CPU during it: {subject} {used['emulator']:.1f} s, "
              f"qemu-storage-daemon {used['qemu-storage-daemon']:.1f} s")  # fmt: skip
        for i, (name, _bs, figure) in enumerate(GUEST_CASES):
            subj, base = samples.get(i, {}).get("emulator", []), samples.get(i, {}).get("qsd", [])
            if len(subj) != args.guest_pairs or len(base) != args.guest_pairs:
                raise RuntimeError(f"{name}: {len(subj)}/{len(base)} samples, not {args.guest_pairs}:\n{check.text}")
            unit = UNITS[figure]
            s, b = [x[figure] for x in subj], [x[figure] for x in base]
            ratio = ratios(s, b)
            print(name)
            print(f"  {subject:22s} {unit:6s} {mmm(s, 1.0, ',.1f')}")
            print(f"  {'qemu-storage-daemon':22s} {unit:6s} {mmm(b, 1.0, ',.1f')}")
            print(f"  {'ratio':22s} {'x':6s} {mmm(ratio, 1.0, '.2f')}")
            print(f"  seconds per sample (median): {subject} {statistics.median(x['seconds'] for x in subj):.2f}, "
                  f"qemu-storage-daemon {statistics.median(x['seconds'] for x in base):.2f}")  # fmt: skip
            results[name] = (statistics.median(ratio), subj, figure)
        names = ("QEMU", subject, "qemu-storage-daemon")
        print("CPUs allowed: " + ", ".join(f"{n} {allowed.get(n, '?')}" for n in names))
        print("CPUs seen: " + ", ".join(f"{n} {seen.ran_on(n)}" for n in names))
    finally:
        guest.kill()
        stop(emu)
        stop(qsd)
        place(None)
        shutil.rmtree(workdir, ignore_errors=True)
    return results


#: Goals of the reverse direction (issue 13): the median ratio emulator / qsd of each guest case.
GUEST_GOALS = {GUEST_CASES[0][0]: 0.8, GUEST_CASES[1][0]: 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_placement_args(ap)
    ap.add_argument("--time", type=float, default=2.0, help="seconds per sample")
    ap.add_argument("--size", type=int, default=256, help="image size in MiB")
    ap.add_argument("--dir", default=None, help="where the images go (default: a temporary directory)")
    ap.add_argument("--direction", choices=["both", "l4vctl", "linux"], default="both",
                    help="l4vctl's driver against both devices, a Linux guest against both, or both")  # fmt: skip
    ap.add_argument("--linux-subject", choices=["emulator", "qsd"], default="emulator",
                    help="what the guest compares with qemu-storage-daemon: our emulator, or (to check the "
                         "harness) a second qemu-storage-daemon")  # fmt: skip
    ap.add_argument("--guest-pairs", type=int, default=21,
                    help="interleaved pairs per guest case (many short pairs: each pair's two samples see the "
                         "same load)")  # fmt: skip
    ap.add_argument("--guest-4k", type=int, default=2000, help="4 KiB reads per guest sample")
    ap.add_argument("--guest-64k-mib", type=int, default=64, help="MiB read in 64 KiB requests per guest sample")
    args = ap.parse_args()
    if args.guest_64k_mib > args.size:
        ap.error("--guest-64k-mib: at most --size")
    if args.guest_pairs < 5:
        ap.error("--guest-pairs: at least 5 pairs make a comparison")
    if args.pairs < 5:
        ap.error("--pairs: at least 5 pairs make a comparison")
    qsd_bin = shutil.which("qemu-storage-daemon")
    if not qsd_bin:
        sys.exit("qemu-storage-daemon is not installed (apt-get install qemu-system-common)")
    tmp = tempfile.mkdtemp(dir=args.dir)
    emu_img, qsd_img = os.path.join(tmp, "emu.img"), os.path.join(tmp, "qsd.img")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# emulator vs qemu-storage-daemon: {machine()}; load average {load}")
    print(f"# images: {args.size} MiB of random data each in {tmp}; {' '.join(qsd_command(qsd_bin, qsd_img, 'SOCK'))}")
    goals = []
    try:
        write_images([emu_img, qsd_img], args.size << 20)
        for cpus in placements(args.cpus):
            if args.direction in ("both", "l4vctl"):
                results = run_placement(cpus, args, qsd_bin, emu_img, qsd_img, tmp)
                for name, (ratio, subj, figure) in results.items():
                    goals.append((f"{describe(cpus)}: {name} emulator / qsd >= 1.0x median", ratio >= 1.0,
                                  f"{ratio:.2f}x"))  # fmt: skip
                    if figure == "mb_per_s":
                        mbs = statistics.median(r[figure] for r in subj)
                        goals.append((f"{describe(cpus)}: {name} >= 2,000 MB/s median", mbs >= 2000,
                                      f"{mbs:,.0f} MB/s"))  # fmt: skip
            if args.direction in ("both", "linux"):
                try:
                    results = run_linux(cpus, args, qsd_bin, emu_img, qsd_img, tmp)
                except Exception as e:  # the guest needs Debian packages; say what is missing
                    sys.exit(f"the Linux guest: {e}")
                for name, (ratio, _subj, _figure) in results.items():
                    if args.linux_subject == "qsd":
                        goals.append((f"{describe(cpus)}: harness check, Linux guest, {name} qsd / qsd ~ 1.0x median",
                                      0.9 <= ratio <= 1.1, f"{ratio:.2f}x"))  # fmt: skip
                        continue
                    want = GUEST_GOALS[name]
                    goals.append((f"{describe(cpus)}: Linux guest, {name} emulator / qsd >= {want}x median",
                                  ratio >= want, f"{ratio:.2f}x"))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_goals(goals)


if __name__ == "__main__":
    main()
