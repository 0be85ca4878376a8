"""The serve commands' OpenMP wait policy: PASSIVE unless the operator chose one."""

from __future__ import annotations

from shared.openmp import WAIT_POLICY, default_wait_policy


def test_unset_policy_becomes_passive() -> None:
    environ: dict[str, str] = {}
    policy, _ = default_wait_policy(environ)
    assert policy == "PASSIVE"
    assert environ == {WAIT_POLICY: "PASSIVE"}


def test_operator_policy_is_kept() -> None:
    environ = {WAIT_POLICY: "ACTIVE"}
    assert default_wait_policy(environ)[0] == "ACTIVE"
    assert environ == {WAIT_POLICY: "ACTIVE"}


def test_too_late_once_torch_is_loaded() -> None:
    import torch  # noqa: F401  (libgomp is loaded with it)

    assert default_wait_policy({})[1] is False
