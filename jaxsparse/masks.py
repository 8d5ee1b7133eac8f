"""Pytree masks: which leaves are prunable, and creating, applying and checking masks.

A *mask tree* has the structure of the params. Each prunable leaf holds a ``bool`` array of
the leaf's shape (``True`` = active weight); each leaf that stays dense holds ``None``.
Every function here that walks a mask tree treats ``None`` as a leaf, so dense leaves never
break a tree map (the failure mode of masks whose ``None`` leaves vanish from the tree).

Leaves are named by *path strings*: the key path joined with ``/`` (``params/Dense_0/kernel``
for a linen params dict, ``layers/0/kernel`` for NNX state; NNX's trailing ``value`` is
dropped).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.bitmask import PackedMask

PyTree = Any
Masks = Any
# A prunable-leaf selector: a predicate ``(path, leaf) -> bool``, a regex matched against the
# path with ``re.search``, or a sequence of such regexes (any match selects the leaf).
Prunable = Union[Callable[[str, Any], bool], str, Sequence[str], None]

DEFAULT_PRUNABLE_NAMES = ("kernel", "weight", "w")
_WRAPPER_NAMES = ("value", "raw_value")


def is_none(x) -> bool:
    """``is_leaf`` predicate that keeps ``None`` mask leaves visible to tree maps."""
    return x is None


def is_mask_leaf(x) -> bool:
    """``is_leaf`` predicate for mask trees that may hold bit-packed masks: ``None`` and
    :class:`jaxsparse.bitmask.PackedMask` nodes are leaves."""
    return x is None or isinstance(x, PackedMask)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_to_str(path) -> str:
    """Turns a JAX key path into ``a/b/c``, dropping NNX's trailing ``value``."""
    names = [_key_name(k) for k in path]
    while len(names) > 1 and names[-1] in _WRAPPER_NAMES:
        names.pop()
    return "/".join(names)


def leaf_paths(tree: PyTree, is_leaf=None) -> list[str]:
    """Path strings of the leaves of ``tree`` in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [path_to_str(p) for p, _ in flat]


def leaf_dtype(leaf) -> np.dtype | None:
    """The dtype of an array-like leaf, ``None`` for a leaf that is not numeric."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None:
        return np.dtype(dtype)
    try:
        return np.result_type(leaf)
    except TypeError:
        return None


def is_floating(leaf) -> bool:
    """Whether ``leaf`` holds floating-point values (float16/32/64, bfloat16, float8, ...).

    Only such leaves are weights that can be pruned: a bool or integer leaf (a step counter,
    a quantized table, a mask) keeps its values whatever its name."""
    dtype = leaf_dtype(leaf)
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))


def default_prunable(path: str, leaf) -> bool:
    """Floating-point kernels of rank >= 2 (Dense, DenseGeneral, Conv): leaves named
    ``kernel``, ``weight`` or ``w``. Biases, norm scales, embeddings and bool or integer
    leaves stay dense."""
    name = path.rsplit("/", 1)[-1]
    return name in DEFAULT_PRUNABLE_NAMES and np.ndim(leaf) >= 2 and is_floating(leaf)


def compile_regex(pattern: str | re.Pattern, name: str) -> re.Pattern:
    """``re.compile(pattern)``; an invalid pattern raises ``ValueError`` naming the argument
    ``name`` it came from."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{name} pattern {pattern!r} is not a valid regex: {e}") from None


def _refuse_non_floating(select: Callable[[str, Any], bool]) -> Callable[[str, Any], bool]:
    """Wraps an explicit selector so that selecting a bool/integer leaf is an error, not a
    silent change of the leaf's values."""

    def predicate(path: str, leaf) -> bool:
        if not select(path, leaf):
            return False
        if not is_floating(leaf):
            raise TypeError(
                f"prunable selects leaf {path!r} of dtype {leaf_dtype(leaf)}, but only "
                f"floating-point leaves can be pruned; exclude it from prunable="
            )
        return True

    return predicate


