"""The private tier: holds the encrypted back stages, runs them and restricts their outputs."""
