"""Dynamic sparse training: static masks, SET, RigL, SNFS.

Every factory wraps any optax optimizer and returns an optax transformation whose params stay
exactly sparse. The per-layer budget (number of active weights) is set at init by the
distribution and kept exactly at every topology update (SNFS keeps the global count exact
while moving weights between layers).

Topology updates happen at steps ``t`` with ``t % update_every == 0`` and
``begin_step < t < end_step``; the fraction of active weights replaced at step ``t`` follows
``drop_fraction`` with cosine decay to 0 at ``end_step`` (or constant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import bitmask, schedules, topology
from jaxsparse.algorithms.common import (
    LayerInputs,
    drop_count,
    layerwise,
    map_layers,
    random_init,
    rebuild,
    sparse_leaves,
    zero_after,
)
from jaxsparse.distributions import check_sparsity
from jaxsparse.layermap import map_groups
from jaxsparse.masks import map_masked
from jaxsparse.transform import SparsityRule, UpdateInputs, sparse_transform


def _check_key(key, name):
    if key is None:
        raise ValueError(f"{name} needs key=jax.random.key(seed) for its random masks")
    return key


def static(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    key: jax.Array,
    distribution: str = "erk",
    prunable=None,
    overrides=None,
) -> optax.GradientTransformationExtraArgs:
    """A fixed random mask drawn at init and never changed.

    Example:
      >>> tx = jaxsparse.static(optax.sgd(0.1), sparsity=0.9, key=jax.random.key(0))
    """
    check_sparsity(sparsity)
    rule = SparsityRule(
        init_masks=random_init(sparsity, distribution, prunable, overrides),
        is_update_step=schedules.never,
        update_masks=lambda x: x.masks,
    )
    return sparse_transform(inner, rule, key=_check_key(key, "static"), track_itop=False)


def drop_and_grow(drop_score, grow_score, fraction):
    """A per-layer DST rule: drop the ``floor(f_t * nnz)`` lowest ``drop_score`` active
    weights, then grow as many inactive ones with the highest ``grow_score``.

    ``drop_score`` / ``grow_score`` map :class:`LayerInputs` to a score array. Ties are broken
    at random with the layer's key. Grow candidates are all positions not kept (a weight just
    dropped can be regrown; it then keeps its value, as in RigL). The rule returns the new
    mask packed (:class:`~jaxsparse.bitmask.PackedMask`, for :func:`jaxsparse.layerwise`):
    each selection packs its mask where it computes it, so no bool mask of the layer (1 byte
    per weight) is ever stored."""

    def layer(x: LayerInputs):
        k_drop, k_grow, k_score = jax.random.split(x.key, 3)
        n = drop_count(x.mask, fraction(x.step))
        # Keep the nnz - n active weights of highest drop score ...
        kept = topology.top_k_keys(x.keys(lambda y: drop_score(y, k_score), x.mask),
                                   topology.count_true(x.mask) - n, tie_key=k_drop,
                                   packed=True)
        # ... and grow the n positions not kept of highest grow score.
        grown = topology.top_k_keys(
            x.keys(lambda y: grow_score(y, k_score), bitmask.complement(kept)), n,
            tie_key=k_grow, packed=True)
        return bitmask.or_packed(kept, grown)

    return layer


def magnitude_score(x: LayerInputs, key):
    del key
    return jnp.abs(x.weight)


def gradient_score(x: LayerInputs, key):
    del key
    return jnp.abs(x.grad)


def random_score(x: LayerInputs, key):
    return topology.random_scores(key, x.mask.shape)


def _dst(inner, sparsity, key, distribution, update_every, end_step, begin_step, drop_fraction,
         drop_fraction_decay, prunable, overrides, track_itop, grow_score, name):
    check_sparsity(sparsity)
    fraction = schedules.drop_fraction_schedule(drop_fraction, end_step, drop_fraction_decay)
    rule = SparsityRule(
        init_masks=random_init(sparsity, distribution, prunable, overrides),
        is_update_step=schedules.periodic(update_every, end_step, begin_step),
        update_masks=layerwise(drop_and_grow(magnitude_score, grow_score, fraction)),
    )
    return sparse_transform(inner, rule, key=_check_key(key, name), track_itop=track_itop)


def set_(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    key: jax.Array,
    end_step: int,
    distribution: str = "erk",
    update_every: int = 100,
    begin_step: int = 0,
    drop_fraction: float = 0.3,
    drop_fraction_decay: str = "cosine",
    prunable=None,
    overrides=None,
    track_itop: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """SET (Mocanu et al. 2018): drop the smallest |W|, grow uniformly at random.

    Drops by |W| over the layer (the original drops the fraction closest to zero among
    positive and negative weights separately); grown weights start at 0 (the original draws
    them small and random).

    Example:
      >>> tx = jaxsparse.set(optax.sgd(0.1, 0.9), 0.9, key=jax.random.key(0), end_step=7500)
    """
    return _dst(inner, sparsity, key, distribution, update_every, end_step, begin_step,
                drop_fraction, drop_fraction_decay, prunable, overrides, track_itop,
                random_score, "set")


def rigl(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    key: jax.Array,
    end_step: int,
    distribution: str = "erk",
    update_every: int = 100,
    begin_step: int = 0,
    drop_fraction: float = 0.3,
    drop_fraction_decay: str = "cosine",
    prunable=None,
    overrides=None,
    track_itop: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """RigL (Evci et al. 2020): drop the smallest |W|, grow the largest |dense gradient|.

    The gradient is the one passed to ``update``: differentiate the loss with respect to the
    stored, already-masked params (never compute ``kernel * mask`` in the forward pass, which
    zeroes exactly the gradients growth needs). Grown weights and their optimizer moments
    start at 0; kept weights take this step's update (as in SRigL's code; the TF reference
    skips the weight update on topology steps).

    Example:
      >>> tx = jaxsparse.rigl(optax.adamw(1e-3), sparsity=0.9, distribution="erk",
      ...                     update_every=100, end_step=7500, key=jax.random.key(0))
    """
    return _dst(inner, sparsity, key, distribution, update_every, end_step, begin_step,
                drop_fraction, drop_fraction_decay, prunable, overrides, track_itop,
                gradient_score, "rigl")


def snfs(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    key: jax.Array,
    end_step: int,
    distribution: str = "erk",
    update_every: int = 100,
    begin_step: int = 0,
    drop_fraction: float = 0.5,
    drop_fraction_decay: str = "cosine",
    momentum: float = 0.9,
    prunable=None,
    overrides=None,
    track_itop: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Sparse momentum / SNFS (Dettmers & Zettlemoyer 2019).

    Keeps an exponential moving average of the dense gradients (``momentum``) in the state.
    At an update each layer drops ``floor(f_t * nnz_l)`` smallest |W|; the total regrowth is
    redistributed across layers in proportion to the mean |momentum| of each layer's active
    weights (capped by each layer's free positions), and each layer grows its share by
    largest |momentum|. Per-layer counts move; the global count stays exact.
    """
    check_sparsity(sparsity)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    fraction = schedules.drop_fraction_schedule(drop_fraction, end_step, drop_fraction_decay)

    def init_extra(params, masks):
        return map_masked(lambda m, w: jnp.zeros(w.shape, jnp.float32), masks, params,
                          dense=lambda w: None)

    def accumulate(mom, grads, masks):
        return map_masked(
            lambda m, v, g: momentum * v + (1.0 - momentum) * g.astype(jnp.float32),
            masks, mom, grads,
        )

    def update_masks(x: UpdateInputs):
        idx, _, treedef, leaves = sparse_leaves(x)
        if not idx:
            return x.masks
        moms = [treedef.flatten_up_to(x.extra)[i] for i in idx]
        f = fraction(x.step)

        def drop_key(j):
            return jax.random.fold_in(x.key, 2 * j)

        def kept(layer, threshold, j, tied: bool):
            # The weights pass 1 keeps, from its threshold (recomputed where the layer is
            # read, fused into what uses it: no mask of the kept weights is stored).
            m, w, _ = layer
            keys = topology.candidate_keys(jnp.abs(w), bitmask.unpack(m))
            return topology.in_top_k(
                keys, lambda: topology.whole_ranks(keys.shape, drop_key(j)), threshold,
                tied=tied)

        # Pass 1, per layer: where to drop the floor(f * nnz) smallest |W| (a threshold: three
        # scalars, where a packed kept mask per layer would hold 1 bit per weight of the
        # whole model until pass 2); the layer's mean |momentum| over its active weights;
        # its free positions after the drop. (The layer's arrays are read in place,
        # map_groups' ``read``: no copy of them.)
        def drop(read, j):
            m = bitmask.unpack(read(lambda layer: layer[0]))
            nnz = topology.count_true(m)
            n = drop_count(m, f)
            keys = read(lambda layer: topology.candidate_keys(
                jnp.abs(layer[1]), bitmask.unpack(layer[0])))
            threshold = topology.top_k_keys_threshold(keys, nnz - n, tie_key=drop_key(j))
            # Summed once the threshold is found: XLA:CPU stores the summand of a large sum
            # (4 bytes per weight), which would otherwise live beside the keys.
            total = read(lambda layer, zero: jnp.sum(
                jnp.where(bitmask.unpack(layer[0]), jnp.abs(layer[2]), zero),
                dtype=jnp.float32), zero_after(threshold.lo, jnp.float32))
            mean = total / jnp.maximum(nnz, 1).astype(jnp.float32)
            return (*threshold, n, mean, m.size - (nnz - n))

        layers = [(m, w, v) for (m, w, _), v in zip(leaves, moms)]
        groups = map_groups(drop, layers, list(range(len(idx))), read=True)
        # Per-layer results in layer order; the scalars stay arrays (a slice per layer and
        # scalar would be a compiled kernel each).
        order = np.argsort(np.concatenate([members for members, _ in groups]))
        lo, hi, rank, n_drop, weights, caps = (
            jnp.concatenate([out[k] for _, out in groups])[order] for k in range(6))
        # The total regrowth, split across layers by mean |momentum| (capped by free room).
        regrow = topology.distribute(jnp.sum(n_drop), weights, caps)

        # Pass 2, per layer: grow its share by largest |momentum| among the positions not
        # kept.
        def grow(read, j):
            # Layer j's scalars read at the loop's index (one slice per layer and scalar
            # taken here would be restacked per group: ~4 operations per layer to compile).
            threshold = topology.Threshold(lo[j], hi[j], rank[j])

            def keys_and_kept(layer, tied: bool):
                keep = kept(layer, threshold, j, tied)
                return topology.candidate_keys(jnp.abs(layer[2]), ~keep), bitmask.pack(keep)

            # The tie ranks (a hash per weight) only when the drop tied at its threshold.
            keys, keep = read(lambda layer: jax.lax.cond(
                threshold.tied, lambda: keys_and_kept(layer, True),
                lambda: keys_and_kept(layer, False)))
            grown = topology.top_k_keys(keys, regrow[j],
                                        tie_key=jax.random.fold_in(x.key, 2 * j + 1),
                                        packed=True)
            return bitmask.or_packed(keep, grown)

        new = map_layers(grow, layers, list(range(len(idx))), read=True)
        return rebuild(treedef, treedef.num_leaves, idx, new)

    rule = SparsityRule(
        init_masks=random_init(sparsity, distribution, prunable, overrides),
        is_update_step=schedules.periodic(update_every, end_step, begin_step),
        update_masks=update_masks,
        init_extra=init_extra,
        accumulate=accumulate,
    )
    return sparse_transform(inner, rule, key=_check_key(key, "snfs"), track_itop=track_itop)
