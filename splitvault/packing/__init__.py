"""Packing: trace a model, split it at a submodule, write the front plain and the back encrypted."""
