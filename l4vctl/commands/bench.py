"""``l4vctl bench``: block I/O load through a real virtqueue, fio style."""

from __future__ import annotations

import os
import random
import re
import sys
import time
from array import array
from collections.abc import Sequence

import click

from l4vctl.commands._common import Command, Driven, examples, io_options
from l4vctl.errors import UsageError

WORKLOADS = ("randread", "seqread", "randwrite", "seqwrite")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m)?$")


def parse_duration(text: str) -> float:
    """Seconds in a --time value (10s, 500ms, 2m; a bare number is seconds); UsageError if not positive."""
    m = _DURATION.match(text.strip())
    if not m:
        raise UsageError(f"--time {text!r} is not a duration like 10s, 500ms or 2m")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    if value <= 0:
        raise UsageError("--time must be positive")
    return value


def parse_bs(text: str) -> int:
    """Bytes in a --bs value (4k, 64KiB, ...); UsageError unless a positive multiple of 512."""
    from l4vctl.parsing import parse_size

    try:
        value = parse_size(text)
    except ValueError as exc:
        raise UsageError(f"--bs: {exc}") from None
    if value < 512 or value % 512:
        raise UsageError(f"--bs {text!r} must be a positive multiple of 512 bytes")
    return value


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ascending values; 0.0 for none."""
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


@click.command(
    cls=Command,
    epilog=examples(
        ("l4vctl bench", "4 KiB random reads, 32 in flight, 10 s, on an emulated device:"),
        ("l4vctl bench unix:/tmp/blk.sock --workload seqread --bs 64k --time 5s", "Sequential 64 KiB reads:"),
        ("l4vctl bench emu:blk?size=1G --workload randwrite --qd 1 --json", "Write latency at queue depth 1:"),
    ),
)
@io_options
@click.option("--workload", type=click.Choice(WORKLOADS), default="randread", show_default=True, help="Access pattern.")
@click.option("--bs", default="4k", show_default=True, help="Bytes per request (a multiple of 512).")
@click.option("--qd", type=click.IntRange(1, 1024), default=32, show_default=True, help="Requests in flight.")
@click.option("--time", "duration", default="10s", show_default=True, help="How long to run (10s, 500ms, 2m).")
@click.option("--indirect", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Requests as indirect descriptors (auto: when negotiated).")  # fmt: skip
@click.option("--seed", type=int, default=None, help="Seed for the random offsets.")
@click.pass_context
def bench(ctx, device, device_opt, abi, mode, timeout, json_mode, workload, bs, qd, duration, indirect, seed):
    """Load a block device and report requests/s, MB/s and latency percentiles.

    Requests go through queue 0 (of however many the device has: 'queue' and
    'num_queues' in the output say so) with up to --qd in flight; completions are
    reaped in batches and each one is replaced at once.  Latency is measured
    per request from submission to the moment the driver sees it completed.
    On a terminal, progress is shown while it runs.
    """
    from l4vctl import catalog as cat
    from l4vctl.drivers.blk import BlkDriver

    size = parse_bs(bs)
    seconds = parse_duration(duration)
    want_indirect = {"auto": None, "on": True, "off": False}[indirect]
    run = Driven(ctx, "bench", json_mode, device, device_opt, abi, mode, timeout, device_class="blk")
    with run as s:
        drv = BlkDriver(s, depth=qd, max_io=size, indirect=want_indirect)
        if drv.depth < qd:
            from l4vctl.output import warn

            warn(f"queue depth limited to {drv.depth} by the queue size {drv.vq.num}")
        write = workload.endswith("write")
        if write and drv.read_only:
            raise UsageError("the device is read-only (VIRTIO_BLK_F_RO): choose a read workload")
        span = size // 512
        positions = drv.capacity // span
        if positions < 1:
            raise UsageError(f"the device ({drv.capacity} sectors) is smaller than one {size}-byte request")
        rng = random.Random(seed)
        rtype = cat.BLK_T_OUT if write else cat.BLK_T_IN
        if write:
            fill = (b"l4vctl-bench" * (size // 12 + 1))[:size]
            for slot in drv.slots:
                slot.data[:size] = fill
        sequential = workload.startswith("seq")
        state = {"next": 0}
        uniform = rng.random  # int(random() * n): uniform over n < 2**53 positions, cheaper than randrange

        def next_sector() -> int:
            if sequential:
                pos = state["next"]
                state["next"] = (pos + 1) % positions
                return pos * span
            return int(uniform() * positions) * span

        lat = array("Q")
        done = 0
        live = _Live(seconds, enabled=sys.stderr.isatty())
        start = time.perf_counter()
        end = start + seconds
        for slot in drv.slots[: drv.depth]:
            drv.submit(slot, rtype, next_sector(), size)
        drv.kick()
        submitting = True
        vq = drv.vq
        now_ns = time.perf_counter_ns
        while vq.in_flight:
            completed = drv.wait()
            t = now_ns()
            for k, slot in enumerate(completed, 1):
                if slot.status != cat.BLK_S_OK:
                    drv.check(slot)
                lat.append(t - slot.t0)
                if submitting:
                    drv.submit(slot, rtype, next_sector(), size)
                    if k % 8 == 0:
                        drv.kick_if_polled()  # publish early if the device polls: it can start at once
            done += len(completed)
            if submitting:
                drv.kick()
                now = time.perf_counter()
                if now >= end:
                    submitting = False
                live.update(now - start, done)
        elapsed = time.perf_counter() - start
        live.close()
        used_indirect = drv.indirect
        event_idx = cat.EVENT_IDX_BIT in s.negotiated
        num_queues = len(s.queues)
    lat_sorted = sorted(lat)
    total_bytes = done * size
    result = {
        "workload": workload, "bs": size, "qd": drv.depth, "seconds": round(elapsed, 6), "requests": done,
        "bytes": total_bytes, "iops": done / elapsed, "mb_per_s": total_bytes / elapsed / 1e6,
        "latency_us": {
            "mean": (sum(lat) / len(lat) / 1000) if lat else 0.0,
            "p50": percentile(lat_sorted, 50) / 1000, "p99": percentile(lat_sorted, 99) / 1000,
            "max": (lat_sorted[-1] / 1000) if lat_sorted else 0.0,
        },
        "indirect": used_indirect, "event_idx": event_idx, "mode": s.mode, "queue": drv.vq.index,
        "num_queues": num_queues,
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }  # fmt: skip
    run.out.emit(result, lambda: _text(result))


def _text(r: dict) -> str:
    lat = r["latency_us"]
    return (
        f"{r['workload']} bs={r['bs']} qd={r['qd']}: {r['requests']} requests in {r['seconds']:.2f} s\n"
        f"  {r['iops']:,.0f} req/s  {r['mb_per_s']:,.1f} MB/s\n"
        f"  latency us: mean {lat['mean']:.1f}  p50 {lat['p50']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}\n"
        f"  indirect {'on' if r['indirect'] else 'off'}, event_idx {'on' if r['event_idx'] else 'off'}, "
        f"mode {r['mode']}, cpus {r['cpus']}\n"
        f"  queue {r['queue']} of the device's {r['num_queues']}\n"
    )


class _Live:
    """A progress line on a terminal (rich), updated a few times a second."""

    def __init__(self, seconds: float, enabled: bool):
        self.progress = None
        self.last = 0.0
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("bench"), BarColumn(), TextColumn("{task.fields[rate]}"),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)  # fmt: skip
            self.task = self.progress.add_task("bench", total=seconds, rate="")
            self.progress.start()

    def update(self, elapsed: float, done: int) -> None:
        if self.progress is None or elapsed - self.last < 0.25:
            return
        self.last = elapsed
        self.progress.update(self.task, completed=elapsed, rate=f"{done / elapsed:,.0f} req/s")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
