"""Helpers for tests: start the tiers as real processes and wait for them."""
