"""Binary layouts of the L4-VIRTIO transport, declared once with Construct.

Modules here contain schemas and nothing else: what bytes mean.  They never
import click or rich.  Hot paths (pages, rings, wire frames) never import
Construct at all: they use the codecs of :mod:`l4vctl.formats.fast`, derived
from these schemas into a generated, drift-checked module.
"""
