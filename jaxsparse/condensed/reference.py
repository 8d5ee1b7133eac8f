"""Pure-jnp reference for condensed inference: the source of truth for every kernel.

A condensed layer keeps, for each of its ``n_active`` active output neurons ``i``, the ``k``
input positions ``indices[i, :]`` its weights read and their ``values[i, :]``:

    y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]

(Lasby et al. 2024, "Dynamic Sparse Training with Structured Sparsity", section on condensed
inference.) Products accumulate in float32 and the result is cast back to ``x.dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row(bias: jax.Array, ndim: int) -> jax.Array:
    """``bias`` as float32 with leading unit axes (explicit broadcasting, rank-strict safe)."""
    return bias.astype(jnp.float32).reshape((1,) * (ndim - 1) + bias.shape)


def condensed_matmul_reference(
    x: jax.Array, values: jax.Array, indices: jax.Array, bias: jax.Array | None = None
) -> jax.Array:
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]``.

    Args:
        x: ``[..., n_in]`` inputs.
        values: ``[n_active, k]`` weights, same dtype as ``x``.
        indices: ``[n_active, k]`` integer input positions in ``[0, n_in)``.
        bias: optional ``[n_active]``.

    Returns:
        ``[..., n_active]`` in ``x.dtype``.

    Example:
        >>> y = condensed_matmul_reference(x, layer.values, layer.indices, layer.bias)
    """
    gathered = jnp.take(x, indices.astype(jnp.int32), axis=-1, mode="clip")  # [..., a, k]
    y = jnp.einsum(
        "...ak,ak->...a", gathered, values, preferred_element_type=jnp.float32
    )
    if bias is not None:
        y = y + _row(bias, y.ndim)
    return y.astype(x.dtype)


def structured_matmul_reference(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None
) -> jax.Array:
    """The structured-only form: a smaller dense matmul ``x @ kernel + bias`` (fp32 accumulate)."""
    y = jnp.matmul(x, kernel, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + _row(bias, y.ndim)
    return y.astype(x.dtype)
