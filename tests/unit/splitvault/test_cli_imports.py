"""The command line stays light: healthchecks run it every few seconds under a timeout."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_imports_neither_torch_nor_scipy() -> None:
    # A fresh interpreter: this test process has imported torch already.
    code = (
        "import sys, splitvault.cli; "
        "print(','.join(m for m in ('torch', 'scipy', 'sklearn') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"splitvault.cli imports {loaded}: keep heavy imports inside commands"
