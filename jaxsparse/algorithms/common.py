"""Pieces shared by the algorithm factories: initial masks and per-layer mapping."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsparse import topology
from jaxsparse.distributions import layer_budgets, layer_specs, resolve_overrides
from jaxsparse.masks import Masks, Prunable, PyTree, is_none, path_to_str
from jaxsparse.transform import UpdateInputs


def budgets_for(params, sparsity, distribution, prunable, overrides) -> dict[str, int]:
    """``{path: nnz}`` for each prunable leaf of ``params``."""
    return layer_budgets(layer_specs(params, prunable), sparsity, distribution, overrides)


def masks_for_paths(
    params: PyTree, paths, make: Callable[[int, str, tuple], jax.Array]
) -> Masks:
    """Builds masks leaf by leaf: ``make(index, path, shape)`` for the leaves whose path is in
    ``paths`` (``index`` counts those leaves in flattening order), ``None`` elsewhere."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out, index = [], 0
    for p, leaf in flat:
        path = path_to_str(p)
        if path in paths:
            out.append(make(index, path, tuple(leaf.shape)))
            index += 1
        else:
            out.append(None)
    return jax.tree.unflatten(treedef, out)


def masks_from_budgets(
    params: PyTree, budgets: Mapping[str, int], make: Callable[[int, tuple, int], jax.Array]
) -> Masks:
    """``make(index, shape, nnz)`` for sparse leaves, ``None`` for leaves without a budget or
    with a dense budget."""
    sizes = {path_to_str(p): leaf.size
             for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    sparse = {path for path, nnz in budgets.items() if nnz < sizes[path]}
    return masks_for_paths(params, sparse,
                           lambda i, path, shape: make(i, shape, budgets[path]))


def random_init(
    sparsity: float, distribution: str, prunable: Prunable, overrides
) -> Callable[[PyTree, jax.Array], Masks]:
    """``init_masks`` drawing a uniformly random mask with the budgeted count per layer."""

    def init_masks(params, key):
        budgets = budgets_for(params, sparsity, distribution, prunable, overrides)
        return masks_from_budgets(
            params,
            budgets,
            lambda i, shape, nnz: topology.random_mask(jax.random.fold_in(key, i), shape, nnz),
        )

    return init_masks


def dense_init(prunable: Prunable, overrides) -> Callable[[PyTree, jax.Array], Masks]:
    """``init_masks`` with every prunable leaf fully active (dense-to-sparse methods).

    Leaves overridden to sparsity 0 stay dense (``None``)."""

    def init_masks(params, key):
        del key
        specs = layer_specs(params, prunable)
        fixed = resolve_overrides(specs, overrides)
        sparse_paths = {s.path for s in specs if fixed.get(s.path, 1.0) != 0.0}
        return jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.ones(x.shape, bool) if path_to_str(p) in sparse_paths else None,
            params,
        )

    return init_masks


class LayerInputs(NamedTuple):
    """What a per-layer update function sees (one prunable leaf)."""

    mask: jax.Array
    weight: jax.Array
    grad: jax.Array
    key: jax.Array
    step: jax.Array
    extra: object


def layerwise(
    fn: Callable[[LayerInputs], jax.Array],
) -> Callable[[UpdateInputs], tuple[Masks, object]]:
    """Lifts a per-layer rule ``LayerInputs -> new mask`` to a whole-model ``update_masks``.

    Layer ``i`` gets ``fold_in(key, i)``; ``extra`` is passed per leaf when it is a tree with
    the params' structure, else whole.

    Example (SET in four lines):
      >>> def set_layer(x):
      ...     n = jnp.floor(0.3 * x.mask.sum()).astype(jnp.int32)
      ...     kept = drop_lowest(x.mask, jnp.abs(x.weight), n)
      ...     return grow_highest(kept, random_scores(x.key, x.mask.shape), n)
      >>> update_masks = layerwise(set_layer)
    """

    def update_masks(inputs: UpdateInputs):
        m_leaves, treedef = jax.tree.flatten(inputs.masks, is_leaf=is_none)
        p_leaves = jax.tree.leaves(inputs.params)
        g_leaves = jax.tree.leaves(inputs.grads)
        try:
            e_leaves = treedef.flatten_up_to(inputs.extra)
        except (ValueError, TypeError):
            e_leaves = [inputs.extra] * len(m_leaves)
        out, index = [], 0
        for m, w, g, e in zip(m_leaves, p_leaves, g_leaves, e_leaves):
            if m is None:
                out.append(None)
                continue
            k = jax.random.fold_in(inputs.key, index)
            out.append(fn(LayerInputs(m, w, g, k, inputs.step, e)))
            index += 1
        return jax.tree.unflatten(treedef, out), inputs.extra

    return update_masks


def drop_count(mask: jax.Array, fraction) -> jax.Array:
    """``floor(fraction * nnz)`` as int32."""
    nnz = topology.count_true(mask)
    return jnp.floor(jnp.asarray(fraction, jnp.float32) * nnz.astype(jnp.float32)).astype(
        jnp.int32
    )
