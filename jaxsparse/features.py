"""Neuron strength and feature ranking from sparse weights (QuickSelection).

QuickSelection (Atashgahi et al. 2022, "Quick and robust feature selection: the strength of
energy-efficient sparse training for autoencoders", Machine Learning 111) trains a sparse
denoising autoencoder with SET and ranks the input features by the *strength* of their input
neuron: the sum of the absolute values of its active outgoing weights. Inputs that carry
information keep and grow strong connections; uninformative ones (constant border pixels, noise)
lose them at each SET drop.

Kernels follow the Flax layout ``(..., fan_in, fan_out)``: the last axis indexes the output
neurons, every other axis the input neurons (for a Dense kernel ``(n_in, n_out)``, input
neuron ``i`` is row ``i``).

Example:
  >>> kernel = params["encoder"]["kernel"]            # (784, 1000), already masked
  >>> strength = jaxsparse.features.input_strength(kernel, masks["encoder"]["kernel"])
  >>> selected = jaxsparse.features.top_k_features(strength, 50)   # int32[50]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_kernel(kernel, mask, name: str):
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"{name}: kernel must have rank >= 2 (fan_in, fan_out), got shape "
                         f"{kernel.shape}")
    if mask is not None and jnp.shape(mask) != kernel.shape:
        raise ValueError(f"{name}: mask shape {jnp.shape(mask)} does not match kernel shape "
                         f"{kernel.shape}")
    return kernel


def _active_abs(kernel, mask):
    magnitude = jnp.abs(kernel)
    if mask is None:
        return magnitude
    return jnp.where(jnp.asarray(mask, jnp.bool_), magnitude, jnp.zeros((), magnitude.dtype))


def input_strength(kernel: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Strength of every input neuron: ``sum_j |W[i, j]|`` over its active connections.

    Args:
      kernel: weights ``(..., fan_out)``; inactive weights are expected to be zero already
        (params kept masked by the jaxsparse wrappers), ``mask`` makes it explicit.
      mask: optional bool array of the kernel's shape; inactive weights are ignored.

    Returns:
      ``float[kernel.shape[:-1]]``: one strength per input neuron.
    """
    kernel = _check_kernel(kernel, mask, "input_strength")
    return jnp.sum(_active_abs(kernel, mask), axis=-1)


def output_strength(kernel: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Strength of every output neuron: ``sum_i |W[i, j]|`` over its active inputs.

    Returns:
      ``float[fan_out]``.
    """
    kernel = _check_kernel(kernel, mask, "output_strength")
    return jnp.sum(_active_abs(kernel, mask).reshape(-1, kernel.shape[-1]), axis=0)


def top_k_features(scores: jax.Array, k: int) -> jax.Array:
    """Indices of the ``k`` highest scores, strongest first (ties: lower index first).

    ``scores`` of any shape are ranked flat (e.g. a 28x28 strength map); ``k`` is a static
    Python int.

    Raises:
      ValueError: when ``k`` is not in ``[1, scores.size]`` (for example ``k`` larger than
        the input dimension).
    """
    scores = jnp.asarray(scores)
    n = int(np.prod(scores.shape))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(
            f"k={k} must be between 1 and the input dimension {n} (scores of shape "
            f"{scores.shape})"
        )
    # A stable argsort of the negated scores keeps the lower index first among equals.
    order = jnp.argsort(-scores.reshape(-1), stable=True)
    return order[:k].astype(jnp.int32)


def feature_mask(scores: jax.Array, k: int) -> jax.Array:
    """Bool mask of ``scores``' shape selecting the ``k`` highest (see :func:`top_k_features`)."""
    scores = jnp.asarray(scores)
    idx = top_k_features(scores, k)
    flat = jnp.zeros((int(np.prod(scores.shape)),), jnp.bool_).at[idx].set(True)
    return flat.reshape(scores.shape)
