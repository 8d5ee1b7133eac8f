"""Freezing weights by mask: an optax transformation that zeroes the updates of frozen entries.

Continual-learning methods that reserve a sparse subnetwork per task (PackNet, Mallya &
Lazebnik 2018; SpaceNet, Sokar et al. 2021, Neural Networks 140) train each new task only on
the weights earlier tasks left free. :func:`freeze` does the "only" part for any optax
optimizer: put it *last* in an ``optax.chain``, so that momentum, Adam moments and weight decay
of the inner optimizer cannot move a frozen weight either (a zero *gradient* alone would not
stop Adam's momentum from moving it).

The frozen masks live in the transformation's state (``FreezeState.frozen``), not in a closure,
so a training loop can freeze more weights between tasks without rebuilding or recompiling
the optimizer: :func:`set_frozen` swaps them inside any (nested) optimizer state.

Frozen-mask trees follow :mod:`jaxsparse.masks`: the structure of the params, ``bool`` leaves
(``True`` = frozen), ``None`` for leaves that are never frozen.

Example:
  >>> tx = optax.chain(optax.adam(1e-3), jaxsparse.freeze.freeze())
  >>> state = tx.init(params)                      # nothing frozen yet
  >>> ...                                          # train task 1
  >>> state = jaxsparse.freeze.set_frozen(state, frozen)  # task 1's weights stay as they are
  >>> ...                                          # train task 2: frozen entries never move
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsparse.masks import Masks, PyTree, is_none, leaf_paths, validate_masks


class FreezeState(NamedTuple):
    """State of :func:`freeze`.

    Attributes:
      frozen: bool mask tree (``True`` = frozen) with the params' structure; ``None`` leaves
        are never frozen.
    """

    frozen: Masks


def no_frozen(params: PyTree) -> Masks:
    """A frozen-mask tree that freezes nothing (all-``False`` leaves of the params' shapes)."""
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.bool_), params)


def _as_bool(frozen: Masks) -> Masks:
    return jax.tree.map(lambda m: None if m is None else jnp.asarray(m, jnp.bool_), frozen,
                        is_leaf=is_none)


def _check(frozen: Masks, params: PyTree, where: str) -> None:
    try:
        validate_masks(frozen, params)
    except ValueError as e:
        raise ValueError(f"{where}: frozen masks do not fit the params: {e}") from e


def freeze(frozen: Masks | None = None) -> optax.GradientTransformationExtraArgs:
    """Zeroes the updates of frozen entries: ``updates = where(frozen, 0, updates)``.

    Args:
      frozen: initial frozen masks (bool leaves, ``None`` for never-frozen leaves) with the
        params' structure; default: nothing frozen (all-``False`` leaves, so that
        :func:`set_frozen` can later freeze entries of any leaf without changing the state's
        structure).

    Returns:
      An optax transformation; chain it *after* the inner optimizer.

    Raises:
      ValueError: at ``init``, when ``frozen`` does not fit the params (names the leaf).
    """

    def init_fn(params):
        if not jax.tree.leaves(params):
            # optax.tree.map_params (the sparse wrappers reset moments through it) calls init
            # with a leafless placeholder to find the param-shaped state leaves. One leaf here
            # is a prefix of any mask tree, so map_params leaves the frozen masks alone: they
            # are not moments, and a regrown weight stays frozen if it was.
            return FreezeState(jnp.zeros((), jnp.bool_))
        if frozen is None:
            return FreezeState(no_frozen(params))
        _check(frozen, params, "freeze")
        return FreezeState(_as_bool(frozen))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        m_leaves, _ = jax.tree.flatten(state.frozen, is_leaf=is_none)
        u_leaves, treedef = jax.tree.flatten(updates)
        if len(m_leaves) != len(u_leaves):
            raise ValueError(f"freeze: {len(m_leaves)} frozen-mask leaves for "
                             f"{len(u_leaves)} update leaves")
        out = [u if m is None else jnp.where(m, jnp.zeros((), u.dtype), u)
               for m, u in zip(m_leaves, u_leaves)]
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find(opt_state, where: str) -> Masks:
    found = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "frozen")
             if getattr(path[-1], "tuple_name", None) == FreezeState.__name__]
    if len(found) != 1:
        raise ValueError(
            f"{where}: opt_state must hold exactly one FreezeState (optax.chain(..., "
            f"jaxsparse.freeze.freeze())), found {len(found)}")
    return found[0]


def get_frozen(opt_state) -> Masks:
    """The frozen masks of the (single) :class:`FreezeState` inside ``opt_state``."""
    return _find(opt_state, "get_frozen")


def set_frozen(opt_state, frozen: Masks):
    """Returns ``opt_state`` with the frozen masks of its (single) :class:`FreezeState`
    replaced by ``frozen``.

    Works on any nesting of optax states (``chain``, the jaxsparse wrappers'
    ``inner_state``, ``inject_hyperparams``) through ``optax.tree_utils``. The new masks must
    have the structure, shapes and ``None`` leaves of the current ones (so the optimizer does
    not recompile).

    Raises:
      ValueError: when ``opt_state`` holds no or several :class:`FreezeState`, or when
        ``frozen`` does not match the current masks (names the leaf).
    """
    current = _find(opt_state, "set_frozen")
    cur_flat = jax.tree.leaves(current, is_leaf=is_none)
    new_flat = jax.tree.leaves(frozen, is_leaf=is_none)
    names = leaf_paths(current, is_leaf=is_none)
    if jax.tree.structure(current, is_leaf=is_none) != jax.tree.structure(frozen,
                                                                          is_leaf=is_none):
        raise ValueError("set_frozen: frozen masks have a different tree structure than the "
                         "optimizer's (build them from the same params)")
    for name, old, new in zip(names, cur_flat, new_flat):
        if (old is None) != (new is None):
            raise ValueError(f"set_frozen: leaf {name!r} is "
                             f"{'None' if old is None else 'a mask'} in the optimizer state "
                             f"but {'None' if new is None else 'a mask'} in frozen")
        if old is not None and jnp.shape(old) != jnp.shape(new):
            raise ValueError(f"set_frozen: leaf {name!r} has shape {jnp.shape(new)}, the "
                             f"optimizer's frozen mask has {jnp.shape(old)}")
    return optax.tree_utils.tree_set(opt_state, frozen=_as_bool(frozen))


def frozen_fraction(frozen: Masks) -> jax.Array:
    """Fraction of entries frozen over the masked leaves."""
    leaves = [m for m in jax.tree.leaves(frozen, is_leaf=is_none) if m is not None]
    total = sum(m.size for m in leaves)
    count = sum(jnp.sum(m, dtype=jnp.int32) for m in leaves)
    return jnp.asarray(count, jnp.float32) / float(max(total, 1))
