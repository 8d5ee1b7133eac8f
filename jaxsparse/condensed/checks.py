"""Operand checks shared by every condensed entry point (reference, XLA, C++, Pallas).

Gathers clamp: an XLA gather, Pallas interpret mode and ``jnp.take(mode="clip")`` all turn
an out-of-range index into a read of the first or last input, a silently wrong answer. So
every public entry point checks its operands *before* any gather:

* shapes and dtypes are static and always checked (:func:`check_operands`);
* index ranges are checked on the host when the indices are concrete (the usual case: a
  layer closed over by a jitted function, or an eager call), raising a ``ValueError`` that
  names the offending entry (:func:`check_index_range`);
* when the indices are traced (a layer passed *into* ``jit``) their values are unknown at
  trace time: kernels then read through clamped indices (no out-of-bounds read on any
  device) and :func:`poison_rows` sets every output of a neuron with an out-of-range index
  to NaN, so a bad index can never produce a plausible number. The C++ CPU kernel instead
  fails the call with an error naming the index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INDEX_DTYPES = (jnp.int8, jnp.int16, jnp.int32)
VALUE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def is_traced(x) -> bool:
    """Whether ``x`` is a tracer (its values are unknown at trace time)."""
    return isinstance(x, jax.core.Tracer)


def check_operands(x, values, indices, bias, *, group_size: int = 1,
                   name: str = "condensed_matmul") -> None:
    """Static shape/dtype checks of ``(x, values, indices, bias)``; raises on bad input.

    Args:
        x: ``[..., n_in]`` inputs.
        values: ``[n_active, k]`` weights, the dtype of ``x``.
        indices: ``[n_active // group_size, k]`` int8/int16/int32 input positions.
        bias: ``[n_active]`` or ``None``.
        group_size: output neurons sharing one index list (1: every neuron has its own).
        name: what the messages call the operation.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{name}: group_size must be a positive int, got {group_size!r}")
    if values.ndim != 2 or indices.ndim != 2:
        raise ValueError(
            f"{name}: values {tuple(values.shape)} and indices {tuple(indices.shape)} must "
            "both be [n_active, k]" + (" / [n_active // group_size, k]" if group_size > 1
                                       else "")
        )
    n_active, k = values.shape
    if n_active % group_size:
        raise ValueError(
            f"{name}: group_size={group_size} does not divide n_active={n_active}"
        )
    want = (n_active // group_size, k)
    if tuple(indices.shape) != want:
        shape = "[n_active, k]" if group_size == 1 else "[n_active // group_size, k]"
        raise ValueError(
            f"{name}: values {tuple(values.shape)} and indices {tuple(indices.shape)} must "
            f"both be [n_active, k]; indices must be {shape} = {want}"
        )
    if bias is not None and tuple(bias.shape) != (n_active,):
        raise ValueError(f"{name}: bias shape {tuple(bias.shape)} must be ({n_active},)")
    if x.ndim < 1:
        raise ValueError(f"{name}: x must have a trailing n_in axis, got a scalar")
    if x.dtype not in VALUE_DTYPES:
        raise TypeError(f"{name}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dtype != values.dtype or (bias is not None and bias.dtype != values.dtype):
        raise TypeError(
            f"{name}: x ({x.dtype}), values ({values.dtype}) and bias "
            f"({None if bias is None else bias.dtype}) must share one dtype"
        )
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: indices must be int8, int16 or int32, got {indices.dtype}")


def first_out_of_range(indices, n: int) -> tuple[tuple[int, ...], int] | None:
    """``(position, value)`` of the first entry of host ``indices`` outside ``[0, n)``."""
    a = np.asarray(indices)
    bad = (a < 0) | (a >= n)
    if not bad.any():
        return None
    pos = tuple(int(p) for p in np.argwhere(bad)[0])
    return pos, int(a[pos])


def check_index_range(indices, n: int, *, what: str = "indices", bound: str = "n_in",
                      name: str = "condensed_matmul") -> bool:
    """Raises ``ValueError`` if concrete ``indices`` has an entry outside ``[0, n)``.

    Returns ``True`` when the check ran (concrete indices), ``False`` for traced indices,
    which callers must then guard with :func:`clamp` and :func:`poison_rows`.
    """
    if is_traced(indices):
        return False
    found = first_out_of_range(indices, n)
    if found is not None:
        pos, val = found
        raise ValueError(
            f"{name}: {what}[{', '.join(map(str, pos))}] = {val} is out of range "
            f"[0, {bound}={n}); an index outside the input would be clamped by the gather "
            "and give a silently wrong result"
        )
    return True


def bad_rows(indices, n: int) -> jax.Array:
    """``bool[rows]``: which rows of (traced) ``indices`` hold an entry outside ``[0, n)``."""
    i = indices.astype(jnp.int32)
    return jnp.any((i < 0) | (i >= n), axis=-1)


def clamp(indices, n: int) -> jax.Array:
    """Indices clipped into ``[0, n)`` (so no kernel reads out of bounds), same dtype."""
    return jnp.clip(indices.astype(jnp.int32), 0, max(n - 1, 0)).astype(indices.dtype)


def poison_rows(y: jax.Array, bad: jax.Array, group_size: int = 1) -> jax.Array:
    """Sets ``y[..., i]`` to NaN for every neuron ``i`` whose index list is ``bad``."""
    per_neuron = jnp.repeat(bad, group_size) if group_size > 1 else bad
    nan = jnp.full((), jnp.nan, y.dtype)
    return jnp.where(per_neuron.reshape((1,) * (y.ndim - 1) + per_neuron.shape), nan, y)


def guarded(kernel, x, values, indices, bias, *, group_size: int = 1,
            name: str = "condensed_matmul"):
    """Runs ``kernel(x, values, indices, bias)`` with the index-range guarantee.

    Concrete indices are range-checked on the host (error on a bad entry); traced ones are
    clamped for the kernel and the affected neurons' outputs set to NaN.
    """
    n_in = x.shape[-1]
    if check_index_range(indices, n_in, name=name):
        return kernel(x, values, indices, bias)
    bad = bad_rows(indices, n_in)
    y = kernel(x, values, clamp(indices, n_in), bias)
    return poison_rows(y, bad, group_size)
