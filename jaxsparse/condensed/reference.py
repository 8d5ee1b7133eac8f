"""Pure-jnp reference for condensed inference: the source of truth for every kernel.

A condensed layer keeps, for each of its ``n_active`` active output neurons ``i``, the ``k``
input positions ``indices[i, :]`` its weights read and their ``values[i, :]``:

    y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]

(Lasby et al. 2024, "Dynamic Sparse Training with Structured Sparsity", section on condensed
inference.) In the *group-shared* layout, ``G`` consecutive neurons share one index list:
``indices`` is ``[n_active // G, k]`` and neuron ``i`` reads ``indices[i // G]``, so one
gather of ``k`` inputs feeds ``G`` dot products (a ``[G, k] @ [k, batch]`` matmul per group:
the shape tensor cores and the MXU want). Products accumulate in float32 and the result is
cast back to ``x.dtype``.

Index ranges are checked before the gather (:mod:`jaxsparse.condensed.checks`): a concrete
out-of-range index raises, a traced one turns its neuron's outputs into NaN. Never a clamp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.condensed.checks import check_operands, guarded


def _row(bias: jax.Array, ndim: int) -> jax.Array:
    """``bias`` as float32 with leading unit axes (explicit broadcasting, rank-strict safe)."""
    return bias.astype(jnp.float32).reshape((1,) * (ndim - 1) + bias.shape)


def _matmul(x, values, indices, bias, group_size: int):
    # Indices are in range here (checked or clamped by ``guarded``).
    gathered = jnp.take(x, indices.astype(jnp.int32), axis=-1, mode="clip")  # [..., g, k]
    if group_size == 1:
        y = jnp.einsum("...ak,ak->...a", gathered, values, preferred_element_type=jnp.float32)
    else:
        n_groups, k = indices.shape
        v = values.reshape(n_groups, group_size, k)
        y = jnp.einsum("...gk,gnk->...gn", gathered, v, preferred_element_type=jnp.float32)
        y = y.reshape(*y.shape[:-2], n_groups * group_size)
    if bias is not None:
        y = y + _row(bias, y.ndim)
    return y.astype(x.dtype)


def condensed_matmul_reference(
    x: jax.Array, values: jax.Array, indices: jax.Array, bias: jax.Array | None = None,
    *, group_size: int = 1,
) -> jax.Array:
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i // G, j]] + bias[i]``.

    Args:
        x: ``[..., n_in]`` inputs (float32, bfloat16 or float16).
        values: ``[n_active, k]`` weights, same dtype as ``x``.
        indices: ``[n_active // group_size, k]`` int8/int16/int32 positions in ``[0, n_in)``.
        bias: optional ``[n_active]``.
        group_size: ``G``, neurons sharing one index list (1: one list per neuron).

    Returns:
        ``[..., n_active]`` in ``x.dtype``.

    Raises:
        ValueError / TypeError: bad shapes or dtypes; a concrete index outside ``[0, n_in)``.

    Example:
        >>> y = condensed_matmul_reference(x, layer.values, layer.indices, layer.bias)
    """
    check_operands(x, values, indices, bias, group_size=group_size,
                   name="condensed_matmul_reference")

    def kernel(x, values, indices, bias):
        return _matmul(x, values, indices, bias, group_size)

    return guarded(kernel, x, values, indices, bias, group_size=group_size,
                   name="condensed_matmul_reference")


def structured_matmul_reference(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None
) -> jax.Array:
    """The structured-only form: a smaller dense matmul ``x @ kernel + bias`` (fp32 accumulate)."""
    y = jnp.matmul(x, kernel, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + _row(bias, y.ndim)
    return y.astype(x.dtype)
