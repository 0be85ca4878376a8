"""A new user's folder (``mymodels.py`` and nothing else) and the CLI run from it as the
installed ``splitvault`` script runs: the current folder is not put on the import path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import user_models

REPO_ROOT = Path(__file__).resolve().parents[2]
LABELS = [f"class {i} (of ten)" for i in range(10)]  # spaces: one label per line, not per word


def user_folder(folder: Path) -> Path:
    """``folder`` holding a copy of ``tests/support/user_models.py`` as ``mymodels.py``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(user_models.__file__, folder / "mymodels.py")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return folder


def splitvault(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``splitvault ARGS`` run in ``folder``; ``-P`` keeps the folder off ``sys.path`` as the
    console script does (``python -m`` alone would add it)."""
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run(
        [sys.executable, "-P", "-m", "splitvault", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
