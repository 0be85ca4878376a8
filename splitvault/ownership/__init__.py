"""Ownership proof: verify a suspect model against our watermark, and the evidence report."""
