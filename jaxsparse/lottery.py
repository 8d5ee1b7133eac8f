"""Lottery tickets: iterative magnitude pruning (IMP) with weight rewinding, and the
scratch-e / scratch-b baselines.

Everything here is a plain function that drives *your* training function

    train_fn(params, masks, num_steps) -> (params, history)

which trains ``params`` for ``num_steps`` steps keeping the weights outside ``masks`` at
zero (for example with ``jaxsparse.pruning_at_init.fixed_masks(optax.sgd(...), masks)``) and
returns the trained params and anything you want to keep (losses, accuracies). No object
holds state: each call returns a result tuple.

IMP (Frankle & Carbin 2019; rewinding: Frankle et al. 2020): train the dense network for
``num_steps`` steps, saving its weights at ``rewind_step`` (0: the initialisation, "late
resetting" otherwise); then, for each round, prune by magnitude among the surviving weights
to that round's sparsity, rewind the survivors to their saved values and retrain for
``num_steps - rewind_step`` steps. Round r reaches sparsity ``1 - (1 - p)^r`` (``p`` the
per-round prune fraction), so ``rounds`` rounds reach the requested final sparsity exactly
(per-layer counts from :func:`jaxsparse.distributions.layer_budgets`).

Scratch baselines (Liu et al. 2019; Gale, Elsen & Hooker 2019): train the final mask from
a fresh random initialisation for the same number of steps (scratch-e) or twice as many
(scratch-b).

References:
  J. Frankle, M. Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
  Networks", ICLR 2019.
  J. Frankle, G. K. Dziugaite, D. Roy, M. Carbin, "Linear Mode Connectivity and the Lottery
  Ticket Hypothesis", ICML 2020.
  Z. Liu, M. Sun, T. Zhou, G. Huang, T. Darrell, "Rethinking the Value of Network Pruning",
  ICLR 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsparse.distributions import check_sparsity
from jaxsparse.masks import Masks, Prunable, PyTree, apply_masks, ones_masks
from jaxsparse.pruning_at_init import one_shot_masks
from jaxsparse.topology import check_ranking

TrainFn = Callable[[PyTree, Masks, int], tuple[PyTree, Any]]

__all__ = [
    "ImpResult",
    "imp",
    "imp_sparsities",
    "rewind",
    "scratch",
    "scratch_b",
    "scratch_e",
]


class ImpResult(NamedTuple):
    """What :func:`imp` returns.

    Attributes:
      masks: the final masks (the winning ticket).
      params: the params trained in the last round.
      rewind_params: the dense weights saved at ``rewind_step`` (the ticket's init).
      checkpoints: ``{step: params}`` of the dense run (0 and ``rewind_step``, and
        ``num_steps``: the trained dense network).
      masks_per_round: the masks of rounds 1..rounds.
      sparsities: the target sparsity of rounds 1..rounds.
      histories: what ``train_fn`` returned, one entry per round; round 0 (dense) is a
        tuple ``(history to rewind_step, history from it)`` when ``rewind_step > 0``.
    """

    masks: Masks
    params: PyTree
    rewind_params: PyTree
    checkpoints: dict[int, PyTree]
    masks_per_round: list[Masks]
    sparsities: list[float]
    histories: list[Any]


def _check_steps(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def imp_sparsities(rounds: int, *, sparsity: float | None = None,
                   prune_fraction: float | None = None) -> list[float]:
    """Target sparsity after each IMP round: ``1 - (1 - p)^r`` for r = 1..rounds.

    Give exactly one of ``sparsity`` (the final one; ``p = 1 - (1 - sparsity)^(1/rounds)``)
    or ``prune_fraction`` (``p``, the fraction of the surviving weights pruned per round).

    Example:
      >>> imp_sparsities(2, prune_fraction=0.5)
      [0.5, 0.75]
    """
    rounds = _check_steps(rounds, "rounds", 1)
    if (sparsity is None) == (prune_fraction is None):
        raise ValueError(
            "give exactly one of sparsity (the final sparsity) or prune_fraction (per round)"
        )
    if sparsity is not None:
        final = check_sparsity(sparsity)
        keep = (1.0 - final) ** (1.0 / rounds)
    else:
        p = check_sparsity(prune_fraction, "prune_fraction")
        if p == 0.0:
            raise ValueError("prune_fraction must be in (0, 1), got 0.0")
        keep = 1.0 - p
        final = 1.0 - keep**rounds
    out = [1.0 - keep**r for r in range(1, rounds)]
    return out + [final]


def rewind(checkpoints: Mapping[int, PyTree], step: int, masks: Masks | None = None) -> PyTree:
    """The params saved at ``step``, with the weights outside ``masks`` set to zero.

    Raises:
      ValueError: when no weights were saved at ``step``.

    Example:
      >>> ticket = rewind(result.checkpoints, 0, result.masks)
    """
    if step not in checkpoints:
        raise ValueError(
            f"cannot rewind to step {step!r}: no weights were saved at that step; saved "
            f"steps are {sorted(checkpoints)}"
        )
    params = checkpoints[step]
    return params if masks is None else apply_masks(params, masks)


def imp(
    train_fn: TrainFn,
    init_params: PyTree,
    *,
    num_steps: int,
    rounds: int,
    sparsity: float | None = None,
    prune_fraction: float | None = None,
    rewind_step: int = 0,
    checkpoints: Mapping[int, PyTree] | None = None,
    distribution: str = "uniform",
    ranking: str = "layerwise",
    prunable: Prunable = None,
    overrides: Mapping[str, float] | None = None,
) -> ImpResult:
    """Iterative magnitude pruning with rewinding (the lottery-ticket procedure).

    Args:
      train_fn: ``(params, masks, num_steps) -> (params, history)``.
      init_params: the dense initialisation.
      num_steps: training length T of one round (the dense run and each retraining,
        counted from step 0; a retraining after rewinding to step k runs T - k steps).
      rounds: number of prune-rewind-retrain rounds, >= 1.
      sparsity: final sparsity after ``rounds`` rounds; or
      prune_fraction: fraction of the surviving weights pruned per round (0.2 in the paper).
      rewind_step: the step whose weights the survivors are reset to (0 or early, in
        [0, num_steps)).
      checkpoints: optional ``{step: params}`` of a dense run you already have; it must hold
        ``rewind_step`` and ``num_steps`` (the trained weights); then IMP does not retrain
        the dense network.
      distribution: how each round's sparsity is split over layers (``"uniform"``: every
        layer pruned by the same fraction, as in the paper).
      ranking: ``"layerwise"`` (default) or ``"global"`` magnitude ranking.
      prunable, overrides: as in :func:`jaxsparse.pruning_at_init.one_shot_masks`.

    Returns:
      An :class:`ImpResult`.

    Raises:
      ValueError: bad counts or sparsities, or a ``rewind_step`` that was not saved.

    Example:
      >>> def train_fn(params, masks, num_steps):
      ...     tx = fixed_masks(optax.sgd(0.1, 0.9), masks)
      ...     ...  # your loop
      ...     return params, losses
      >>> result = imp(train_fn, params, num_steps=5000, rounds=10, prune_fraction=0.2,
      ...              rewind_step=500)
      >>> ticket_masks = result.masks
    """
    num_steps = _check_steps(num_steps, "num_steps", 1)
    sparsities = imp_sparsities(rounds, sparsity=sparsity, prune_fraction=prune_fraction)
    rewind_step = _check_steps(rewind_step, "rewind_step", 0)
    check_ranking(ranking)
    masks = ones_masks(init_params, prunable)
    # Fail early on bad distribution / overrides, before any training.
    one_shot_masks(jax.tree.map(jnp.abs, init_params), sparsities[-1], distribution=distribution,
                   ranking=ranking, prunable=prunable, overrides=overrides)

    if checkpoints is not None:
        checkpoints = dict(checkpoints)
        if num_steps not in checkpoints:
            raise ValueError(
                f"checkpoints must hold the trained dense weights at step num_steps={num_steps}; "
                f"saved steps are {sorted(checkpoints)}"
            )
        rewind_params = rewind(checkpoints, rewind_step)
        trained = rewind(checkpoints, num_steps)
        histories: list[Any] = [None]
    else:
        if rewind_step >= num_steps:
            raise ValueError(
                f"cannot rewind to step {rewind_step}: IMP saves the dense run's weights at "
                f"steps 0..{num_steps - 1} (rewind_step must be < num_steps={num_steps})"
            )
        dense = apply_masks(init_params, masks)
        if rewind_step == 0:
            rewind_params = dense
            trained, history = train_fn(dense, masks, num_steps)
        else:
            rewind_params, early = train_fn(dense, masks, rewind_step)
            trained, late = train_fn(rewind_params, masks, num_steps - rewind_step)
            history = (early, late)
        histories = [history]
        checkpoints = {0: init_params, rewind_step: rewind_params, num_steps: trained}

    masks_per_round = []
    params = trained
    for s in sparsities:
        masks = one_shot_masks(jax.tree.map(jnp.abs, params), s, distribution=distribution,
                               ranking=ranking, prunable=prunable, overrides=overrides,
                               where=masks)
        params, history = train_fn(apply_masks(rewind_params, masks), masks,
                                   num_steps - rewind_step)
        masks_per_round.append(masks)
        histories.append(history)
    return ImpResult(masks, params, rewind_params, checkpoints, masks_per_round, sparsities,
                     histories)


def scratch(train_fn: TrainFn, masks: Masks, fresh_params: PyTree, *, num_steps: int,
            budget: float = 1.0) -> tuple[PyTree, Any]:
    """Trains a learned mask from a fresh initialisation for ``budget * num_steps`` steps.

    Example:
      >>> params, history = scratch(train_fn, result.masks, model.init(key2, x),
      ...                           num_steps=5000, budget=2.0)
    """
    num_steps = _check_steps(num_steps, "num_steps", 1)
    b = float(budget)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
    steps = max(1, int(round(b * num_steps)))
    return train_fn(apply_masks(fresh_params, masks), masks, steps)


def scratch_e(train_fn: TrainFn, masks: Masks, fresh_params: PyTree, *,
              num_steps: int) -> tuple[PyTree, Any]:
    """Scratch-e: the mask trained from a fresh init for the same ``num_steps``.

    Reference: Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019.
    """
    return scratch(train_fn, masks, fresh_params, num_steps=num_steps, budget=1.0)


def scratch_b(train_fn: TrainFn, masks: Masks, fresh_params: PyTree, *,
              num_steps: int) -> tuple[PyTree, Any]:
    """Scratch-b: the mask trained from a fresh init for twice ``num_steps`` (the
    larger-budget baseline of Gale, Elsen & Hooker 2019, "The State of Sparsity").

    Reference: Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019.
    """
    return scratch(train_fn, masks, fresh_params, num_steps=num_steps, budget=2.0)
