"""Binary layouts of the L4-VIRTIO transport, declared once with Construct.

Modules here contain schemas and nothing else: what bytes mean.  They never
import click or rich.  Bulk decoding goes through :mod:`l4vctl.formats.fast`,
whose codecs are derived from these schemas.

Importing Construct pulls in the standard debugger module ``pdb`` (for
Construct's ``Debugger`` wrapper, which l4vctl does not use); that is about
half of Construct's import time.  ``pdb`` is therefore registered as a lazy
module here: it is only really loaded if something touches it.
"""

import importlib.util
import sys


def _defer_import(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)


_defer_import("pdb")
