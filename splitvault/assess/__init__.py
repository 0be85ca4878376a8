"""``splitvault assess``: what a split protects, measured the TEESlice way.

A thief who owns the public host holds the front; one who does not only queries the API.
Both train a copy on the model's answers to the same natural inputs, for several query
budgets and seeds; the split protects when holding the front buys at most a few points of
fidelity over the black-box copy.

Import from the submodules (``experiment``, ``run``, ``thieves``): the ``splitvault`` command
line imports this package, and must not load torch to answer a health check.
"""
