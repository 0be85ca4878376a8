"""Benchmark scripts: each prints figures; none is a test."""
