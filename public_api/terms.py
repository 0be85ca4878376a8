"""Terms of service: the operator's text file, its version, and the hash acceptances refer to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Terms:
    """One version of the terms; ``sha256`` is the hex digest of the file's bytes."""

    version: str
    text: str
    sha256: str


def load_terms(path: Path, version: str) -> Terms:
    """Read the terms from a UTF-8 text file; ``ValueError`` for an empty version or text."""
    if not version.strip():
        raise ValueError("the terms of service need a non-empty version")
    data = path.read_bytes()
    text = data.decode("utf-8")
    if not text.strip():
        raise ValueError(f"the terms of service file {path} is empty")
    return Terms(version=version, text=text, sha256=hashlib.sha256(data).hexdigest())


def with_clause(terms: Terms, clause: str) -> Terms:
    """``terms`` with ``clause`` appended; the hash covers the text as served."""
    text = terms.text.rstrip("\n") + clause
    return Terms(terms.version, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def link_header(base_url_path: str = "/v1/terms") -> str:
    """The ``Link`` header value every response carries, pointing to the terms."""
    return f'<{base_url_path}>; rel="terms-of-service"'
