"""Servers a user would deploy instead of splitvault, for ``bench/serving_comparison.py``."""
