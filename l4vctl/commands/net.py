"""``l4vctl net``: send, receive and ping Ethernet frames through net devices."""

from __future__ import annotations

import contextlib
import statistics
import time

import click

from l4vctl.commands._common import (
    Driven,
    Group,
    OutputFile,
    abi_option,
    attach_of,
    attach_option,
    begin,
    examples,
    io_options,
    json_option,
    timeout_option,
)
from l4vctl.errors import UsageError


@click.group(
    cls=Group,
    epilog=examples(
        ("l4vctl net ping 'emu:net?link=lab' 'emu:net?link=lab' --count 3", "Two devices on one virtual cable:"),
        ("l4vctl net recv unix:/tmp/b.sock --count 1 --wait 10", "Wait for a frame on one end ..."),
        ("l4vctl net send unix:/tmp/a.sock --text hello", "... and send it from the other:"),
    ),
)
def net():
    """Network device I/O through real virtqueues (queue 0 receives, 1 transmits).

    Emulated net devices started with the same 'link' option (emu:net?link=NAME,
    or 'l4vctl emulate net --link NAME') share a virtual cable: what one sends,
    the other receives.  Frames l4vctl makes use the local experimental
    ethertype 0x88b5 unless --type says otherwise.
    """


def pcap_option(f):
    """--pcap FILE: every frame sent and received, in a libpcap file for Wireshark and tcpdump."""
    return click.option(
        "--pcap",
        "pcap_file",
        type=OutputFile(),
        metavar="FILE",
        help="Write every frame sent and received to FILE in the classic libpcap format (Ethernet, "
        "microsecond timestamps; without the virtio-net header), for Wireshark and 'tcpdump -r'.",
    )(f)


def _mac(text: str) -> bytes:
    from l4vctl.parsing import parse_mac

    try:
        return parse_mac(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _frame_json(data: bytes) -> dict:
    from l4vctl.drivers.net import parse_frame
    from l4vctl.parsing import mac_text

    f = parse_frame(data)
    return {
        "dst": mac_text(f["dst"]) if f["dst"] else None,
        "src": mac_text(f["src"]) if f["src"] else None,
        "type": f["type"],
        "length": len(data),
        "payload_hex": f["payload"].hex(),
        "payload_text": f["payload"].decode("utf-8", "replace"),
    }


@net.command(epilog=examples(("l4vctl net send unix:/tmp/a.sock --text hello --count 3", "Three frames:")))
@io_options
@click.option("--to", "dst", default="ff:ff:ff:ff:ff:ff", show_default=True, help="Destination MAC address.")
@click.option("--type", "ethertype", default="0x88b5", show_default=True, help="Ethertype.")
@click.option("--text", help="Payload as text.")
@click.option("--hex", "hexdata", help="Payload as hex bytes.")
@click.option("--count", type=click.IntRange(1, 1_000_000), default=1, show_default=True, help="Frames to send.")
@pcap_option
@click.pass_context
def send(ctx, device, device_opt, abi, mode, timeout, json_mode, dst, ethertype, text, hexdata, count, pcap_file):
    """Send Ethernet frames from the device's MAC address."""
    from l4vctl.drivers.net import NetDriver, frame
    from l4vctl.parsing import mac_text

    if (text is None) == (hexdata is None):
        raise UsageError("give exactly one of --text and --hex")
    try:
        payload = text.encode() if text is not None else bytes.fromhex(hexdata)
        etype = int(ethertype, 0)
    except ValueError:
        raise UsageError("--hex and --type must be hex numbers") from None
    to = _mac(dst)
    from l4vctl.pcap import capture

    run = Driven(ctx, "net send", json_mode, device, device_opt, abi, mode, timeout)
    with capture(pcap_file) as cap, run as s:
        drv = NetDriver(s)
        data = frame(to, drv.mac, etype, payload)
        for _ in range(count):
            drv.send(data)
            cap.frame(data)
        drv.flush()
        src = mac_text(drv.mac)
    plural = "s" if count > 1 else ""
    run.out.emit(
        {"sent": count, "bytes": len(data), "src": src, "dst": mac_text(to)},
        lambda: f"sent {count} frame{plural} of {len(data)} bytes {src} > {mac_text(to)}\n",
    )


@net.command(
    epilog=examples(("l4vctl net recv unix:/tmp/b.sock --count 2 --wait 10 --json", "Two frames, for a script:"))
)
@io_options
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True, help="Frames to wait for.")
@click.option("--wait", type=click.FloatRange(min=0), default=5.0, show_default=True, metavar="SECONDS",
              help="Give up after this long without the frames (exit 7).")  # fmt: skip
