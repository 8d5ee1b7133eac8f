"""Pieces shared by the algorithm factories: initial masks and per-layer mapping."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import bitmask, topology
from jaxsparse.distributions import layer_budgets, layer_specs, resolve_overrides
from jaxsparse.layermap import map_layers, map_shapes
from jaxsparse.masks import Masks, Prunable, PyTree, is_mask_leaf, path_to_str
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


def draw_masks(params: PyTree, counts: Mapping[str, int], draw: Callable, key: jax.Array
               ) -> Masks:
    """Initial bool masks: for the ``j``-th leaf (in flattening order) whose path has a count
    below its size, ``draw(fold_in(key, j), shape, nnz)`` (``nnz`` traced); ``None``
    elsewhere.

    One compiled program (eager or under ``jit``) in which same-shaped leaves share one
    traced draw (:func:`jaxsparse.layermap.map_shapes`): a draw per leaf, unrolled, compiled
    a counting selection per layer (15 s at 96 layers of 256x256, 30-40 s eagerly, op by
    op). ``draw`` is a static argument: pass a module-level function (a new closure per
    call compiles again)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    sizes = [int(np.size(leaf)) for _, leaf in leaves]
    paths = [path_to_str(p) for p, _ in leaves]
    idx = [i for i, path in enumerate(paths) if path in counts and counts[path] < sizes[i]]
    shapes = tuple(tuple(np.shape(leaves[i][1])) for i in idx)
    bits = _draw_packed(draw, shapes, key, [np.int32(counts[paths[i]]) for i in idx])
    out: list = [None] * len(leaves)
    for i, b, shape in zip(idx, bits, shapes):
        out[i] = bitmask.unpack(bitmask.PackedMask(b, shape))
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _draw_packed(draw: Callable, shapes: tuple, key: jax.Array, counts: list) -> list:
    """The packed bits of :func:`draw_masks`' masks, one program for all of them."""
    return map_shapes(
        lambda shape, c: bitmask.pack(draw(jax.random.fold_in(key, c["j"]), shape,
                                           c["nnz"])).bits,
        list(shapes), [{"j": j, "nnz": n} for j, n in enumerate(counts)])


def random_init(
    sparsity: float, distribution: str, prunable: Prunable, overrides
) -> Callable[[PyTree, jax.Array], Masks]:
    """``init_masks`` drawing a uniformly random mask with the budgeted count per layer."""

    def init_masks(params, key):
        budgets = budgets_for(params, sparsity, distribution, prunable, overrides)
        return draw_masks(params, budgets, topology.random_mask, key)

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


def zero_after(after, dtype) -> jax.Array:
    """A zero of ``dtype`` read from ``after`` (any array, packed mask or tree of them) that
    XLA cannot fold away: a value that adds it is computed only once ``after`` is. XLA
    otherwise computes what does not depend on an earlier result as early as it can, and
    its temporaries live beside that result's (an optimization barrier does not order
    them: XLA drops a barrier's unused operand)."""
    first = jnp.ravel(jax.tree.leaves(after)[0])[0]
    return jnp.minimum(first.astype(bool).astype(jnp.int32), 0).astype(dtype)


class LayerInputs(NamedTuple):
    """What a per-layer update function sees (one prunable leaf).

    ``consts`` holds the layer's own values (a budget, a fan-in, a target), possibly
    traced; ``extra`` is the layer's leaf of the algorithm state when that state has the
    params' structure, else the whole state. ``read``, when given, evaluates
    ``f(inputs, *args)`` on the layer's own arrays (see :meth:`keys`).
    """

    mask: jax.Array
    weight: jax.Array
    grad: jax.Array
    key: jax.Array
    step: jax.Array
    extra: object
    consts: object = None
    read: Callable | None = None

    def keys(self, score: Callable, where=None, *, after=None) -> jax.Array:
        """The selection keys (:func:`jaxsparse.topology.candidate_keys`) of
        ``score(inputs)`` among ``where``, for :func:`jaxsparse.topology.top_k_keys`.

        Under :func:`layerwise` the score is computed where the layer's arrays live, so a
        selection by |grad| costs the 4-byte keys, not a copy of the weight and gradient
        of the layer (``jnp.abs(x.grad)`` would copy the gradient first).

        With ``where``, the score is computed from the layer's arrays tied to ``where`` by
        an optimization barrier: two selections by one score (SRigL ranks |W| among the
        active weights, then among the kept ones) would otherwise share one computation of
        the score's keys, which XLA keeps alive from the first selection to the second
        (4 bytes per weight).

        ``where`` may be packed (:class:`~jaxsparse.bitmask.PackedMask`: unpacked where the
        keys are computed); a bool ``where`` is packed before it enters the layer's reading
        branch. With ``after`` (any array or packed mask), the keys are computed only once ``after`` is: XLA
        otherwise computes keys that do not depend on an earlier selection's result as early
        as it can, and two key arrays live at once (SRigL: the |grad| keys of its saliency
        beside the |W| keys of its first selection; 4 bytes per weight more at the peak).
        An optimization barrier does not order them: XLA drops a barrier's unused operand."""
        def f(x, where, after):
            if where is not None:
                (mask, weight, grad), where = jax.lax.optimization_barrier(
                    ((x.mask, x.weight, x.grad), where))
                x = x._replace(mask=mask, weight=weight, grad=grad)
            if isinstance(where, bitmask.PackedMask):
                where = bitmask.unpack(where)
            keys = topology.candidate_keys(score(x), where)
            if after is not None:
                keys = keys + zero_after(after, jnp.uint32)  # the keys wait for ``after``
            return keys

        if self.read is None:
            return f(self, where, after)
        # Handed to the branch that reads the layer, a bool mask would be stored (1 byte
        # per weight): it goes packed.
        return self.read(f, bitmask.pack_tree(where), after)


