"""Choosing a train step per step on the host (host-scheduled topology updates), shared by
the experiment trainers (``experiments.train``, ``experiments.lm.trainer``)."""

from __future__ import annotations

from collections.abc import Callable

import jaxsparse


def step_chooser(tx, make_step: Callable, *, host: bool, algorithm: str) -> Callable:
    """``t -> step``: the train step for step ``t`` (the loop's count, equal to the sparse
    state's counter). ``make_step(topology_update)`` builds a step: ``None`` decides in the
    step whether the topology changes; a bool compiles a step of that kind only. With
    ``host`` (and a sparse ``algorithm``) two steps compile, one without the topology
    update's ``lax.cond`` for plain steps and one for update steps, picked on the host by
    ``jaxsparse.topology_due``: same masks, no barrier between the gradients and the weight
    updates of plain steps. Otherwise one step serves every ``t``."""
    if not host or algorithm == "dense":
        one = make_step(None)
        return lambda t: one
    try:
        jaxsparse.topology_due(tx, 0)
    except TypeError as e:
        raise ValueError(f"host_topology: algorithm {algorithm!r} builds an optimizer "
                         f"without a host schedule ({e})") from None
    kinds = {k: make_step(k) for k in (False, True)}
    return lambda t: kinds[jaxsparse.topology_due(tx, t)]