@pcap_option
@click.pass_context
def recv(ctx, device, device_opt, abi, mode, timeout, json_mode, count, wait, pcap_file):
    """Receive frames and print them (source, destination, type, payload)."""
    from l4vctl.drivers.net import NetDriver
    from l4vctl.errors import TimeoutExpired
    from l4vctl.pcap import capture

    run = Driven(ctx, "net recv", json_mode, device, device_opt, abi, mode, timeout)
    frames: list[bytes] = []
    with capture(pcap_file) as cap, run as s:
        drv = NetDriver(s)
        deadline = time.monotonic() + wait
        while len(frames) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            got = drv.receive(left)
            for f in got:
                cap.frame(f)
            frames += got
    if len(frames) < count:
        raise TimeoutExpired(f"{len(frames)} of {count} frames arrived within {wait:g} s")
    rows = [_frame_json(f) for f in frames[:count]]

    def text():
        return "".join(f"{r['src']} > {r['dst']} type {r['type']:#06x} length {r['length']}: "
                       f"{r['payload_text']!r}\n" for r in rows)  # fmt: skip

    run.out.emit({"frames": rows}, text)


@net.command(
    epilog=examples(
        ("l4vctl net ping 'emu:net?link=lab' 'emu:net?link=lab'", "Ping between two embedded devices:"),
        ("l4vctl net ping unix:/tmp/a.sock unix:/tmp/b.sock --count 10 --size 1000", "Between two emulators:"),
        (
            "l4vctl net ping 'vhost-user:/tmp/pmd.sock?type=net' --to 02:00:00:00:00:aa",
            "One device whose network sends every frame back (testpmd --forward-mode=macswap):",
        ),
    )
)
@click.argument("device_a", metavar="DEVICE_A")
@click.argument("device_b", metavar="[DEVICE_B]", required=False)
@abi_option(auto=True)
@attach_option
@click.option("--count", type=click.IntRange(1, 100000), default=4, show_default=True, help="Echo requests.")
@click.option("--size", type=click.IntRange(0, 1400), default=56, show_default=True, help="Payload bytes.")
@click.option("--to", "to_mac", default=None, metavar="MAC",
              help="Without DEVICE_B: the destination of the requests (default 02:00:00:00:00:02).")  # fmt: skip
