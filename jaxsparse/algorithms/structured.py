"""Structured sparse training: SRigL (constant fan-in + neuron ablation) and N:M sparsity.

A *neuron* is an output unit: a column of a Dense kernel (in, out), an output channel of a
Conv kernel (h, w, in, out), whose fan-in is h*w*in (all axes but the last). The same rule
holds for any n-D kernel: Flax's ``MultiHeadDotProductAttention`` keeps q/k/v as
(in, heads, head_dim), so there a neuron is one feature index pooled over all heads (fan-in
in*heads); use 2-D (in, heads*head_dim) projections for one neuron per (head, feature), as
``experiments.models.SelfAttention`` does.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import bitmask, schedules, topology
from jaxsparse.algorithms.common import (
    LayerInputs,
    draw_masks,
    drop_count,
    layerwise,
    masks_for_paths,
)
from jaxsparse.algorithms.pruning import pruning_targets, update_period
from jaxsparse.distributions import LayerSpec, check_sparsity, layer_budgets, layer_specs
from jaxsparse.masks import leaf_paths
from jaxsparse.transform import SparsityRule, sparse_transform


def _fan_in(shape) -> int:
    return int(np.prod(shape[:-1]))


def fan_in_budgets(params, sparsity, distribution, prunable, overrides) -> dict[str, int]:
    """Per-leaf constant fan-in ``k = max(1, round(B / n_out))`` from the distribution's
    budgets ``B``; a leaf whose k equals its dense fan-in stays dense."""
    specs = layer_specs(params, prunable)
    budgets = layer_budgets(specs, sparsity, distribution, overrides)
    return {
        s.path: min(_fan_in(s.shape), max(1, int(round(budgets[s.path] / s.shape[-1]))))
        for s in specs
    }


def _tau(gamma_sal: float, k0: int) -> int:
    """The ablation threshold ``max(1, floor(gamma_sal * k0))`` (host arithmetic)."""
    return max(1, int(np.floor(gamma_sal * k0)))


def output_layer_path(paths: list[str], pattern: str | None, what: str) -> str | None:
    """The layer SRigL never ablates: the last of ``paths``, or the last matching the regex
    ``pattern``; ``what`` names the paths in the error when none matches."""
    if pattern is None:
        return paths[-1] if paths else None
    hits = [p for p in paths if re.search(pattern, p)]
    if not hits:
        raise ValueError(f"output_layer {pattern!r} matches no {what}; {what}s are {paths}")
    return hits[-1]


def min_neurons(k0, n_out: int, fan_in: int, output) -> int | jax.Array:
    """The neurons that survive ablation at least: all ``n_out`` in the output layer, else
    ``max(1, floor(k0 * n_out / fan_in))`` (the budget must fit in the survivors' fan-in).
    An ``int`` when ``k0`` and ``output`` are host values (a per-layer constant traces no
    operation), else an ``int32[]``."""
    if isinstance(k0, (int, np.integer)) and isinstance(output, (bool, np.bool_)):
        return n_out if output else max(1, int(k0) * n_out // fan_in)
    k0 = jnp.asarray(k0, jnp.int32)
    return jnp.where(output, jnp.int32(n_out), jnp.maximum(1, k0 * n_out // fan_in))


def srigl_drop_count(budget, fraction) -> jax.Array:
    """``floor(fraction * budget)`` in float32, as an int32: how many weights an SRigL
    update drops by |W| (and ranks by |grad| for saliency)."""
    budget = jnp.asarray(budget, jnp.int32)
    return jnp.floor(jnp.asarray(fraction, jnp.float32) * budget.astype(jnp.float32)
                     ).astype(jnp.int32)


def fan_ins_after_ablation(salient_counts, *, n_out: int, budget, fan_in: int, tau,
                           min_neurons, key) -> jax.Array:
    """SRigL's new fan-in per neuron, ``int32[n_out]``: ``k' = floor(budget / n_active)``
    (at most ``fan_in``) for the active neurons, 0 for the ablated ones.

    A neuron is active when it has at least ``tau`` salient weights (``salient_counts``,
    ``int32[n_out]``; ``None``: no ablation, every neuron active); when fewer than
    ``min_neurons`` are, the ``min_neurons`` with the most salient weights are (ties at
    random by ``key``).
    """
    if salient_counts is None:
        active = jnp.ones((n_out,), bool)
    else:
        active = salient_counts >= tau

        def guard():
            # The min_neurons with the most salient weights. Rare, and over n_out entries:
            # one sort to compile (the counting search compiled a dozen kernels into every
            # SRigL update for this branch).
            return topology.top_k_short(salient_counts.astype(jnp.float32), min_neurons,
                                        tie_key=key)

        active = jax.lax.cond(topology.count_true(active) < min_neurons, guard,
                              lambda: active)
    n_active = jnp.maximum(topology.count_true(active), 1)
    k_new = jnp.minimum(budget // n_active, fan_in)
    return jnp.where(active, k_new, 0)


def srigl_layer(mask, weight, grad, key, *, k0, fraction, gamma_sal: float,
                ablation: bool, min_neurons, tau=None):
    """One SRigL update of one layer (Lasby et al. 2024), as a pure function.

    Args:
      mask, weight, grad: the layer's current mask, (masked) weights and dense gradient.
      key: PRNG key for tie-breaks.
      k0: the un-ablated constant fan-in; the layer budget is ``B = k0 * n_out`` (traced
        ok).
      fraction: drop fraction f_t (traced ok).
      gamma_sal: ablation threshold factor; a neuron with fewer than
        ``max(1, floor(gamma_sal * k0))`` salient weights is ablated.
      ablation: False gives constant fan-in RigL (no neuron is ablated).
      min_neurons: neurons that always survive (lower tau if needed); ``n_out`` for the
        output layer (traced ok).
      tau: the ablation threshold, ``max(1, floor(gamma_sal * k0))``; give it when ``k0``
        is traced (it is computed on the host from a Python ``k0`` otherwise).

    Returns:
      The new mask: every active neuron has exactly ``k' = floor(B / n_active)`` inputs,
      ablated neurons have none.
    """
    return bitmask.unpack(_srigl(LayerInputs(mask, weight, grad, key, step=None, extra=None),
                                 k0=k0, fraction=fraction, gamma_sal=gamma_sal,
                                 ablation=ablation, min_neurons=min_neurons, tau=tau))


def _random_fan_in(key, shape, nnz):
    """SRigL's initial mask: ``nnz / n_out`` random inputs per neuron."""
    return topology.random_mask_per_neuron(key, shape, nnz // shape[-1])


def _srigl(x: LayerInputs, *, k0, fraction, gamma_sal, ablation, min_neurons, tau):
    """:func:`srigl_layer` on a layer's inputs, the keys of |W| and |grad| among a set of
    candidates computed by :meth:`LayerInputs.keys` (under :func:`~jaxsparse.layerwise`,
    where the layer's arrays live); the new mask packed."""
    mask, key = x.mask, x.key

    def w_keys(where, after=None):
        return x.keys(lambda y: jnp.abs(y.weight), where, after=after)

    def g_keys(where, after=None):
        return x.keys(lambda y: jnp.abs(y.grad), where, after=after)

    shape = mask.shape
    n_out = shape[-1]
    if tau is None:
        tau = _tau(gamma_sal, k0)
    k0 = jnp.asarray(k0, jnp.int32)
    budget = k0 * n_out
    k_keep, k_grow, k_abl, k_fill = jax.random.split(key, 4)
    n_drop = srigl_drop_count(budget, fraction)
    n_keep = budget - n_drop
    # Each key array is computed after the selection before it (``after``): one lives at
    # a time. The masks held across a selection are packed (1/8 byte per weight).
    # Every mask is packed where its selection computes it: no bool mask of the layer
    # (1 byte per weight) is stored.
    kept = topology.top_k_keys(w_keys(mask), n_keep, tie_key=k_keep, packed=True)
    if ablation:
        salient = bitmask.or_packed(kept, topology.top_k_keys(
            g_keys(None, after=kept), n_drop, tie_key=k_grow, packed=True))
        counts = topology.count_per_neuron(bitmask.unpack(salient))
    else:
        counts = None
    k_vec = fan_ins_after_ablation(counts, n_out=n_out, budget=budget, fan_in=_fan_in(shape),
                                   tau=tau, min_neurons=min_neurons, key=k_abl)
    # Survivors keep their top k' kept weights by |W|. A neuron only has more than k' when
    # k' fell since the last update (neurons came back): the selection (keys of the layer,
    # a pass per neuron) runs only then, under a lax.cond of the update branch.
    held = topology.count_per_neuron(bitmask.unpack(kept))
    keep = jax.lax.cond(
        jnp.any(held > k_vec),
        lambda: topology.top_k_keys(w_keys(kept, after=k_vec), k_vec, per_neuron=True,
                                    packed=True),
        lambda: kept)
    need = k_vec - jnp.minimum(held, k_vec)
    grow = topology.top_k_keys(g_keys(bitmask.complement(keep)), need, tie_key=k_fill,
                               per_neuron=True, packed=True)
    return bitmask.or_packed(keep, grow)


def srigl(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    key: jax.Array,
    end_step: int,
    gamma_sal: float = 0.3,
    ablation: bool = True,
    output_layer: str | None = None,
    distribution: str = "erk",
    update_every: int = 100,
    begin_step: int = 0,
    drop_fraction: float = 0.3,
    drop_fraction_decay: str = "cosine",
    prunable=None,
    overrides=None,
    track_itop: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """SRigL (Lasby et al. 2024): RigL with constant fan-in per neuron and neuron ablation.

    Each layer gets a budget ``B = k0 * n_out`` (``k0`` from the distribution's budget, at
    least 1) and starts with exactly ``k0`` random inputs per neuron. At each update: the
    salient set is the top ``B - n_drop`` weights by |W| union the top ``n_drop`` by |grad|
    (``n_drop = floor(f_t B)``); neurons with fewer than ``max(1, floor(gamma_sal * k0))``
    salient weights are ablated (never the output layer; at least ``floor(B / fan_in)``
    neurons survive); survivors keep their top ``k' = floor(B / n_active)`` weights by |W|
    and grow to exactly ``k'`` by |grad|. Ablation is decided afresh at every update, so
    neurons can come back. ``k'`` is a traced value: no recompilation when it moves.

    Args:
      gamma_sal: 0.3 for CNNs (paper), 0.95 for ViT MLPs.
      ablation: False gives constant fan-in RigL.
      output_layer: regex of the leaf that must keep all its neurons; default: the last
        prunable leaf in flattening order (check it with ``jaxsparse.layer_specs``; linen
        names ``Dense_10`` sort before ``Dense_2``).

    Example:
      >>> tx = jaxsparse.srigl(optax.sgd(0.1, 0.9), 0.9, key=jax.random.key(0),
      ...                      end_step=7500, gamma_sal=0.3)
    """
    check_sparsity(sparsity)
    if not 0.0 <= gamma_sal <= 1.0:
        raise ValueError(f"gamma_sal must be in [0, 1], got {gamma_sal!r}")
    if key is None:
        raise ValueError("srigl needs key=jax.random.key(seed) for its random masks")
    fraction = schedules.drop_fraction_schedule(drop_fraction, end_step, drop_fraction_decay)

    def plan(params) -> tuple[dict[str, int], str | None]:
        ks = fan_in_budgets(params, sparsity, distribution, prunable, overrides)
        shapes = dict(zip(leaf_paths(params), map(jnp.shape, jax.tree.leaves(params))))
        sparse = [p for p in ks if ks[p] < _fan_in(shapes[p])]
        return ks, output_layer_path(sparse, output_layer, "sparse leaf")

    def init_masks(params, key):
        ks, _ = plan(params)
        shapes = {s.path: s.shape for s in layer_specs(params, prunable)}
        budgets = {p: k * shapes[p][-1] for p, k in ks.items()}
        return draw_masks(params, budgets, _random_fan_in, key)

    def layer_consts(x, paths):
        ks, out = plan(x.params)
        shapes = dict(zip(leaf_paths(x.params), map(jnp.shape, jax.tree.leaves(x.params))))
        consts = []
        for path in paths:
            shape, k0 = shapes[path], ks[path]
            consts.append({"k0": k0, "tau": _tau(gamma_sal, k0),
                           "min_neurons": min_neurons(k0, shape[-1], _fan_in(shape),
                                                      path == out)})
        return consts

    def layer(x: LayerInputs):
        return _srigl(x, k0=x.consts["k0"], fraction=fraction(x.step), gamma_sal=gamma_sal,
                      ablation=ablation, min_neurons=x.consts["min_neurons"],
                      tau=x.consts["tau"])

    update_masks = layerwise(layer, layer_consts)

    rule = SparsityRule(
        init_masks=init_masks,
        is_update_step=schedules.periodic(update_every, end_step, begin_step),
        update_masks=update_masks,
    )
    return sparse_transform(inner, rule, key=key, track_itop=track_itop)


def _nm_specs(params, prunable, n, m) -> list[LayerSpec]:
    specs = layer_specs(params, prunable)
    for s in specs:
        if _fan_in(s.shape) % m:
            raise ValueError(
                f"N:M sparsity needs the fan-in of {s.path!r} (shape {s.shape}, fan-in "
                f"{_fan_in(s.shape)}) to be a multiple of M={m}; exclude it with prunable=..."
            )
    return specs


def nm_pruning(
    inner: optax.GradientTransformation,
    n: int = 2,
    m: int = 4,
    *,
    end_step: int,
    begin_step: int = 0,
    update_every: int = 100,
    prunable=None,
    frequency: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Magnitude pruning to an N:M pattern along the fan-in (2:4 for sparse tensor cores).

    One-shot when ``end_step == begin_step + 1`` (a single projection at ``begin_step``);
    otherwise gradual: at ``begin_step``, every ``update_every`` steps and at ``end_step`` each
    group of M keeps ``n_t`` weights by |W|, where ``n_t`` falls from M to N on the cubic
    Zhu & Gupta ramp (the same integer rule as :func:`magnitude_pruning`). Pruned weights
    never return.

    Example:
      >>> tx = jaxsparse.nm_pruning(optax.adam(1e-3), 2, 4, begin_step=1000, end_step=5000)
    """
    n, m = topology.check_nm(n, m)
    update_every = update_period(update_every, frequency, "nm_pruning")
    one_shot = end_step == begin_step + 1
    periodic = schedules.periodic(update_every, end_step, begin_step, include_begin=True)
    ramp = pruning_targets([LayerSpec("group", (m,))], {"group": n}, 0.0, begin_step,
                           max(end_step, begin_step + 1))

    def is_update_step(step):
        step = jnp.asarray(step)
        if one_shot:
            return step == begin_step
        return periodic(step) | (step == end_step)

    def init_masks(params, key):
        del key
        specs = _nm_specs(params, prunable, n, m)
        return masks_for_paths(params, {s.path for s in specs},
                               lambda i, path, shape: jnp.ones(shape, bool))

    def layer(x: LayerInputs):
        n_t = jnp.asarray(n) if one_shot else ramp(x.step)[0]
        score = jnp.where(x.mask, jnp.abs(x.weight), -jnp.inf)
        return topology.nm_mask(score, n_t, m) & x.mask

    update_masks = layerwise(layer)

    rule = SparsityRule(init_masks=init_masks, is_update_step=is_update_step,
                        update_masks=update_masks)
    return sparse_transform(inner, rule, key=jax.random.key(0), track_itop=False)


def nm_rigl(
    inner: optax.GradientTransformation,
    n: int = 2,
    m: int = 4,
    *,
    key: jax.Array,
    end_step: int,
    update_every: int = 100,
    begin_step: int = 0,
    drop_fraction: float = 0.3,
    drop_fraction_decay: str = "cosine",
    prunable=None,
    track_itop: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """RigL whose masks are N:M after every update.

    Starts from a random N:M mask. At each update the ``floor(f_t * nnz)`` smallest |W| are
    dropped (over the layer), then each group of M refills its free slots (N minus the
    weights it kept) by largest |dense gradient|; so exactly as many weights grow as were
    dropped and every group keeps exactly N.
    """
    n, m = topology.check_nm(n, m)
    if key is None:
        raise ValueError("nm_rigl needs key=jax.random.key(seed) for its random masks")
    fraction = schedules.drop_fraction_schedule(drop_fraction, end_step, drop_fraction_decay)

    def init_masks(params, key):
        specs = _nm_specs(params, prunable, n, m)
        return masks_for_paths(
            params, {s.path for s in specs},
            lambda i, path, shape: topology.nm_mask(
                topology.random_scores(jax.random.fold_in(key, i), shape), n, m),
        )

    def layer(x: LayerInputs):
        w = jnp.abs(x.weight)
        kept = topology.drop_lowest(x.mask, w, drop_count(x.mask, fraction(x.step)),
                                    tie_key=x.key)
        return topology.nm_mask(jnp.where(kept, w, jnp.abs(x.grad)), n, m, priority=kept)

    update_masks = layerwise(layer)

    rule = SparsityRule(
        init_masks=init_masks,
        is_update_step=schedules.periodic(update_every, end_step, begin_step),
        update_masks=update_masks,
    )
    return sparse_transform(inner, rule, key=key, track_itop=track_itop)
