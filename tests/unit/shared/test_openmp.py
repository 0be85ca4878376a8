"""The serve commands' OpenMP wait: a short spin unless the operator chose a policy or a spin."""

from __future__ import annotations

from shared.openmp import SERVING_SPIN_COUNT, SPIN_COUNT, WAIT_POLICY, default_wait_policy


def test_unset_environment_gets_the_short_spin() -> None:
    environ: dict[str, str] = {}
    policy, _ = default_wait_policy(environ)
    assert policy == f"{SPIN_COUNT}={SERVING_SPIN_COUNT}"
    assert environ == {SPIN_COUNT: SERVING_SPIN_COUNT}


def test_operator_wait_policy_is_kept_without_a_spin_count() -> None:
    # An explicit GOMP_SPINCOUNT would override the operator's OMP_WAIT_POLICY in libgomp.
    environ = {WAIT_POLICY: "PASSIVE"}
    assert default_wait_policy(environ)[0] == "OMP_WAIT_POLICY=PASSIVE"
    assert environ == {WAIT_POLICY: "PASSIVE"}


def test_operator_spin_count_is_kept() -> None:
    environ = {SPIN_COUNT: "0", WAIT_POLICY: "ACTIVE"}
    assert default_wait_policy(environ)[0] == "GOMP_SPINCOUNT=0"
    assert environ == {SPIN_COUNT: "0", WAIT_POLICY: "ACTIVE"}


def test_too_late_once_torch_is_loaded() -> None:
    import torch  # noqa: F401  (libgomp is loaded with it)

    assert default_wait_policy({})[1] is False
