"""Backward kernels of the condensed layer: jnp reference and C++ XLA FFI CPU kernels.

For ``y[b, i] = bias[i] + sum_j values[i, j] * x[b, indices[i, j]]`` (one index list per
neuron, ``indices [n_out, k]``):

* ``dvalues[i, j] = sum_b dy[b, i] * x[b, indices[i, j]]``: one dot product per slot;
* ``dx[b, c] = sum over slots (i, j) with indices[i, j] == c of dy[b, i] * values[i, j]``:
  a scatter-add through the index lists.

:func:`condensed_dvalues_reference` and :func:`condensed_dx_reference` are the jnp source
of truth (they materialise the ``[batch, n_out, k]`` gather); :func:`condensed_dvalues_cpu`
and :func:`condensed_dx_cpu` run the C++ kernels of ``condensed_train_cpu.cc`` (float32,
no materialised gather). That file includes the forward kernel's source
(``condensed_cpu.cc``), so one library serves forward and backward; it is built, cached and
verified exactly like the forward kernel's (:mod:`jaxsparse.condensed.kernels.cpu`: private
0700 cache, SHA-256 record, memfd load). Without a compiler :func:`available` is ``False``
and the callers use the references.

Index ranges: the C++ kernels check every index before reading or writing through it (an
error naming the index). The references read through clamped indices; callers poison the
results of bad lists (see :func:`jaxsparse.condensed.training.condensed_linear`).

Example:
    >>> dv = condensed_dvalues_cpu(x, dy, indices)         # [n_out, k]
    >>> dx = condensed_dx_cpu(dy, values, indices, n_in)    # [batch, n_in]
"""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.condensed.kernels import cpu

SOURCE = Path(__file__).with_name("condensed_train_cpu.cc")
TARGETS = {
    "jaxsparse_condensed_train_fwd": "JaxsparseCondensedMatmul",
    "jaxsparse_condensed_dvalues": "JaxsparseCondensedDvalues",
    "jaxsparse_condensed_dx": "JaxsparseCondensedDx",
}

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None}


# ----------------------------------------------------------------------------- reference


def condensed_dvalues_reference(x: jax.Array, dy: jax.Array, indices: jax.Array) -> jax.Array:
    """``dvalues[i, j] = sum_b dy[b, i] * x[b, indices[i, j]]`` (fp32 accumulate).

    Args:
        x: ``[..., n_in]`` layer inputs.
        dy: ``[..., n_out]`` output cotangents (same leading axes).
        indices: ``[n_out, k]`` input positions (read clamped into ``[0, n_in)``).

    Returns:
        ``[n_out, k]`` in ``x.dtype``.
    """
    gathered = jnp.take(x, indices.astype(jnp.int32), axis=-1, mode="clip")  # [..., n_out, k]
    lead = "".join(chr(ord("a") + t) for t in range(x.ndim - 1))
    dv = jnp.einsum(f"{lead}ok,{lead}o->ok", gathered, dy, preferred_element_type=jnp.float32)
    return dv.astype(x.dtype)


def condensed_dx_reference(dy: jax.Array, values: jax.Array, indices: jax.Array,
                           n_in: int) -> jax.Array:
    """``dx[..., c] = sum_{(i, j): indices[i, j] == c} dy[..., i] * values[i, j]``.

    Args:
        dy: ``[..., n_out]`` output cotangents.
        values: ``[n_out, k]`` weights.
        indices: ``[n_out, k]`` input positions (clamped into ``[0, n_in)``).
        n_in: the input width.

    Returns:
        ``[..., n_in]`` in ``dy.dtype``.
    """
    contrib = (dy[..., :, None].astype(jnp.float32)
               * values.astype(jnp.float32).reshape((1,) * (dy.ndim - 1) + values.shape))
    flat_idx = jnp.clip(indices.astype(jnp.int32), 0, max(n_in - 1, 0)).reshape(-1)
    lead = dy.shape[:-1]
    dx = jnp.zeros((*lead, n_in), jnp.float32).at[..., flat_idx].add(
        contrib.reshape(*lead, -1))
    return dx.astype(dy.dtype)


# ----------------------------------------------------------------------------- build


def library_path(cxx: str) -> Path:
    """Cache path of the training library: a hash of both sources, compiler, flags, JAX
    and CPU (the forward source is compiled into it)."""
    return cpu._cached_path((SOURCE, cpu.SOURCE), "condensed_train_cpu", cxx)


def build(force: bool = False) -> Path:
    """Compiles the training library (if not cached); its SHA-256 is recorded beside it."""
    cxx = cpu._compiler()
    return cpu._build_library(SOURCE, library_path(cxx), cxx,
                              "the condensed training kernels", force)


def load() -> bool:
    """Builds, verifies and registers the three FFI targets once; ``False`` if unavailable."""
    return cpu._load_library(_state, _lock, build, TARGETS)


def available() -> bool:
    """Whether the C++ training kernels can be used in this process."""
    return load()


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (``None`` when it is not)."""
    return None if load() else str(_state["error"])


# ----------------------------------------------------------------------------- wrappers


def _flat(a: jax.Array) -> jax.Array:
    return a.reshape(-1, a.shape[-1])


def _require() -> None:
    if not load():
        raise cpu.BuildError(f"condensed training kernels unavailable: {_state['error']}")


def condensed_forward_cpu(x, values, indices, bias):
    """The forward kernel (``condensed_cpu.cc``) from this library: ``[..., n_out]``.

    Callers have checked operands; indices are range-checked by the kernel.
    """
    _require()
    x2 = _flat(x)
    out = jax.ShapeDtypeStruct((x2.shape[0], values.shape[0]), x.dtype)
    y = jax.ffi.ffi_call("jaxsparse_condensed_train_fwd", out,
                         vmap_method="sequential")(x2, values, indices, bias)
    return y.reshape(*x.shape[:-1], values.shape[0])


def condensed_dvalues_cpu(x: jax.Array, dy: jax.Array, indices: jax.Array) -> jax.Array:
    """:func:`condensed_dvalues_reference` by the C++ kernel (float32; builds it on first
    use, ``BuildError`` when it cannot be built)."""
    _require()
    out = jax.ShapeDtypeStruct(indices.shape, jnp.float32)
    return jax.ffi.ffi_call("jaxsparse_condensed_dvalues", out,
                         vmap_method="sequential")(_flat(x), _flat(dy), indices)


def condensed_dx_cpu(dy: jax.Array, values: jax.Array, indices: jax.Array,
                     n_in: int) -> jax.Array:
    """:func:`condensed_dx_reference` by the C++ kernel (float32; builds it on first use,
    ``BuildError`` when it cannot be built)."""
    _require()
    dy2 = _flat(dy)
    out = jax.ShapeDtypeStruct((dy2.shape[0], n_in), jnp.float32)
    dx = jax.ffi.ffi_call("jaxsparse_condensed_dx", out,
                         vmap_method="sequential")(dy2, values, indices)
    return dx.reshape(*dy.shape[:-1], n_in)
