"""Mapping a per-layer function over a model's layers, grouped by shape.

A function applied to every layer of a deep model in a Python loop is traced, and compiled,
once per layer. :func:`map_layers` traces it once per distinct layer shape and runs the
layers of a shape in a ``lax.fori_loop``, one after another, so both the compile time and
the temporaries stay those of one layer per shape.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.extend
import jax.numpy as jnp

# Layers of at least this many entries (in their largest array) are read in place by
# ``map_groups(..., read=True)``; smaller ones are copied out of their group once. Reading in
# place saves a copy of the layer and its bytes, but compiles the reading kernel once per
# layer of the group (~10 ms each on XLA:CPU); a copy of 2**18 floats takes ~0.1 ms.
READ_IN_PLACE_MIN_SIZE = 1 << 18


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)


def _after(done, tree):
    """``tree``, not available before ``done`` is computed (an optimization barrier), so
    XLA runs the layers one after another and their temporaries do not all live at once."""
    if not jax.tree.leaves(done):
        return tree
    return jax.lax.optimization_barrier((done, tree))[1]


def _traced_once(f: Callable, *args) -> tuple[Callable, object]:
    """``(replay, shapes)``: ``f`` traced once for ``args`` (shapes), ``replay`` a function
    that evaluates that trace (what ``f`` computes, without running its Python again) and
    ``shapes`` its output's shapes. Arrays ``f`` closes over stay closed over."""
    closed, shapes = jax.make_jaxpr(f, return_shape=True)(*args)
    tree, run = jax.tree.structure(shapes), jax.extend.core.jaxpr_as_fun(closed)
    return (lambda *a: jax.tree.unflatten(tree, run(*jax.tree.leaves(a)))), shapes


def map_groups(fn: Callable, layers: list, consts: list | None = None, *,
               read: bool = False, stack: bool = True) -> list[tuple]:
    """:func:`map_layers` without splitting the results: ``[(members, stacked)]`` per group of
    same-shaped layers, ``members`` the group's positions in ``layers`` and ``stacked`` the
    outputs of ``fn`` stacked along a new leading axis in the order of ``members``.

    For results that are combined across layers anyway (a total count, a check over all
    layers): reducing the stacked outputs avoids one slice per layer, and every slice at
    its own offset is a distinct compiled kernel.

    With ``read=True``, ``fn(read, consts)`` gets, instead of the layer, a function
    ``read(f, *args) -> f(layer, *args)`` that evaluates ``f`` on the layer's own arrays
    (in each branch of the ``lax.switch`` that picks the layer): only ``f``'s output is
    materialized, where a switch returning the layer copies its arrays. A score computed
    from a weight and a gradient then costs the score's bytes, not a copy of both. Groups
    of layers smaller than :data:`READ_IN_PLACE_MIN_SIZE` are copied once per layer and
    read from the copy (same results, fewer kernels to compile).

    With ``stack=False``, ``stacked`` is instead the list of the members' own outputs
    (what :func:`map_layers` returns): each is a buffer of its own carried through the
    loops of :func:`_rotating_loop`, so no stack of the whole group's outputs is ever
    materialized (a stack would then be sliced once per layer: a compiled kernel per
    layer, and a second copy of the outputs).
    """
    consts = [None] * len(layers) if consts is None else list(consts)
    consts = [jax.tree.map(jnp.asarray, c) for c in consts]
    groups: dict = {}
    for i, (layer, c) in enumerate(zip(layers, consts)):
        groups.setdefault((_signature(layer), _signature(c)), []).append(i)

    def direct(layer):
        return (lambda f, *args: f(layer, *args)) if read else layer

    out: list = []
    done = ()
    for members in groups.values():
        if len(members) == 1:
            i = members[0]
            result = fn(direct(_after(done, layers[i])), consts[i])
            out.append((members, jax.tree.map(lambda a: a[None], result) if stack
                         else [result]))
            done = result
            continue
        group_layers = _after(done, [layers[i] for i in members])
        # Each read in place is a kernel per layer of the group to compile; a small layer
        # is copied once instead (one copy kernel, and few bytes to copy).
        in_place = max((x.size for x in jax.tree.leaves(group_layers[0])), default=0) >= (
            READ_IN_PLACE_MIN_SIZE)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[consts[i] for i in members])
        n = len(members)

        def turn(j, group_layers=group_layers, stacked=stacked, in_place=in_place):
            def switch(f, *args):
                return jax.lax.switch(j, [lambda *a, x=x: f(x, *a) for x in group_layers],
                                      *args)

            if read and in_place:
                layer = switch
            else:
                copied = switch(lambda x: x)
                layer = (lambda f, *args: f(copied, *args)) if read else copied
            return fn(layer, jax.tree.map(lambda a: a[j], stacked))

        # The loops need the output shapes before they trace their body: ``turn`` is traced
        # once, and the loops replay that trace (tracing ``fn`` again for its shapes alone
        # was a third of a selection's tracing time).
        turn, shapes = _traced_once(turn, jax.ShapeDtypeStruct((), jnp.int32))
        if stack:
            init = jax.tree.map(lambda s, n=n: jnp.zeros((n, *s.shape), s.dtype), shapes)
            acc = jax.lax.fori_loop(
                0, n, lambda j, acc, turn=turn: jax.tree.map(
                    lambda a, r: a.at[j].set(r), acc, turn(j)), init)
        else:
            acc = _rotating_loop(turn, n, shapes)
        out.append((members, acc))
        done = acc
    return out


