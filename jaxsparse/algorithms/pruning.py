"""Dense-to-sparse pruning on the Zhu & Gupta (2017) schedule: magnitude and random.

Masks start fully active. At steps ``begin_step, begin_step + frequency, ...`` and at
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

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import schedules, topology
from jaxsparse.algorithms.common import dense_init
from jaxsparse.distributions import check_sparsity, layer_budgets, layer_specs, resolve_overrides
from jaxsparse.masks import is_none, leaf_paths
from jaxsparse.transform import SparsityRule, UpdateInputs, sparse_transform

RANKINGS = ("layerwise", "global")


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


def _gradual(inner, sparsity, end_step, begin_step, frequency, initial_sparsity, ranking,
             distribution, prunable, overrides, power, key, score_fn):
    check_sparsity(sparsity)
    check_sparsity(initial_sparsity, "initial_sparsity")
    if initial_sparsity > sparsity:
        raise ValueError(
            f"initial_sparsity ({initial_sparsity}) must not exceed sparsity ({sparsity})"
        )
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {RANKINGS}")
    periodic = schedules.periodic(frequency, end_step, begin_step, include_begin=True)

    def is_update_step(step):
        return periodic(step) | (jnp.asarray(step) == end_step)

    def budgets_of(params):
        specs = layer_specs(params, prunable)
        return specs, layer_budgets(specs, sparsity, distribution, overrides)

    def update_masks(x: UpdateInputs):
        m_leaves, treedef = jax.tree.flatten(x.masks, is_leaf=is_none)
        p_leaves = jax.tree.leaves(x.params)
        paths = leaf_paths(x.params)
        idx = [i for i, m in enumerate(m_leaves) if m is not None]
        specs, budgets = budgets_of(x.params)
        by_path = {s.path: s for s in specs}
        mask_specs = [by_path[paths[i]] for i in idx]
        targets = pruning_targets(
            mask_specs, budgets, initial_sparsity, begin_step, end_step, power
        )(x.step)
        keys = jax.random.split(x.key, len(idx))
        ms = [m_leaves[i] for i in idx]
        scores = [score_fn(p_leaves[i], keys[j]) for j, i in enumerate(idx)]
        new_ms = [topology.top_k_mask(sc, targets[j], where=m) for j, (m, sc) in
                  enumerate(zip(ms, scores))]
        if ranking == "global":
            # Overridden layers follow their own ramp; the others share one ranking.
            fixed = resolve_overrides(specs, overrides)
            free = [j for j, sp in enumerate(mask_specs) if sp.path not in fixed]
            if free:
                flat_s = jnp.concatenate([scores[j].ravel().astype(jnp.float32) for j in free])
                flat_m = jnp.concatenate([ms[j].ravel() for j in free])
                total = sum(targets[j] for j in free)  # adds, not a reduction
                keep = topology.top_k_mask(flat_s, total, where=flat_m)
                offsets = np.cumsum([0] + [ms[j].size for j in free])
                for n, j in enumerate(free):
                    new_ms[j] = keep[offsets[n]:offsets[n + 1]].reshape(ms[j].shape)
        new = list(m_leaves)
        for j, i in enumerate(idx):
            new[i] = new_ms[j]
        return jax.tree.unflatten(treedef, new), x.extra

    base_init = dense_init(prunable, overrides)

    def init_masks(params, key):
        budgets_of(params)  # raises early on bad sparsity / overrides / empty layers
        return base_init(params, key)

    rule = SparsityRule(
        init_masks=init_masks,
        is_update_step=is_update_step,
        update_masks=update_masks,
    )
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
    frequency: int = 100,
    initial_sparsity: float = 0.0,
    ranking: str = "layerwise",
    distribution: str = "uniform",
    prunable=None,
    overrides=None,
    power: int = 3,
) -> optax.GradientTransformationExtraArgs:
    """Gradual magnitude pruning (Zhu & Gupta 2017) to ``sparsity`` at ``end_step``.

    Args:
      inner: any optax optimizer.
      sparsity: final sparsity in [0, 1).
      end_step, begin_step, frequency: prune at begin, every ``frequency`` steps, and at end.
      initial_sparsity: sparsity applied at ``begin_step`` (s_i of the ramp).
      ranking: ``"layerwise"`` (each layer to its own target) or ``"global"`` (one ranking
        over all non-overridden layers, whose per-layer targets only set the total).
      distribution: how the final sparsity is split over layers (``"uniform"`` default).
      overrides: ``{path regex: sparsity}``, e.g. ``{"Dense_0": 0.0, "Dense_2": 0.8}``
        (State of Sparsity: first layer dense, last at 80%).

    Example:
      >>> tx = jaxsparse.magnitude_pruning(optax.sgd(0.1, 0.9), 0.9, begin_step=1000,
      ...                                  end_step=8000, frequency=100)
    """
    return _gradual(inner, sparsity, end_step, begin_step, frequency, initial_sparsity, ranking,
                    distribution, prunable, overrides, power, None, _magnitude)


def random_pruning(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    key: jax.Array,
    end_step: int,
    begin_step: int = 0,
    frequency: int = 100,
    initial_sparsity: float = 0.0,
    ranking: str = "layerwise",
    distribution: str = "uniform",
    prunable=None,
    overrides=None,
    power: int = 3,
) -> optax.GradientTransformationExtraArgs:
    """Random pruning on the same schedule as :func:`magnitude_pruning`: the lower bound
    every pruning method should beat. Scores are fresh uniform draws at each update."""
    if key is None:
        raise ValueError("random_pruning needs key=jax.random.key(seed)")
    return _gradual(inner, sparsity, end_step, begin_step, frequency, initial_sparsity, ranking,
                    distribution, prunable, overrides, power, key, _random)
