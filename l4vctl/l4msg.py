"""L4-VIRTIO requests as message registers of real L4 IPC (protocol notes §3.1).

The socket emulation carries a request's arguments one per word; real L4
lays them out in message registers: the opcode first (a 32-bit int for the
L4-VIRTIO interface, a machine word for the ICU), each argument at the next
offset aligned to its natural size, rounded up to whole words (amd64).  The
L4Re bridge sends these words as they are, so the agent inside L4Re never
needs to know an operation's layout.  Replies carry their words from offset
0, one word-sized value per register for every operation the bridge uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from l4vctl import catalog as cat

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1

#: L4-VIRTIO operations whose single argument is a 32-bit int packed beside the opcode.
_U32_ARG = (cat.OP_SET_STATUS, cat.OP_CONFIG_QUEUE, cat.OP_GET_DEVICE_IRQ)

#: Receive slots of an operation: the kind of capability each reply item carries.
RECEIVES: dict[tuple[int, int], tuple[int, ...]] = {
    (cat.L4VIRTIO_PROTOCOL, cat.OP_DEVICE_CONFIG): (cat.CAP_DATASPACE,),
    (cat.L4VIRTIO_PROTOCOL, cat.OP_GET_DEVICE_IRQ): (cat.CAP_IRQ,),
    (cat.L4VIRTIO_PROTOCOL, cat.OP_REGISTER_IFACE): (cat.CAP_IRQ, cat.CAP_DATASPACE),
}


def pack(label: int, opcode: int, args: Sequence[int]) -> list[int]:
    """The message-register words of a request (amd64)."""
    if label == cat.L4VIRTIO_PROTOCOL:
        op = opcode & MASK32
        if opcode in _U32_ARG:
            return [op | (args[0] & MASK32) << 32] + [a & MASK64 for a in args[1:]] if args else [op]
        if opcode == cat.OP_REGISTER_DS:  # u32 opcode, u64 base at 8, words offset and size at 16 and 24
            return [op] + [a & MASK64 for a in args]
        return [op] + [a & MASK64 for a in args]
    # the ICU and every other interface: the opcode is a whole word, arguments follow word by word
    return [opcode & MASK64] + [a & MASK64 for a in args]


def receive_kinds(label: int, opcode: int) -> tuple[int, ...]:
    """What the reply of a request may carry, slot by slot (empty: nothing)."""
    return RECEIVES.get((label, opcode), ())


def receive_flags(kinds: Sequence[int]) -> int:
    """The receive-slot bits of a REQUEST's ``flags`` (2 bits per slot, from bit 16)."""
    bits = 0
    for i, kind in enumerate(kinds[:2]):
        bits |= (kind & 3) << (2 * i)
    return bits << 16
