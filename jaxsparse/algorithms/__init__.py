"""Algorithm factories: thin compositions of the topology functions."""

from jaxsparse.algorithms.dst import drop_and_grow, rigl, set_, snfs, static
from jaxsparse.algorithms.pruning import magnitude_pruning, pruning_targets, random_pruning

__all__ = [
    "drop_and_grow",
    "magnitude_pruning",
    "pruning_targets",
    "random_pruning",
    "rigl",
    "set_",
    "snfs",
    "static",
]
