"""Start splitvault tiers as real subprocesses on free loopback ports (see splitvault.launcher)."""

from splitvault.launcher import TierProcess, start_private, start_public, start_tier, wait_for

__all__ = ["TierProcess", "start_private", "start_public", "start_tier", "wait_for"]
