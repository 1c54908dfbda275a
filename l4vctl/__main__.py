"""Entry point for ``python -m l4vctl``."""

from l4vctl.cli import main

raise SystemExit(main())
