"""The subcommands of ``l4vctl``, one module each, imported by :mod:`l4vctl.cli` when first used."""
