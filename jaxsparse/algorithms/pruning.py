"""Dense-to-sparse pruning on the Zhu & Gupta (2017) schedule: magnitude and random.

Masks start fully active. At steps ``begin_step, begin_step + update_every, ...`` and at
``end_step``, each layer (``ranking="layerwise"``) or all layers together
(``ranking="global"``) keep the highest-scoring active weights, as many as the cubic ramp
allows at that step. Pruned weights never come back, and they receive no gradient: the inner
optimizer sees gradients masked by the current mask and the weights stay exactly zero (the
State of Sparsity convention).

Per-layer targets are integers: with ``B_f`` the layer's final budget (from the distribution)
and ``B_i`` its budget at ``initial_sparsity``, the count at step t is
``B_f + round((B_i - B_f) * (1 - p_t)^power)`` with ``p_t = clip((t - t0) / (t1 - t0), 0, 1)``,
so the final sparsity is hit exactly. :func:`pruning_targets` returns these counts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxsparse import bitmask, schedules, topology
from jaxsparse.algorithms.common import dense_init, rebuild, sparse_leaves
from jaxsparse.distributions import check_sparsity, layer_budgets, layer_specs, resolve_overrides
from jaxsparse.topology import RANKINGS, check_ranking
from jaxsparse.transform import SparsityRule, UpdateInputs, sparse_transform

__all__ = ["RANKINGS", "budget_ramp", "magnitude_pruning", "pruning_targets", "random_pruning",
           "update_period"]


def update_period(update_every: int, frequency: int | None, name: str) -> int:
    """The update period, taking the deprecated ``frequency`` argument into account."""
    if frequency is not None:
        warnings.warn(f"{name}(frequency=...) is deprecated: pass update_every=...",
                      DeprecationWarning, stacklevel=3)
        update_every = frequency
    if int(update_every) != update_every or update_every < 1:
        raise ValueError(f"update_every must be a positive integer, got {update_every!r}")
    return int(update_every)


def budget_ramp(
    specs, initial_budgets, final_budgets, begin_step: int, end_step: int, power: int = 3
) -> Callable[[jax.Array], jax.Array]:
    """``step -> int32[n_layers]``: ``B_f + round((B_i - B_f) * (1 - p_t)^power)`` with
    ``p_t = clip((t - begin) / (end - begin), 0, 1)``: exact integers, ``B_f`` at the end."""
    b_i = jnp.asarray([initial_budgets[s.path] for s in specs], jnp.int32)
    b_f = jnp.asarray([final_budgets[s.path] for s in specs], jnp.int32)

    def targets(step):
        p = jnp.clip(
            (jnp.asarray(step, jnp.float32) - begin_step) / float(end_step - begin_step), 0.0, 1.0
        )
        ramp = (b_i - b_f).astype(jnp.float32) * (1.0 - p) ** power
        return b_f + jnp.round(ramp).astype(jnp.int32)

    return targets


def pruning_targets(
    specs, final_budgets, initial_sparsity: float, begin_step: int, end_step: int, power: int = 3
) -> Callable[[jax.Array], jax.Array]:
    """``step -> int32[n_layers]`` active-weight targets on the cubic ramp (see module doc);
    every layer starts at ``initial_sparsity`` (or its final budget if that is larger)."""
    initial = {
        s.path: max(final_budgets[s.path], int(round((1.0 - initial_sparsity) * s.size)))
        for s in specs
    }
    return budget_ramp(specs, initial, final_budgets, begin_step, end_step, power)


def _gradual(inner, sparsity, end_step, begin_step, update_every, initial_sparsity, ranking,
             distribution, prunable, overrides, power, key, score_fn):
    check_sparsity(sparsity)
    check_sparsity(initial_sparsity, "initial_sparsity")
    if initial_sparsity > sparsity:
        raise ValueError(
            f"initial_sparsity ({initial_sparsity}) must not exceed sparsity ({sparsity})"
        )
    check_ranking(ranking)
    if isinstance(power, bool) or int(power) != power or power < 1:
        raise ValueError(f"power must be a positive integer (3 is Zhu & Gupta's), got {power!r}")
    periodic = schedules.periodic(update_every, end_step, begin_step, include_begin=True)

    def is_update_step(step):
        return periodic(step) | (jnp.asarray(step) == end_step)

    def budgets_of(params):
        specs = layer_specs(params, prunable)
        return specs, layer_budgets(specs, sparsity, distribution, overrides)

    def update_masks(x: UpdateInputs):
        specs, budgets = budgets_of(x.params)
        idx, paths, treedef, leaves = sparse_leaves(x)
        by_path = {s.path: s for s in specs}
        targets = pruning_targets([by_path[p] for p in paths], budgets, initial_sparsity,
                                  begin_step, end_step, power)(x.step)
        # Global ranking: overridden layers follow their own ramp; the others share one.
        fixed = resolve_overrides(specs, overrides) if ranking == "global" else {}
        shared = [j for j, p in enumerate(paths) if ranking == "global" and p not in fixed]

        def keys(layer, j):
            # Computed where the layer lives (no copy of its weights).
            return topology.candidate_keys(score_fn(layer[1], jax.random.fold_in(x.key, j)),
                                           bitmask.unpack(layer[0]))

        new = topology.top_k_per_layer(keys, [(m, w) for m, w, _ in leaves],
                                       [jnp.shape(w) for _, w, _ in leaves], targets,
                                       shared=shared)
        return rebuild(treedef, treedef.num_leaves, idx, new)

    base_init = dense_init(prunable, overrides)

    def init_masks(params, key):
        budgets_of(params)  # raises early on bad sparsity / overrides / empty layers
        return base_init(params, key)

    rule = SparsityRule(
        init_masks=init_masks,
        is_update_step=is_update_step,
        update_masks=update_masks,
    )
    # Magnitude pruning draws nothing at random: its key only feeds the tie-breaks, which
    # are deterministic (earliest position wins); the fixed key keeps it that way.
    if key is None:
        key = jax.random.key(0)
    return sparse_transform(inner, rule, key=key, track_itop=False)


def _magnitude(w, key):
    del key
    return jnp.abs(w)


def _random(w, key):
    return topology.random_scores(key, w.shape)


def magnitude_pruning(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    initial_sparsity: float = 0.0,
    ranking: str = "layerwise",
    distribution: str = "uniform",
    prunable=None,
    overrides=None,
    power: int = 3,
    frequency: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Gradual magnitude pruning (Zhu & Gupta 2017) to ``sparsity`` at ``end_step``.

    Args:
      inner: any optax optimizer.
      sparsity: final sparsity in [0, 1).
      end_step, begin_step, update_every: prune at begin, every ``update_every`` steps, and
        at end (``frequency`` is the deprecated name of ``update_every``).
      initial_sparsity: sparsity applied at ``begin_step`` (s_i of the ramp).
      ranking: ``"layerwise"`` (each layer to its own target) or ``"global"`` (one ranking
        over all non-overridden layers, whose per-layer targets only set the total).
      distribution: how the final sparsity is split over layers (``"uniform"`` default).
      overrides: ``{path regex: sparsity}``, e.g. ``{"Dense_0": 0.0, "Dense_2": 0.8}``
        (State of Sparsity: first layer dense, last at 80%).

    Example:
      >>> tx = jaxsparse.magnitude_pruning(optax.sgd(0.1, 0.9), 0.9, begin_step=1000,
      ...                                  end_step=8000, update_every=100)
    """
    update_every = update_period(update_every, frequency, "magnitude_pruning")
    return _gradual(inner, sparsity, end_step, begin_step, update_every, initial_sparsity,
                    ranking, distribution, prunable, overrides, power, None, _magnitude)


def random_pruning(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    key: jax.Array,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    initial_sparsity: float = 0.0,
    ranking: str = "layerwise",
    distribution: str = "uniform",
    prunable=None,
    overrides=None,
    power: int = 3,
    frequency: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Random pruning on the same schedule as :func:`magnitude_pruning`: the lower bound
    every pruning method should beat. Scores are fresh uniform draws at each update."""
    if key is None:
        raise ValueError("random_pruning needs key=jax.random.key(seed)")
    update_every = update_period(update_every, frequency, "random_pruning")
    return _gradual(inner, sparsity, end_step, begin_step, update_every, initial_sparsity,
                    ranking, distribution, prunable, overrides, power, key, _random)
