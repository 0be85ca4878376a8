"""Find an API key by id or name for operator commands; an unknown key is an error, never a
silent no-op (``audit export``, ``monitor show|clear|block|throttle``)."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

from public_api.keys import KEYS_DB, ApiKey, KeyStore, SqliteKeyStore


class UnknownKey(ValueError):
    """No API key has this id or name."""


def find_key(state_dir: Path, key_id_or_name: str) -> ApiKey:
    """The key whose id (first) or name is ``key_id_or_name``; ``UnknownKey`` if none."""
    path = state_dir / KEYS_DB
    if not path.exists():
        raise UnknownKey(f"no API key with id or name {key_id_or_name!r} (no key store at {path})")
    with closing(SqliteKeyStore(path)) as store:
        return find_in(store, key_id_or_name)


def find_in(store: KeyStore, key_id_or_name: str) -> ApiKey:
    """The key of ``store`` whose id (first) or name is ``key_id_or_name``; ``UnknownKey``."""
    key = store.get(key_id_or_name)
    if key is None:
        key = next((k for k in store.list() if k.name == key_id_or_name), None)
    if key is None:
        raise UnknownKey(f"no API key with id or name {key_id_or_name!r}")
    return key
