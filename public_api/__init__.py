"""The public tier: Open Inference Protocol v2 REST, front stages, calls to the private tier."""