@timeout_option
@pcap_option
@json_option
@click.pass_context
def ping(ctx, device_a, device_b, abi, count, size, to_mac, timeout, pcap_file, json_mode):
    """Echo frames from DEVICE_A to DEVICE_B and back; report round-trip times.

    l4vctl drives both devices: A sends a frame to B's MAC, B's driver
    answers it, A receives the answer.  The two devices must share a cable.

    Without DEVICE_B the network answers: A sends each request to --to and
    takes a frame that comes back to A with the same payload as the answer,
    whether its addresses were swapped (a reflector such as DPDK testpmd's
    macswap forwarding) or not (a loop).  'swapped' in the output counts the
    answers that came from --to.

    --pcap captures at DEVICE_A (the requests it sends, the answers it receives).
    JSON keys: from, to, sent, received, lost, size, rtt_ms (min, avg, max; null
    if none came back), rtts_ms, and without DEVICE_B also swapped.
    """
    from l4vctl.drivers import require_class
    from l4vctl.drivers.net import ETHERTYPE, NetDriver, frame, parse_frame
    from l4vctl.parsing import mac_text
    from l4vctl.pcap import capture
    from l4vctl.session import Session

    if device_b is not None and to_mac is not None:
        raise UsageError("--to is for a ping without DEVICE_B (DEVICE_B's own address is the destination)")
    out = begin(ctx, "net ping", json_mode)
    out.device = device_a
    rtts: list[float] = []
    lost = 0
    swapped = 0
    attach = attach_of(ctx)
    with contextlib.ExitStack() as stack:
        cap = capture(pcap_file)
        stack.enter_context(cap)
        a = stack.enter_context(Session(device_a, abi=abi, timeout=timeout, attach=attach))
        b = stack.enter_context(Session(device_b, abi=abi, timeout=timeout, attach=attach)) if device_b else None
        out.abi = a.abi
        require_class(a, "net", "'l4vctl net ping'")
        if b is not None:
            require_class(b, "net", "'l4vctl net ping'")
        a.handshake()
        da = NetDriver(a)
        db = None
        if b is not None:
            b.handshake()
            db = NetDriver(b)
            if da.mac == db.mac:
                raise UsageError(f"both devices have the MAC address {mac_text(da.mac)}")
            peer = db.mac
        else:
            peer = _mac(to_mac or "02:00:00:00:00:02")
            if peer == da.mac:
                raise UsageError(f"--to {mac_text(peer)} is DEVICE_A's own address")
        for seq in range(count):
            payload = seq.to_bytes(4, "big") + bytes(size)
            t0 = time.perf_counter()
            request = frame(peer, da.mac, ETHERTYPE, payload)
            da.send(request)
            cap.frame(request)
            answered = False
            expect_src = peer
            if db is not None:
                got = db.receive(timeout)
                for f in got:
                    p = parse_frame(f)
                    if p["dst"] == db.mac and p["type"] == ETHERTYPE:
                        db.send(frame(p["src"], db.mac, ETHERTYPE, p["payload"]))
                if not got:
                    lost += 1
                    continue
            deadline = time.monotonic() + timeout
            while not answered and time.monotonic() < deadline:
                for f in da.receive(max(0.0, deadline - time.monotonic())):
                    cap.frame(f)
                    p = parse_frame(f)
                    if p["type"] != ETHERTYPE or p["payload"] != payload:
                        continue
                    if db is not None and p["src"] != expect_src:
                        continue
                    answered = True
                    swapped += p["src"] == peer and p["dst"] == da.mac
            if answered:
                rtts.append((time.perf_counter() - t0) * 1e3)
            else:
                lost += 1
        a_mac, b_mac = mac_text(da.mac), mac_text(peer)
    result = {
        "from": a_mac, "to": b_mac, "sent": count, "received": count - lost, "lost": lost, "size": size,
        "rtt_ms": {"min": min(rtts), "avg": statistics.fmean(rtts), "max": max(rtts)} if rtts else None,
        "rtts_ms": rtts,
    }  # fmt: skip
    if device_b is None:
        result["swapped"] = swapped

    def text():
        lines = [f"{size + 18} bytes {a_mac} -> {b_mac}: seq={i} time={t:.3f} ms" for i, t in enumerate(rtts)]
        lines.append(f"{count} sent, {count - lost} received, {100 * lost / count:.0f}% lost")
        if device_b is None:
            lines.append(f"{swapped} of {count - lost} answers came from {b_mac} (addresses swapped)")
        if rtts:
            r = result["rtt_ms"]
            lines.append(f"rtt min/avg/max = {r['min']:.3f}/{r['avg']:.3f}/{r['max']:.3f} ms")
        return "\n".join(lines) + "\n"

    out.emit(result, text)
    if lost == count:
        from l4vctl.errors import TimeoutExpired

        if device_b is None:
            raise TimeoutExpired(f"no echo came back to {a_mac}: does the network send frames back?")
        raise TimeoutExpired(f"no echo came back from {b_mac}: are the devices on one cable (link=NAME)?")
