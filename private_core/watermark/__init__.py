"""Output watermarking in the private tier: keys, per-query decisions, trigger set."""