def sparse_leaves(inputs: UpdateInputs):
    """``(indices, paths, treedef, leaves)`` of an update: the flat positions and path
    strings of the masked leaves, the mask tree's structure, and per masked leaf a
    ``(packed mask, weight, gradient)`` tuple."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(inputs.masks, is_leaf=is_mask_leaf)
    p_leaves, g_leaves = jax.tree.leaves(inputs.params), jax.tree.leaves(inputs.grads)
    idx = [i for i, (_, m) in enumerate(flat) if m is not None]
    paths = [path_to_str(flat[i][0]) for i in idx]
    leaves = [(flat[i][1], p_leaves[i], g_leaves[i]) for i in idx]
    return idx, paths, treedef, leaves


def rebuild(treedef, n_leaves: int, idx: list, new: list) -> Masks:
    """The mask tree with ``new[j]`` at flat position ``idx[j]`` and ``None`` elsewhere."""
    out = [None] * n_leaves
    for i, m in zip(idx, new):
        out[i] = m
    return jax.tree.unflatten(treedef, out)


def layerwise(
    fn: Callable[[LayerInputs], jax.Array],
    consts: Callable[[UpdateInputs, list[str]], list] | None = None,
) -> Callable[[UpdateInputs], Masks]:
    """Lifts a per-layer rule ``LayerInputs -> new mask`` (bool, or packed: a
    :class:`~jaxsparse.bitmask.PackedMask`) to a whole-model ``update_masks`` (see
    :func:`map_layers`: same-shaped layers share one compiled rule, one layer's temporaries
    live at a time).

    Layer ``j`` (counting masked leaves in flattening order) gets ``fold_in(key, j)``;
    ``extra`` is passed per leaf when it is a tree with the params' structure, else whole;
    ``consts(inputs, paths)`` gives each masked layer its own values (by path).

    Example (SET in four lines):
      >>> def set_layer(x):
      ...     n = drop_count(x.mask, 0.3)
      ...     kept = drop_lowest(x.mask, jnp.abs(x.weight), n, tie_key=x.key)
      ...     return grow_highest(kept, random_scores(x.key, x.mask.shape), n)
      >>> update_masks = layerwise(set_layer)
    """

    def update_masks(inputs: UpdateInputs):
        idx, paths, treedef, leaves = sparse_leaves(inputs)
        try:
            e_all = treedef.flatten_up_to(inputs.extra)
            per_leaf = True
        except (ValueError, TypeError):
            per_leaf = False
        layers = [(m, w, g, e_all[i] if per_leaf else None)
                  for (m, w, g), i in zip(leaves, idx)]
        cs = consts(inputs, paths) if consts is not None else [None] * len(idx)
        cs = [{"index": j, "c": c} for j, c in enumerate(cs)]

        def one(read, c):
            key = jax.random.fold_in(inputs.key, c["index"])

            def view(layer):
                m, w, g, e = layer
                return LayerInputs(bitmask.unpack(m), w, g, key, inputs.step,
                                   e if per_leaf else inputs.extra, c["c"])

            # Each field is its own read (one the rule does not use is never computed).
            x = LayerInputs(bitmask.unpack(read(lambda layer: layer[0])),
                            read(lambda layer: layer[1]), read(lambda layer: layer[2]), key,
                            inputs.step, read(lambda layer: layer[3]) if per_leaf
                            else inputs.extra, c["c"],
                            lambda f, *args: read(lambda layer, *a: f(view(layer), *a), *args))
            return bitmask.pack_tree(fn(x))

        return rebuild(treedef, treedef.num_leaves, idx,
                       map_layers(one, layers, cs, read=True))

    return update_masks


def drop_count(mask: jax.Array, fraction) -> jax.Array:
    """``floor(fraction * nnz)`` as int32."""
    nnz = topology.count_true(mask)
    return jnp.floor(jnp.asarray(fraction, jnp.float32) * nnz.astype(jnp.float32)).astype(
        jnp.int32
    )
