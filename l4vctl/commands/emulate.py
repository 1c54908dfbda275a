"""``l4vctl emulate``: serve emulated L4-VIRTIO devices on Unix sockets (one, or several from one process)."""

from __future__ import annotations

import os
from typing import Any

import click

from l4vctl.catalog import ABIS, DEFAULT_ABI
from l4vctl.commands._common import begin, examples, json_option
from l4vctl.errors import UsageError


def _model_options():
    """click options for every model option (valid for the types that have it)."""
    from l4vctl.emulator.models import MODELS, model_class

    seen: dict[str, tuple] = {}
    for kind in MODELS:
        for opt in model_class(kind).OPTIONS:
            if opt.name in seen:
                seen[opt.name][1].append(kind)
            else:
                seen[opt.name] = (opt, [kind])
    decorators = []
    for name, (opt, kinds) in seen.items():
        flag = "--" + name.replace("_", "-")
        label = "/".join(kinds)
        if isinstance(opt.default, bool):
            decorators.append(click.option(flag, name, is_flag=True, default=None, help=f"[{label}] {opt.help}"))
        else:
            decorators.append(click.option(flag, name, default=None, metavar="VALUE",
                                           help=f"[{label}] {opt.help}"))  # fmt: skip
    return list(seen), decorators


_MODEL_OPTION_NAMES, _MODEL_DECORATORS = _model_options()


