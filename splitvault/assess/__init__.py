"""``splitvault assess``: what a split protects, measured the TEESlice way.

A thief who owns the public host holds the front; one who does not only queries the API.
Both train a copy on the model's answers to the same natural inputs, for several query
budgets and seeds; the split protects when holding the front buys at most a few points of
fidelity over the black-box copy.
"""

from splitvault.assess.experiment import Settings, SplitAssessment, recommend
from splitvault.assess.run import Outcome, Request, run_assessment
from splitvault.assess.thieves import Training

__all__ = [
    "Outcome",
    "Request",
    "Settings",
    "SplitAssessment",
    "Training",
    "recommend",
    "run_assessment",
]