def loop_shape(n: int) -> tuple[int, int]:
    """``(outer, inner)``: the turns of the two nested loops :func:`_rotating_loop` runs
    for ``n`` layers, with ``outer * inner >= n`` and the fewest buffer moves (each of the
    ``outer * inner`` inner turns moves ``inner`` buffers, each outer turn ``outer * inner``),
    then the least padding, then the fewest outer turns. One loop, ``(1, n)``, up to 5
    layers; 21 layers: ``(3, 7)``, 210 moves instead of 21**2 = 441; 96 layers: ``(8, 12)``,
    1,920 instead of 9,216."""

    def cost(outer, inner):
        moves = outer * inner * inner + (outer * outer * inner if outer > 1 else 0)
        return moves, outer * inner - n, outer

    return min(((-(-n // inner), inner) for inner in range(1, n + 1)),
               key=lambda shape: cost(*shape))


def _rotating_loop(turn: Callable, n: int, shapes) -> list:
    """``[turn(j) for j in range(n)]`` in loops that trace ``turn`` once, each output a
    buffer of its own (no stack of them all, which would be sliced once per layer: a
    compiled kernel per slice, and a second copy of the outputs).

    A loop writes its turn's output to the back of its list of buffers and drops the front:
    after ``m`` turns the list holds the ``m`` outputs in order, each written once, and the
    loop body is the same for every turn (a write at the turn's own position would be one
    compiled kernel per position). Every turn moves all of the list's buffers, so one loop
    over ``n`` layers moves ``n**2``; an outer loop over ``outer`` chunks of ``inner``
    layers (:func:`loop_shape`) moves about ``2 n**1.5``, and holds about ``inner`` more
    output buffers while it runs (the inner loop's). Padding turns past ``n`` (when ``n``
    has no good factors) output zeros under a ``lax.cond``.
    """
    outer, inner = loop_shape(n)

    def zeros():
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def chunk(c, stale):
        # The inner loop starts from ``stale``, the outer loop's oldest chunk: every one of
        # its values is overwritten (no fresh zeros per outer turn).
        def body(i, acc):
            j = c * inner + i
            out = (turn(j) if outer * inner == n else
                   jax.lax.cond(j < n, turn, lambda _: zeros(), j))
            return [*acc[1:], out]

        return jax.lax.fori_loop(0, inner, body, stale)

    init = [[zeros() for _ in range(inner)] for _ in range(outer)]
    if outer == 1:
        return chunk(0, init[0])
    chunks = jax.lax.fori_loop(0, outer, lambda c, acc: [*acc[1:], chunk(c, acc[0])], init)
    return [out for ch in chunks for out in ch][:n]


def map_layers(fn: Callable, layers: list, consts: list | None = None, *,
               read: bool = False) -> list:
    """``[fn(layer, c) for layer, c in zip(layers, consts)]``, one layer at a time.

    Layers whose arrays (and consts) have the same shapes and dtypes share one traced ``fn``:
    a ``lax.fori_loop`` over them picks the layer with ``lax.switch`` and carries one
    output buffer per layer (see :func:`_rotating_loop`), so the traced ``fn`` is compiled
    once per distinct layer shape, not per layer, only one layer's temporaries are alive at
    a time (the rest of the model is only read), and no stack of the group's outputs is
    materialized. Outputs should be small next to the inputs (a packed mask, scalars): the
    loops move output buffers, about ``2 n**1.5`` output-sized copies per group of ``n``
    layers (:func:`loop_shape`).

    Args:
      fn: ``(layer, consts) -> pytree`` for one layer.
      layers: one pytree of arrays per layer (e.g. mask, weight, gradient).
      consts: one pytree of scalars per layer (traced ok), or ``None``.
      read: pass ``fn`` a reader of the layer instead of the layer (see
        :func:`map_groups`).

    Returns:
      The list of outputs, in the order of ``layers``.
    """
    out: list = [None] * len(layers)
    for members, results in map_groups(fn, layers, consts, read=read, stack=False):
        for i, r in zip(members, results):
            out[i] = r
    return out


def map_shapes(fn: Callable, shapes: list[tuple[int, ...]], consts: list | None = None
               ) -> list:
    """``[fn(shape, c) for shape, c in zip(shapes, consts)]`` for functions of a layer's
    shape alone (e.g. drawing an initial mask): as :func:`map_layers`, layers of one shape
    (and const signature) share one traced ``fn``. A zero-size array stands for each
    shape, so nothing is read or copied."""
    tokens = [jnp.zeros((0, *shape), jnp.bool_) for shape in shapes]
    return map_layers(lambda token, c: fn(token.shape[1:], c), tokens, consts)