def as_predicate(prunable: Prunable) -> Callable[[str, Any], bool]:
    """Normalises a :data:`Prunable` spec into a ``(path, leaf) -> bool`` predicate.

    ``None`` gives :func:`default_prunable`. A regex (or list of regexes) selects the leaves
    of rank >= 1 whose path it matches; a callable is used as is. An explicit selector that
    selects a bool or integer leaf raises ``TypeError`` naming the leaf.
    """
    if prunable is None:
        return default_prunable
    if isinstance(prunable, (str, re.Pattern)):
        prunable = [prunable]
    if callable(prunable):
        return _refuse_non_floating(prunable)
    if isinstance(prunable, Sequence) and all(isinstance(p, (str, re.Pattern))
                                              for p in prunable):
        patterns = [compile_regex(p, "prunable") for p in prunable]
        return _refuse_non_floating(
            lambda path, leaf: np.ndim(leaf) >= 1 and any(p.search(path) for p in patterns))
    raise TypeError(
        f"prunable must be a predicate (path, leaf) -> bool, a regex string or a list of "
        f"regexes; got {prunable!r}"
    )


def prunable_paths(params: PyTree, prunable: Prunable = None) -> list[str]:
    """The paths of the leaves of ``params`` that ``prunable`` selects."""
    pred = as_predicate(prunable)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [path_to_str(p) for p, leaf in flat if pred(path_to_str(p), leaf)]


def ones_masks(params: PyTree, prunable: Prunable = None) -> Masks:
    """All-active masks for the prunable leaves, ``None`` for the others."""
    pred = as_predicate(prunable)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones(jnp.shape(x), bool) if pred(path_to_str(p), x) else None, params
    )


def map_masked(fn: Callable, masks: Masks, *trees: PyTree, dense: Callable | None = None):
    """Maps ``fn(mask, *leaves)`` over prunable leaves.

    Dense leaves (``None`` mask) give ``dense(*leaves)`` when ``dense`` is given, else the
    leaf of the first tree (or ``None`` when there is no other tree).
    """

    m_leaves, treedef = jax.tree.flatten(masks, is_leaf=is_mask_leaf)
    others = [jax.tree.leaves(t, is_leaf=is_mask_leaf) for t in trees]
    for t in others:
        if len(t) != len(m_leaves):
            raise ValueError(
                f"masks have {len(m_leaves)} leaves but a tree mapped with them has {len(t)}; "
                "masks must have the structure of the params"
            )
    out = []
    for i, m in enumerate(m_leaves):
        leaves = [t[i] for t in others]
        if m is None:
            out.append(dense(*leaves) if dense is not None else (leaves[0] if leaves else None))
        else:
            out.append(fn(m, *leaves))
    return jax.tree.unflatten(treedef, out)


def mask_leaves(masks: Masks) -> list:
    """The leaves of a mask tree in flattening order, ``None`` included (a packed mask is
    one leaf)."""
    return jax.tree.leaves(masks, is_leaf=is_mask_leaf)


def validate_prunable_masks(masks: Masks, params: PyTree) -> None:
    """:func:`validate_masks`, and every masked leaf must be floating-point.

    Only floating-point leaves are pruned, so :func:`apply_masks` and :func:`sparse_init`
    never change a bool or integer leaf: a mask over one is refused.

    Raises:
      ValueError: as :func:`validate_masks`.
      TypeError: a mask covers a bool or integer parameter (the error names it).
    """
    validate_masks(masks, params)
    m_flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
    for (path, m), p in zip(m_flat, jax.tree.leaves(params), strict=True):
        if m is not None and not is_floating(p):
            raise TypeError(
                f"mask for {path_to_str(path)!r} covers a leaf of dtype {leaf_dtype(p)}; only "
                f"floating-point leaves can be masked: give this leaf a None mask"
            )


def apply_masks(params: PyTree, masks: Masks) -> PyTree:
    """Zeroes the inactive weights: ``where(mask, w, 0)`` on prunable leaves.

    Example:
        >>> params = jaxsparse.apply_masks(params, jaxsparse.get_masks(opt_state))
    """
    validate_prunable_masks(masks, params)
    return map_masked(lambda m, w: jnp.where(m, w, jnp.zeros((), w.dtype)), masks, params)


