"""GraNet (Liu et al. 2021): gradual magnitude pruning plus gradient regrowth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxsparse import schedules, topology
from jaxsparse.algorithms.common import LayerInputs, drop_count, layerwise, random_init
from jaxsparse.algorithms.pruning import budget_ramp
from jaxsparse.distributions import check_sparsity, layer_budgets, layer_specs
from jaxsparse.transform import SparsityRule, sparse_transform


def granet_targets(specs, initial_budgets, final_budgets, begin_step: int, end_step: int,
                   power: int = 3):
    """``step -> int32[n_layers]``: ``B_f + round((B_i - B_f) (1 - p_t)^power)``."""
    return budget_ramp(specs, initial_budgets, final_budgets, begin_step, end_step, power)


def granet(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    key: jax.Array,
    end_step: int,
    prune_end_step: int | None = None,
    initial_sparsity: float = 0.5,
    distribution: str = "erk",
    update_every: int = 100,
    begin_step: int = 0,
    drop_fraction: float = 0.3,
    drop_fraction_decay: str = "cosine",
    prunable=None,
    overrides=None,
    track_itop: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """GraNet: start sparse at ``initial_sparsity``, prune by magnitude on the Zhu & Gupta
    ramp to ``sparsity`` at ``prune_end_step`` (default ``end_step // 2``), and at every
    update also replace ``floor(f_t * nnz)`` of the remaining weights RigL-style (drop the
    smallest |W|, grow the largest |dense gradient|, new weights and moments zero).

    Updates happen at ``t % update_every == 0`` with ``begin_step < t < end_step``. After
    each update a layer has exactly ``granet_targets(t)`` active weights.

    Example:
      >>> tx = jaxsparse.granet(optax.sgd(0.1, 0.9), 0.95, initial_sparsity=0.5,
      ...                       end_step=10000, key=jax.random.key(0))
    """
    check_sparsity(sparsity)
    check_sparsity(initial_sparsity, "initial_sparsity")
    if initial_sparsity > sparsity:
        raise ValueError(
            f"initial_sparsity ({initial_sparsity}) must not exceed sparsity ({sparsity})")
    if key is None:
        raise ValueError("granet needs key=jax.random.key(seed) for its random masks")
    prune_end = end_step // 2 if prune_end_step is None else int(prune_end_step)
    if prune_end <= begin_step:
        raise ValueError(f"prune_end_step ({prune_end}) must be greater than begin_step "
                         f"({begin_step})")
    fraction = schedules.drop_fraction_schedule(drop_fraction, end_step, drop_fraction_decay)

    def targets_for(params):
        specs = layer_specs(params, prunable)
        b_i = layer_budgets(specs, initial_sparsity, distribution, overrides)
        b_f = layer_budgets(specs, sparsity, distribution, overrides)
        return specs, b_i, b_f

    def layer_targets(x, paths):
        specs, b_i, b_f = targets_for(x.params)
        by_path = {s.path: s for s in specs}
        targets = granet_targets([by_path[p] for p in paths], b_i, b_f, begin_step,
                                 prune_end)(x.step)
        return [targets[j] for j in range(len(paths))]

    def layer(x: LayerInputs):
        k1, k2 = jax.random.split(x.key)
        w, g = jnp.abs(x.weight), jnp.abs(x.grad)
        pruned = topology.top_k_mask(w, x.consts, where=x.mask)
        n = drop_count(pruned, fraction(x.step))
        kept = topology.drop_lowest(pruned, w, n, tie_key=k1)
        return kept | topology.top_k_mask(g, n, where=~kept, tie_key=k2)

    update_masks = layerwise(layer, layer_targets)

    rule = SparsityRule(
        init_masks=random_init(initial_sparsity, distribution, prunable, overrides),
        is_update_step=schedules.periodic(update_every, end_step, begin_step),
        update_masks=update_masks,
    )
    return sparse_transform(inner, rule, key=key, track_itop=track_itop)