def _apply(decorators):
    def wrap(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return wrap


@click.command(
    epilog=examples(
        ("l4vctl emulate blk --socket /tmp/blk.sock", "Serve a 64 MiB block device:"),
        ("l4vctl probe unix:/tmp/blk.sock", "Then, from another shell:"),
        (
            "l4vctl emulate --socket-dir /tmp/devs --device blk,size=4M --device blk,ro --device net --device rng",
            "Four devices from one process, on /tmp/devs/blk0.sock, blk1.sock, net0.sock and rng0.sock:",
        ),
        ("l4vctl emulate net --socket /tmp/net.sock --abi classic --cmd-mode", "A classic-era net device in cmd mode:"),
        (
            "l4vctl emulate blk --vhost-user /tmp/vblk.sock --image disk.img",
            "Serve the block model to vhost-user front-ends (QEMU's vhost-user-blk-pci, vhost-user:PATH):",
        ),
        (
            "l4vctl emulate --device net,link=lan,vhost-user=/tmp/vnet.sock --device net,link=lan,socket=/tmp/net.sock",
            "A vhost-user net device and an L4-VIRTIO one on one virtual cable:",
        ),
        ("l4vctl emulate blk --socket /tmp/bad.sock --inject refuse-features-ok", "A device that refuses FEATURES_OK:"),
        (
            "l4vctl emulate blk --socket /tmp/ahci.sock --profile l4re-ahci --size 4M",
            "A block device whose config page is that of L4Re's ahci-drv:",
        ),
    ),
    context_settings={"max_content_width": 100},
)
@click.argument("kind", metavar="[TYPE]", required=False, type=click.Choice(["blk", "net", "console", "rng"]))
@click.option("--socket", "socket_path", default=None, metavar="PATH",
              help="Unix socket to listen on (mode 0600); needed with TYPE.")  # fmt: skip
@click.option("--vhost-user", "vhost_user", default=None, metavar="PATH",
              help="Serve TYPE over vhost-user on a stream socket at PATH (not --socket); see below.")  # fmt: skip
@click.option("--device", "device_specs", multiple=True, metavar="SPEC",
              help="Serve a device TYPE[,KEY=VALUE...] instead of TYPE; repeatable, one process for all "
                   "(see below).")  # fmt: skip
@click.option("--socket-dir", default=None, metavar="DIR",
              help="Where devices of --device and --from without socket= listen: DIR/NAME.sock.")  # fmt: skip
@click.option("--from", "from_file", default=None, metavar="FILE",
              help="Serve the devices a TOML file names (see below); --device adds more.")  # fmt: skip
@click.option("--max-clients", type=click.IntRange(1, 4096), default=128, show_default=True,
              help="Connections served at once, per device; more are refused with -L4_EAGAIN "
                   "(clients retry).")  # fmt: skip
@click.option("--client-timeout", type=click.FloatRange(0.05), default=5.0, show_default=True, metavar="SECONDS",
              help="Close connections that send no HELLO, or leave replies unread, this long.")  # fmt: skip
@click.option("--idle-timeout", type=click.FloatRange(0), default=0, metavar="SECONDS",
              help="Close attached clients that send nothing for this long (default 0: never).")  # fmt: skip
@click.option("--abi", type=click.Choice(ABIS), default=DEFAULT_ABI, show_default=True,
              help="Header layout era of the emulated device.")  # fmt: skip
@click.option("--attach", type=click.Choice(["iface", "config", "both"]), default=None,
              help="How drivers attach (classic era only): iface = REGISTER_IFACE only (DEVICE_CONFIG, "
                   "GET_DEVICE_IRQ and ICU bind answer -L4_ENOSYS), config = DEVICE_CONFIG only as in "
                   "2022-09..2024-01 (REGISTER_IFACE answers -L4_ENOSYS), both = either, as in 2018..2022-09. "
                   "Default: both for classic, config for current.")  # fmt: skip
@click.option("--profile", default=None, metavar="NAME",
              help="Reproduce the config page of a real L4Re device server byte for byte: l4re-cons (console), "
                   "l4re-switch (net), l4re-ahci or l4re-nvme (blk); see below.")  # fmt: skip
@click.option("--cmd-mode", is_flag=True, help="Offer L4VIRTIO_FEATURE_CMD_CONFIG: status and queue setup via cmd.")
@click.option("--queues", type=click.IntRange(1, 64), default=None, help="Number of queues (default: the type's).")
@click.option("--num-max", type=click.IntRange(1, 32768), default=None, help="Largest queue size offered.")
@click.option("--feature", "features", multiple=True, metavar="NAME",
              help="Offer an extra feature bit (name or number); repeatable.")  # fmt: skip
@click.option("--inject", multiple=True, metavar="FAULT",
              help="Inject a fault to test drivers (see below); repeatable.")  # fmt: skip
@click.option("--ds-offset", default=None, metavar="BYTES", help="Offset of the config page in its dataspace.")
@click.option("--max-regions", default=None, metavar="N", help="Size of the REGISTER_DS region table (default 8).")
@click.option("--vendor", default=None, metavar="ID", help="Vendor id in the header (default 0x44).")
@_apply(_MODEL_DECORATORS)
@click.option("-v", "--verbose", count=True, help="Log every request (-v) and more (-vv).")
@click.option("-q", "--quiet", is_flag=True, help="Log only errors.")
@json_option
@click.pass_context
def emulate(ctx, kind, socket_path, vhost_user, device_specs, socket_dir, from_file, max_clients, client_timeout,
            idle_timeout, abi, attach, profile, cmd_mode, queues, num_max, features, inject, ds_offset, max_regions,
            vendor, verbose, quiet, json_mode, **model_opts):  # fmt: skip
    """Serve emulated L4-VIRTIO devices on Unix sockets: one, or several from one process.

    The device follows the rules of L4Re's device side: the status state
    machine, feature publication on reset, CONFIG_QUEUE and REGISTER_DS
    checks, cmd-word processing, irq_status.  Point any l4vctl command at it
    with 'unix:PATH'.  One driver at a time (a second gets -L4_EBUSY);
    monitors such as 'queue-stats' may watch.  When the driver disconnects,
    the device is reset for the next one.  SIGTERM or Ctrl-C stop it and
    remove the socket (only its own: a newer emulator's socket at the same
    path is left alone).

    Misbehaving clients cannot stop it serving the others: a connection
    that sends no HELLO, or leaves its replies unread, for --client-timeout
    is closed; past --max-clients new connections are
    refused with -L4_EAGAIN, which l4vctl clients retry until their
    --timeout.

    When the device is ready, its URL is printed on stdout (with --json: an
    envelope), so scripts can wait for that line.

    \b
    Several devices from one process (one interpreter, one event loop):
      l4vctl emulate --device blk,size=64M,socket=/tmp/a.sock \\
                     --device net,mac=52:54:00:00:00:01,socket=/tmp/b.sock
      l4vctl emulate --socket-dir /tmp/devs --device blk --device blk,ro
        (listens on /tmp/devs/blk0.sock and /tmp/devs/blk1.sock)
      l4vctl emulate --from devices.toml

    \b
    vhost-user (--vhost-user PATH, or vhost-user=PATH in a SPEC): the same
    models (blk, net, rng, console) served to one vhost-user front-end at a
    time (QEMU's vhost-user-blk-pci, -netdev vhost-user, vhost-user-rng, or
    l4vctl's vhost-user:PATH?type=TYPE); the ready line is
    vhost-user:PATH?type=TYPE.  Protocol features MQ, REPLY_ACK and
    CONFIG are offered; memory must be memfds sealed against shrinking
    (QEMU: -object memory-backend-memfd,share=on).  A front-end that breaks
    the protocol is dropped; a hostile ring stops every ring until the
    front-end sets them up again (its SET_VRING_ERR fds are signalled);
    when the front-end leaves the device is reset for the next one.
    --client-timeout bounds an incomplete message and unread replies;
    --max-clients and --idle-timeout do not apply (one front-end at a
    time).  docs/vhost-user-backend.md has the details.

    \b
    A --device SPEC is TYPE[,KEY=VALUE...]; KEY is
      socket=PATH    the socket to listen on
      vhost-user=PATH  serve over vhost-user on PATH instead
      name=NAME      listen on DIR/NAME.sock of --socket-dir (default
                     NAME: the type and its count: blk0, blk1, net0)
      an option      any device option of the TYPE form without its
                     dashes: size=4M, abi=classic, cmd-mode, profile=...,
                     feature=flush, inject=never-clear-cmd, mac=..., io=echo
    A key without a value is on (ro, cmd-mode, pty); a comma inside a
    value is written twice (inject=no-reply=1,,bad-magic); feature and
    inject add up when repeated.  The device options of the TYPE form
    cannot be mixed with --device or --from; --max-clients and the
    timeouts hold for each device.  Only one console may use this
    terminal (io=stdio, the default).  When every device listens, one
    line per device is printed in the order given: its URL, or with --json
    its envelope.  A signal stops all devices and removes every socket.

    \b
    A TOML file for --from (options as in a SPEC; lists for feature and
    inject; relative paths from the current directory):
      socket-dir = "/tmp/devs"      # also max-clients, client-timeout and
      idle-timeout = 30             # idle-timeout; the command line wins
      [[device]]
      type = "blk"                  # on /tmp/devs/blk0.sock
      size = "64M"
      [[device]]
      type = "net"
      socket = "/tmp/net.sock"
      feature = ["mrg_rxbuf"]

    \b
    Faults for --inject:
      refuse-features-ok         never accept FEATURES_OK
      never-clear-cmd            never consume a cmd word
      needs-reset-on-driver-ok   answer DRIVER_OK with DEVICE_NEEDS_RESET
      die-on-status=N            exit when status N is written (the whole
                                 process, with every device it serves)
      no-reply=OP                never reply to L4-VIRTIO opcode OP (name or number)
      queues-offset-outside      publish a queue array outside the page
      bad-magic                  publish a wrong magic value
      clear-features-ok          clear FEATURES_OK when DRIVER_OK is set
      needs-reset-at=N           enter DEVICE_NEEDS_RESET, with a reason,
                                 when taking the Nth request (1: the first)
      stop-completing[=N]        after N completions (default 0), take
                                 requests but never put them in the used ring
      ignore-kicks               never look at the available rings: requests
                                 stay offered, not taken (kicks are counted)
      drop-irqs[=N]              after N interrupts (default 0), complete
                                 requests without interrupting the driver
      suppress-kicks             tell drivers not to kick (NO_NOTIFY, or an
                                 avail_event out of reach with EVENT_IDX) and
                                 look at the rings only when kicked anyway
    The same as emu:TYPE?inject=FAULT,FAULT (l4vctl diagnose names what
    each one does to a driver).

    \b
    Profiles for --profile (TYPE: NAME, the L4Re server it reproduces):
      console: l4re-cons     cons: VERSION_1 only, 32 zero bytes of config,
                             queues at 0x120, num_max 256; a reset leaves
                             the queue entries as the driver wrote them
      net: l4re-switch       a port of l4vio_switch: MAC, MRG_RXBUF,
                             INDIRECT_DESC, a random MAC (unless --mac),
                             10 bytes of config, queues at 0x110
      blk: l4re-ahci         ahci-drv: SIZE_MAX (4 MiB), SEG_MAX (24), FLUSH,
                             CONFIG_WCE, INDIRECT_DESC, queues at 0x140;
                             shows only VERSION_1 until the first reset
                             publishes the rest, as the real server does
      blk: l4re-nvme         nvme-drv on QEMU's NVMe disk: as l4re-ahci
                             plus WRITE_ZEROES, SIZE_MAX 16 KiB, SEG_MAX 32

    The capacity comes from --size or --image; options given with a
    profile win over its values.  docs/fidelity.md tells what each profile
    reproduces and how the default models differ from the real servers.
    """
    out = begin(ctx, "emulate", json_mode)
    from l4vctl.emulator import log

    level = log.ERROR if quiet else (log.WARNING, log.INFO, log.DEBUG)[min(verbose, 2)]
    if device_specs or from_file is not None:
        if kind is not None:
            raise UsageError(f"give either TYPE --socket PATH or --device/--from, not both (TYPE {kind} given)",
                             hint=f"e.g. --device {kind},socket=PATH")  # fmt: skip
        if vhost_user is not None:
            raise UsageError("--vhost-user is the socket of TYPE; with --device or --from give vhost-user=PATH per "
                             "device", hint="e.g. --device blk,vhost-user=/tmp/vblk.sock")  # fmt: skip
        if socket_path is not None:
            raise UsageError("--socket is the socket of TYPE; with --device or --from give socket=PATH per device",
                             hint="e.g. --device blk,socket=/tmp/blk.sock, or --socket-dir DIR")  # fmt: skip
        _refuse_device_flags(ctx)
        settings = {"max-clients": max_clients, "client-timeout": client_timeout, "idle-timeout": idle_timeout,
                    "socket-dir": socket_dir}  # fmt: skip
        from l4vctl.emulator.specs import load_file, parse_device, place_sockets

        specs: list = []
        if from_file is not None:
            from_settings, specs = load_file(from_file)
            for key, value in from_settings.items():
                if not _given(ctx, key.replace("-", "_")):
                    settings[key] = value  # the file's, unless the command line says otherwise
        specs.extend(parse_device(text) for text in device_specs)
        place_sockets(specs, settings["socket-dir"])
        log.configure(level, "l4vctl emulate")
        _serve_many(out, specs, settings, quiet)
        return
    if kind is None:
        raise UsageError("nothing to serve: give TYPE --socket PATH, --device SPEC or --from FILE",
                         hint="see 'l4vctl emulate --help'")  # fmt: skip
    if socket_path is not None and vhost_user is not None:
        raise UsageError("give --socket PATH (L4-VIRTIO) or --vhost-user PATH, not both")
    if socket_path is None and vhost_user is None:
        raise UsageError(f"{kind}: --socket PATH is needed (the socket to listen on), or --vhost-user PATH")
    if socket_dir is not None:
        raise UsageError("--socket-dir names the sockets of --device and --from devices; TYPE listens on --socket")
    out.abi = abi
    from l4vctl.backends.emu import build_device
    from l4vctl.emulator.server import Server, listen

    raw: dict[str, object] = {"abi": abi, "cmd_mode": cmd_mode}
    if attach is not None:
        raw["attach"] = attach
    if profile is not None:
        raw["profile"] = profile
    for key, value in (("queues", queues), ("num_max", num_max), ("ds_offset", ds_offset),
                       ("max_regions", max_regions), ("vendor", vendor)):  # fmt: skip
        if value is not None:
            raw[key] = value
    if features:
        raw["features"] = ",".join(features)
    if inject:
        raw["inject"] = ",".join(inject)
    from l4vctl.emulator.models import model_class

    valid = {o.name for o in model_class(kind).OPTIONS}
    for name, value in model_opts.items():
        if value is None:
            continue
        if name not in valid:
            raise UsageError(f"--{name.replace('_', '-')} is not an option of {kind} devices")
        raw[name] = value
    log.configure(level, f"l4vctl emulate {kind}")
    if kind == "console" and "io" not in raw and not raw.get("pty"):
        raw["io"] = "stdio"  # a console served from a terminal talks to that terminal
    if vhost_user is not None:
        for param in ("attach", "cmd_mode", "ds_offset"):
            if _given(ctx, param):
                raise UsageError(f"--{param.replace('_', '-')} is an L4-VIRTIO option; vhost-user has no config page")
        _serve_vhost_user(out, kind, raw, vhost_user, client_timeout, quiet)
        return
    assert socket_path is not None
    device = build_device(kind, raw)
    try:
        listener, socket_id = listen(socket_path)
    except BaseException:
        device.close()
        raise
    server = Server(device, listener=listener, path=socket_path, socket_id=socket_id,
                    max_clients=max_clients, idle_timeout=idle_timeout, client_timeout=client_timeout)  # fmt: skip
    server.install_signal_handlers()
    url = f"unix:{socket_path}"
    out.device = url
    out.emit(_ready(device, kind, socket_path), lambda: url + "\n", compact=True)
    if not quiet:
        _announce(device, url)
    try:
        server.serve()
    finally:
        server.close()
        device.close()


def _vhost_url(path: str, kind: str) -> str:
    return f"vhost-user:{path}?type={kind}"


def _ready_vhost(device, kind: str, path: str) -> dict:
    """What the ready line says about a device served over vhost-user (with --json)."""
    from l4vctl.emulator.vhost_user import PROTOCOL_FEATURES

    return {
        "url": _vhost_url(path, kind),
        "socket": os.path.abspath(path),
        "pid": os.getpid(),
        "type": kind,
        "transport": "vhost-user",
        "device_id": device.model.DEVICE_ID,
        "num_queues": device.num_queues,
        "offered": sorted(device.offered),
        "protocol_features": PROTOCOL_FEATURES,
    }


def _serve_vhost_user(out, kind: str, raw: dict, path: str, client_timeout: float, quiet: bool) -> None:
    """The TYPE form with --vhost-user: one device, one front-end at a time."""
    from l4vctl.emulator import vhost_user as vu

    device = vu.build_device(kind, raw)
    try:
        listener, socket_id = vu.listen(path)
    except BaseException:
        device.close()
        raise
    server = vu.VhostUserServer(device, listener, path, socket_id, client_timeout=client_timeout)
    server.install_signal_handlers()
    url = _vhost_url(path, kind)
    out.device = url
    out.emit(_ready_vhost(device, kind, path), lambda: url + "\n", compact=True)
    if not quiet:
        from l4vctl.output import info

        info(f"emulating {device.model.describe()} over vhost-user on {path}")
    try:
        server.serve()
    finally:
        server.close()
        device.close()


#: Parameters of the TYPE form that are device options (not allowed with --device or --from).
_DEVICE_PARAMS = ("abi", "attach", "profile", "cmd_mode", "queues", "num_max", "features", "inject", "ds_offset",
                  "max_regions", "vendor", *_MODEL_OPTION_NAMES)  # fmt: skip
_FLAGS = {"features": "feature", "cmd_mode": "cmd-mode"}


def _given(ctx, param: str) -> bool:
    """Whether ``param`` came from the command line (not its default)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(param) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _refuse_device_flags(ctx) -> None:
    for param in _DEVICE_PARAMS:
        if _given(ctx, param):
            key = _FLAGS.get(param, param.replace("_", "-"))
            raise UsageError(f"--{key} is a device option of the TYPE form; with --device or --from give it "
                             f"per device", hint=f"e.g. --device blk,{key}=VALUE")  # fmt: skip


def _ready(device, kind: str, socket_path: str) -> dict:
    """What the ready line says about a device (with --json)."""
    result = {
        "url": f"unix:{socket_path}",
        "socket": os.path.abspath(socket_path),
        "pid": os.getpid(),
        "type": kind,
        "abi": device.abi,
        "attach": device.attach,
        "device_id": device.model.DEVICE_ID,
        "cmd_mode": device.cmd_mode,
        "profile": device.model.profile.name if device.model.profile is not None else None,
        "num_queues": device.num_queues,
        "offered": sorted(device.offered),
    }
    pty = getattr(device.model, "pty_slave", None)
    if pty:
        result["pty"] = pty
    return result


def _announce(device, url: str) -> None:
    """Say on stderr what is served where."""
    from l4vctl.output import info

    what = device.model.describe()
    attach_note = "" if device.attach == "config" else ", attach " + device.attach
    mode_note = ", cmd mode" if device.cmd_mode else ""
    profile_note = f", profile {device.model.profile.name}" if device.model.profile is not None else ""
    info(f"emulating {what} ({device.abi} ABI{attach_note}{mode_note}{profile_note}) on {url}")


def _raise_nofile(wanted: int) -> None:
    """Let the process have ``wanted`` descriptors if the hard limit allows (it uses epoll, not select)."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            top = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
            if top > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    except (ValueError, OSError):
        pass  # the limit stays; running out of descriptors is handled per device


def _on(value: str | None) -> bool:
    """Whether a flag's text says on (a bad value is reported when the device is built)."""
    from l4vctl.parsing import parse_bool

    try:
        return value is not None and parse_bool(value)
    except ValueError:
        return False


def _serve_many(out, specs, settings: dict, quiet: bool) -> None:
    """Build every device, listen on every socket, print one ready line per device, serve them all."""
    from l4vctl.backends.emu import build_device
    from l4vctl.emulator import vhost_user as vu
    from l4vctl.emulator.server import Hub, Server, listen

    for spec in specs:
        if spec.kind == "console" and "io" not in spec.options and not _on(spec.options.get("pty")):
            spec.options["io"] = "stdio"  # as in the TYPE form: a console served from a terminal talks to it
    stdio = [s for s in specs if s.kind == "console" and s.options.get("io") == "stdio"]
    if len(stdio) > 1:
        raise UsageError(f"{len(stdio)} consoles would share this terminal (io=stdio, the default): "
                         f"{', '.join(s.name or '?' for s in stdio)}",
                         hint="give all but one io=pty, io=echo or io=null")  # fmt: skip
    _raise_nofile(len(specs) * (settings["max-clients"] + 16) + 64)
    hub = Hub()
    hub.install_signal_handlers()  # before the first socket exists: a signal from here on removes them all
    devices: list[Any] = []
    try:
        for spec in specs:
            try:
                build = vu.build_device if spec.vhost_user is not None else build_device
                devices.append(build(spec.kind, spec.options))
            except UsageError as exc:
                raise UsageError(f"{spec.origin}: {exc.message}", hint=exc.hint) from None
        for spec, device in zip(specs, devices, strict=True):
            assert spec.socket is not None  # place_sockets gave every spec one
            vhost = spec.vhost_user is not None
            server: Any
            listener, socket_id = vu.listen(spec.socket) if vhost else listen(spec.socket)
            try:
                if vhost:
                    server = vu.VhostUserServer(device, listener, spec.socket, socket_id,
                                                client_timeout=settings["client-timeout"])  # fmt: skip
                else:
                    server = Server(device, listener=listener, path=spec.socket, socket_id=socket_id,
                                    max_clients=settings["max-clients"], idle_timeout=settings["idle-timeout"],
                                    client_timeout=settings["client-timeout"])  # fmt: skip
            except BaseException:
                listener.close()
                from l4vctl.emulator.server import remove_socket

                remove_socket(spec.socket, socket_id)
                raise
            hub.add(server, spec.name)
        if hub.running:  # no signal came meanwhile
            for spec, device in zip(specs, devices, strict=True):
                assert spec.socket is not None
                if spec.vhost_user is not None:
                    url = _vhost_url(spec.socket, spec.kind)
                    result = {"name": spec.name, **_ready_vhost(device, spec.kind, spec.socket)}
                else:
                    url = f"unix:{spec.socket}"
                    result = {"name": spec.name, **_ready(device, spec.kind, spec.socket)}
                out.device, out.abi = url, device.abi
                out.emit(result, lambda url=url: url + "\n", compact=True)
            if not quiet:
                for spec, device in zip(specs, devices, strict=True):
                    if spec.vhost_user is not None:
                        from l4vctl.output import info

                        info(f"emulating {device.model.describe()} over vhost-user on {spec.socket}")
                    else:
                        _announce(device, f"unix:{spec.socket}")
            hub.serve()
    finally:
        hub.close()
        for device in devices:
            device.close()
