"""Mapping a per-layer function over a model's layers, grouped by shape.

A function applied to every layer of a deep model in a Python loop is traced, and compiled,
once per layer. :func:`map_layers` traces it once per distinct layer shape and runs the
layers of a shape in a ``lax.fori_loop``, one after another, so both the compile time and
the temporaries stay those of one layer per shape.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)


def _after(done, tree):
    """``tree``, not available before ``done`` is computed (an optimization barrier), so
    XLA runs the layers one after another and their temporaries do not all live at once."""
    if not jax.tree.leaves(done):
        return tree
    return jax.lax.optimization_barrier((done, tree))[1]


def map_groups(fn: Callable, layers: list, consts: list | None = None) -> list[tuple]:
    """:func:`map_layers` without splitting the results: ``[(members, stacked)]`` per group of
    same-shaped layers, ``members`` the group's positions in ``layers`` and ``stacked`` the
    outputs of ``fn`` stacked along a new leading axis in the order of ``members``.

    For results that are combined across layers anyway (a total count, a check over all
    layers): reducing the stacked outputs avoids one slice per layer, and every slice at
    its own offset is a distinct compiled kernel.
    """
    consts = [None] * len(layers) if consts is None else list(consts)
    consts = [jax.tree.map(jnp.asarray, c) for c in consts]
    groups: dict = {}
    for i, (layer, c) in enumerate(zip(layers, consts)):
        groups.setdefault((_signature(layer), _signature(c)), []).append(i)
    out: list = []
    done = ()
    for members in groups.values():
        if len(members) == 1:
            i = members[0]
            result = fn(_after(done, layers[i]), consts[i])
            out.append((members, jax.tree.map(lambda a: a[None], result)))
            done = result
            continue
        group_layers = _after(done, [layers[i] for i in members])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[consts[i] for i in members])
        shapes = jax.eval_shape(fn, group_layers[0], consts[members[0]])
        n = len(members)
        init = jax.tree.map(lambda s, n=n: jnp.zeros((n, *s.shape), s.dtype), shapes)

        def body(j, acc, group_layers=group_layers, stacked=stacked):
            layer = jax.lax.switch(j, [lambda x=x: x for x in group_layers])
            result = fn(layer, jax.tree.map(lambda a: a[j], stacked))
            return jax.tree.map(lambda a, r: a.at[j].set(r), acc, result)

        acc = jax.lax.fori_loop(0, n, body, init)
        out.append((members, acc))
        done = acc
    return out


def map_layers(fn: Callable, layers: list, consts: list | None = None) -> list:
    """``[fn(layer, c) for layer, c in zip(layers, consts)]``, one layer at a time.

    Layers whose arrays (and consts) have the same shapes and dtypes share one traced ``fn``:
    a ``lax.fori_loop`` over them picks the layer with ``lax.switch`` and writes ``fn``'s
    output into a stacked result, so the compiled graph grows with the number of distinct
    layer shapes, not with depth, and only one layer's temporaries are alive at a time
    (the rest of the model is only read). Outputs should be small next to the inputs (a
    packed mask, scalars): they are stacked per group (:func:`map_groups` returns them
    stacked).

    Args:
      fn: ``(layer, consts) -> pytree`` for one layer.
      layers: one pytree of arrays per layer (e.g. mask, weight, gradient).
      consts: one pytree of scalars per layer (traced ok), or ``None``.

    Returns:
      The list of outputs, in the order of ``layers``.
    """
    return split_groups(map_groups(fn, layers, consts), len(layers))


def split_groups(groups: list[tuple], n: int) -> list:
    """The per-layer results, in layer order, of :func:`map_groups`' ``groups`` over ``n``
    layers (a slice of its group's stack each)."""
    out: list = [None] * n
    for members, stacked in groups:
        for j, i in enumerate(members):
            out[i] = jax.tree.map(lambda a, j=j: a[j], stacked)
    return out
