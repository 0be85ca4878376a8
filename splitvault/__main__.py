"""``python -m splitvault``."""

from splitvault.cli import main

raise SystemExit(main())
