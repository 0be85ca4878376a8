"""Tests of loading the terms of service and the Link header."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from public_api.terms import Terms, link_header, load_terms


def test_load_terms_reads_text_and_hashes_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "terms.txt"
    path.write_bytes("No model extraction.\nDonnées: résumé.\n".encode())
    terms = load_terms(path, "2024-06")
    assert terms == Terms(
        version="2024-06",
        text="No model extraction.\nDonnées: résumé.\n",
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def test_a_changed_text_changes_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "terms.txt"
    path.write_text("Version one.\n", encoding="utf-8")
    first = load_terms(path, "1")
    path.write_text("Version one!\n", encoding="utf-8")
    assert load_terms(path, "1").sha256 != first.sha256


@pytest.mark.parametrize(
    ("content", "version", "problem"),
    [(b"Terms.\n", " ", "non-empty version"), (b" \n", "1", "is empty")],
)
def test_empty_version_or_text_is_refused(
    tmp_path: Path, content: bytes, version: str, problem: str
) -> None:
    path = tmp_path / "terms.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem):
        load_terms(path, version)


def test_non_utf8_and_missing_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "terms.txt"
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(UnicodeDecodeError):
        load_terms(path, "1")
    with pytest.raises(FileNotFoundError):
        load_terms(tmp_path / "missing.txt", "1")


def test_link_header() -> None:
    assert link_header() == '</v1/terms>; rel="terms-of-service"'
    assert link_header("/api/v1/terms") == '</api/v1/terms>; rel="terms-of-service"'
