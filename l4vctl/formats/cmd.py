"""The cmd word of the config page and the device status byte."""

from __future__ import annotations

from construct import Enum, FlagsEnum, Int8ul, Int24ul, Int32ul, Struct

from l4vctl.catalog import CMD_WORDS, IRQ_STATUS_BITS, STATUS_BITS

#: The 32-bit cmd word in memory order: 24-bit argument, then command byte.
#: The command byte is compared for equality, not as a bit set.
cmd_word = Struct(
    "argument" / Int24ul * "status value, queue index, config offset or queue to kick",
    "command"
    / Enum(Int8ul, NONE=0, **{name: byte for byte, (name, _eras) in CMD_WORDS.items()})
    * "SET_STATUS=1, CFG_QUEUE=2, CFG_CHANGED=4, NOTIFY_QUEUE=8 (0: idle)",
)

#: The ``status`` field: only the low 8 bits carry meaning.
device_status = FlagsEnum(Int32ul, **{name: mask for mask, name in STATUS_BITS})

#: The ``irq_status`` field.
irq_status = FlagsEnum(Int32ul, **{name: mask for mask, name in IRQ_STATUS_BITS})
