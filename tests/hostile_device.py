"""A hostile device server: a real emulator whose answers turn bad on cue.

    python -m tests.hostile_device MODE TYPE SOCKET

It serves TYPE like ``l4vctl emulate`` until the trigger named by MODE, then
misbehaves in that one way.  Used to check that every command meets a bad
device with a documented exit status and one line, never a traceback or a
hang.  MODEs are ``ATTACK`` or ``ATTACK@OP`` (OP an L4-VIRTIO opcode name:
the attack hits the first request with that opcode; without @, HELLO).
"""

from __future__ import annotations

import os
import random
import sys

from l4vctl import catalog as cat
from l4vctl import wire
from l4vctl.caps import close_fds
from l4vctl.emulator.dispatch import NO_REPLY
from l4vctl.emulator.server import Server, listen

OPS = {
    "SET_STATUS": cat.OP_SET_STATUS,
    "CONFIG_QUEUE": cat.OP_CONFIG_QUEUE,
    "REGISTER_DS": cat.OP_REGISTER_DS,
    "DEVICE_CONFIG": cat.OP_DEVICE_CONFIG,
    "GET_DEVICE_IRQ": cat.OP_GET_DEVICE_IRQ,
}

#: attack -> what it does to the reply (or to the connection)
ATTACKS = (
    "garbage",  # random bytes instead of the reply
    "wrong-kind",  # a REQUEST frame where a reply belongs
    "wrong-seq",  # a reply to some other call
    "close",  # hang up instead of replying
    "silent",  # never reply
    "eio",  # every such call fails with -L4_EIO
    "einval",  # ... with -L4_EINVAL
    "no-caps",  # a reply without the capability it must carry
    "bad-cap-index",  # a capability item naming a descriptor that did not come
    "pipe",  # a pipe where a dataspace or IRQ belongs
    "directory",  # a directory fd
    "unsealed",  # an unsealed memfd (config page copy), truncated after sending
    "short",  # a sealed memfd shorter than the reply says
    "huge-words",  # the maximum number of words, all ones
    "flood",  # thousands of unsolicited frames, then the reply
    "exit",  # the process ends at once
    "stop-reading",  # stop reading the socket at all
)


def _memfd(size: int, seal: bool, content: bytes = b"") -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if content:
        os.pwrite(fd, content[:size], 0)
    if seal:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


class HostileServer(Server):
    def __init__(self, device, attack: str, opcode: int | None, **kw):
        super().__init__(device, **kw)
        self.attack = attack
        self.opcode = opcode
        self.fired = False

    def _hits(self, frame: wire.Frame) -> bool:
        if self.fired and self.attack not in ("eio", "einval", "silent"):
            return False
        if self.opcode is None:
            return frame.kind == cat.KIND_HELLO
        return frame.kind == cat.KIND_REQUEST and frame.label == cat.L4VIRTIO_PROTOCOL and frame.opcode == self.opcode

    def _hello(self, client, frame):
        if self._hits(frame) and self._strike(client, frame, None):
            return
        super()._hello(client, frame)

    def _request(self, client, f):
        if self._hits(f):
            real = super()._request(client, f)
            if self._strike(client, f, real):
                return NO_REPLY
            return real
        return super()._request(client, f)

    def _raw(self, client, data: bytes, fds=()) -> None:
        try:
            wire.send(client.sock, data, list(fds))
        except OSError:
            pass
        finally:
            close_fds(fds)

    def _strike(self, client, f: wire.Frame, real) -> bool:
        """Misbehave for frame ``f``; True when the normal reply must not go out."""
        self.fired = True
        a = self.attack
        kind = cat.KIND_WELCOME if f.kind == cat.KIND_HELLO else cat.KIND_REPLY
        if real is not None and real is not NO_REPLY:
            close_fds(real.fds)
        if a == "garbage":
            rnd = random.Random(f.seq)
            self._raw(client, bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 200))))
        elif a == "wrong-kind":
            self._raw(client, wire.encode(cat.KIND_REQUEST, f.seq, 0, f.opcode, [1, 2, 3]))
        elif a == "wrong-seq":
            self._raw(client, wire.encode(kind, (f.seq + 1000) & 0xFFFFFFFF, 0, f.opcode, [0] * 4))
        elif a == "close":
            self._drop(client, "hostile: hang up")
        elif a == "silent":
            pass
        elif a in ("eio", "einval"):
            code = -cat.L4_EIO if a == "eio" else -cat.L4_EINVAL
            self._raw(client, wire.encode(kind, f.seq, code, f.opcode, []))
        elif a == "no-caps":
            words = real.words if real not in (None, NO_REPLY) else [cat.WIRE_VERSION, 1, cat.MAX_FRAME, 2]
            self._raw(client, wire.encode(kind, f.seq, 0, f.opcode, words))
        elif a == "bad-cap-index":
            words = real.words if real not in (None, NO_REPLY) else [cat.WIRE_VERSION]
            cap = wire.Cap(cat.CAP_DATASPACE if f.opcode == cat.OP_DEVICE_CONFIG else cat.CAP_IRQ, 5, 7, 4096)
            self._raw(client, wire.encode(kind, f.seq, 0, f.opcode, words, [cap]))
        elif a in ("pipe", "directory", "unsealed", "short"):
            words, caps = (real.words, real.caps) if real not in (None, NO_REPLY) else ([0], [])
            ctype = caps[0].type if caps else cat.CAP_DATASPACE
            size = caps[0].size if caps else 4096
            if a == "pipe":
                r, w = os.pipe()
                fds, keep = [r], [w]
            elif a == "directory":
                fds, keep = [os.open("/", os.O_RDONLY | os.O_DIRECTORY)], []
            elif a == "unsealed":
                page = bytes(self.device.config_ds.map(0, None, writable=False)) if ctype == cat.CAP_DATASPACE else b""
                fds, keep = [_memfd(max(size, 4096), False, page)], []
            else:
                fds, keep = [_memfd(64, True)], []
            self._raw(client, wire.encode(kind, f.seq, 0, f.opcode, words, [wire.Cap(ctype, 5, 0, size)]),
                      [os.dup(fd) for fd in fds])  # fmt: skip
            if a == "unsealed":
                os.ftruncate(fds[0], 0)  # the attack: shrink what the other side maps
            close_fds(fds + keep)
        elif a == "huge-words":
            self._raw(client, wire.encode(kind, f.seq, 0, f.opcode, [(1 << 64) - 1] * cat.MAX_WORDS))
        elif a == "flood":
            junk = wire.encode(cat.KIND_REPLY, 0xFFFF0000, 0, 0, [0])
            client.sock.setblocking(False)
            for _ in range(5000):
                try:
                    client.sock.send(junk)
                except OSError:
                    break
            return False
        elif a == "exit":
            os._exit(0)
        elif a == "stop-reading":
            self.selector.unregister(client.sock)
            return True
        return True


def main(argv: list[str]) -> int:
    from l4vctl.backends.emu import build_device

    mode, kind, path = argv
    attack, _, op = mode.partition("@")
    if attack not in ATTACKS:
        raise SystemExit(f"unknown attack {attack!r}")
    device = build_device(kind, {"abi": "current"})
    listener, ident = listen(path)
    server = HostileServer(device, attack, OPS[op] if op else None, listener=listener, path=path, socket_id=ident)
    server.install_signal_handlers()
    print(f"unix:{path}", flush=True)
    try:
        server.serve()
    finally:
        server.close()
        device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