def sparse_init(params: PyTree, masks: Masks) -> PyTree:
    """Masks ``params`` and rescales each neuron's active weights by
    ``sqrt(dense fan-in / active fan-in)`` (sparsity-aware initialisation, Evci et al. 2022).

    A fan-in-scaled init (LeCun / He / Glorot) assumes every input is present; masking a
    neuron down to ``a`` of its ``F`` inputs shrinks the variance of its pre-activation by
    ``a / F``, and through several sparse layers without normalisation the signal (and the
    gradient) all but vanishes at high sparsity. Rescaling restores the dense variance per
    neuron. The neuron axis is the last one (Dense ``(in, out)``, Conv ``(h, w, in, out)``;
    for a ``DenseGeneral`` kernel ``(d, heads, head_dim)`` that pools the heads); a neuron
    without active inputs stays zero. Dense leaves (``None`` mask) are unchanged.

    Example:
      >>> state = tx.init(params)
      >>> params = jaxsparse.sparse_init(params, jaxsparse.get_masks(state))
    """
    validate_prunable_masks(masks, params)

    def rescale(m, w):
        if m.ndim == 0 or m.size == 0:
            return jnp.where(m, w, jnp.zeros((), w.dtype))
        fan_in = int(np.prod(m.shape[:-1])) if m.ndim > 1 else 1
        active = jnp.sum(m.reshape(-1, m.shape[-1]), axis=0, dtype=jnp.int32)
        scale = jnp.sqrt(fan_in / jnp.maximum(active, 1).astype(jnp.float32))
        scale = scale.reshape((1,) * (m.ndim - 1) + (m.shape[-1],))
        scaled = (w.astype(jnp.float32) * scale).astype(w.dtype)
        return jnp.where(m, scaled, jnp.zeros((), w.dtype))

    return map_masked(rescale, masks, params)


def validate_masks(masks: Masks, params: PyTree) -> None:
    """Raises naming the first leaf whose mask does not fit the params.

    Raises:
      ValueError: the trees differ in structure, a mask is not a bool array or its shape
        differs from the parameter's.
    """
    if masks is None or (hasattr(masks, "masks") and hasattr(masks, "inner_state")):
        raise ValueError(
            f"masks must be a mask tree with the structure of the params, got "
            f"{type(masks).__name__}; take it from the optimizer state with "
            f"jaxsparse.get_masks(opt_state)"
        )
    m_flat, m_def = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
    m_paths = [path_to_str(p) for p, _ in m_flat]
    p_paths = [path_to_str(p) for p, _ in p_flat]
    if m_paths != p_paths:
        missing = sorted(set(p_paths) - set(m_paths))
        extra = sorted(set(m_paths) - set(p_paths))
        raise ValueError(
            "masks and params have different tree structures: "
            f"params leaves without a mask entry: {missing[:5]}; mask entries without a "
            f"params leaf: {extra[:5]}"
        )
    for path, (_, m), (_, p) in zip(m_paths, m_flat, p_flat):
        if m is None:
            continue
        if not hasattr(m, "dtype") or m.dtype != jnp.bool_:
            raise ValueError(
                f"mask for {path!r} must be a bool array, got dtype "
                f"{getattr(m, 'dtype', type(m).__name__)}"
            )
        if tuple(m.shape) != tuple(np.shape(p)):
            raise ValueError(
                f"mask for {path!r} has shape {tuple(m.shape)} but the parameter has shape "
                f"{tuple(np.shape(p))}"
            )


def count_active(masks: Masks) -> dict[str, int]:
    """Number of active weights per prunable leaf (host ints)."""
    m_flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
    return {path_to_str(p): int(jnp.sum(m)) for p, m in m_flat if m is not None}


def count_nonzero(params: PyTree) -> dict[str, int]:
    """Number of nonzero entries per leaf of ``params`` (host ints)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {path_to_str(p): int(jnp.count_nonzero(x)) for p, x in flat}
