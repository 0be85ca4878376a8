"""Per-address limits group IPv6 clients by /64 (finding 5: rotating inside a /64)."""

from __future__ import annotations

import pytest

from public_api.addresses import limit_subject


@pytest.mark.parametrize(
    ("address", "subject"),
    [
        ("127.0.0.7", "127.0.0.7"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:127.0.0.7", "127.0.0.7"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unknown", "unknown"),
    ],
)
def test_limit_subject(address: str, subject: str) -> None:
    assert limit_subject(address) == subject


def test_every_address_of_a_64_is_one_subject_and_the_next_64_another() -> None:
    rotated = {limit_subject(f"2001:db8:0:7:{i:x}::{i:x}") for i in range(1, 1000)}
    assert rotated == {"2001:db8:0:7::/64"}
    assert limit_subject("2001:db8:0:8::1") != limit_subject("2001:db8:0:7::1")
