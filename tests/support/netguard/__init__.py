"""The connect guard (``sitecustomize``) that keeps every Python test process on loopback."""

from pathlib import Path

# Put on PYTHONPATH so that Python imports the guard at the start of every process.
NETGUARD_DIR = Path(__file__).resolve().parent
