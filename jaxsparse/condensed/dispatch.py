"""Forward passes of exported layers and the per-layer, per-batch-size form dispatch.

``condensed_dense`` runs a :class:`CondensedLinear` through the best kernel for the current
backend (the fused C++ FFI kernel on CPU, the Pallas Triton kernel on GPU, the jnp reference
elsewhere). ``sparse_dense`` runs a :class:`SparseLinear`, which carries the condensed form
and optionally the structured-only form (the dense matmul when nothing is ablated), and picks
whichever a simple cost model predicts is faster for the (static) batch size.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import struct

from jaxsparse.condensed.export import (
    CondensedLinear,
    StructuredLinear,
    condense_layer,
    expand,
    structure_layer,
)
from jaxsparse.condensed.reference import (
    condensed_matmul_reference,
    structured_matmul_reference,
)

IMPLS = ("auto", "reference", "cpu", "pallas", "pallas_interpret")
FORMS = ("auto", "condensed", "structured")


def condensed_dense(x: jax.Array, layer: CondensedLinear, *, impl: str = "auto") -> jax.Array:
    """``[..., n_in] -> [..., n_active]`` through a condensed layer.

    Args:
        impl: ``"auto"`` (C++ kernel on CPU, Pallas on GPU, reference otherwise),
            ``"reference"``, ``"cpu"``, ``"pallas"`` or ``"pallas_interpret"``.
    """
    if x.shape[-1] != layer.n_in:
        raise ValueError(f"x has {x.shape[-1]} input features, the layer expects {layer.n_in}")
    args = (x, layer.values, layer.indices, layer.bias)
    if impl == "auto":
        impl = {"cpu": "cpu", "gpu": "pallas", "cuda": "pallas"}.get(
            jax.default_backend(), "reference"
        )
    if impl == "reference":
        return condensed_matmul_reference(*args)
    if impl == "cpu":
        from jaxsparse.condensed.kernels.cpu import condensed_matmul_cpu

        return condensed_matmul_cpu(*args)
    if impl in ("pallas", "pallas_interpret"):
        from jaxsparse.condensed.kernels.pallas_gpu import condensed_matmul_pallas

        return condensed_matmul_pallas(*args, interpret=impl == "pallas_interpret")
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def structured_dense(x: jax.Array, layer: StructuredLinear) -> jax.Array:
    """``[..., n_in] -> [..., n_active]`` through the structured-only (smaller dense) form."""
    if x.shape[-1] != layer.n_in:
        raise ValueError(f"x has {x.shape[-1]} input features, the layer expects {layer.n_in}")
    if x.dtype != layer.kernel.dtype:
        raise TypeError(f"x dtype {x.dtype} differs from the layer dtype {layer.kernel.dtype}")
    return structured_matmul_reference(x, layer.kernel, layer.bias)


# ----------------------------------------------------------------------------- cost model


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per call ~ overhead + work / rate. Defaults measured on a 2-core AVX-512 CPU.

    * dense / structured: ``max(weight bytes / dense_bytes_per_s,
      batch * n_in * n_cols / dense_macs_per_s)`` (bandwidth-bound at small batch).
    * condensed: ``batch * n_active * k / rate`` with ``cond_small_macs_per_s`` below
      ``small_batch`` rows (gather-bound) and ``cond_large_macs_per_s`` above it.
    """

    dense_macs_per_s: float = 100e9
    dense_bytes_per_s: float = 50e9
    cond_small_macs_per_s: float = 4e9
    cond_large_macs_per_s: float = 15e9
    small_batch: int = 8
    overhead_s: float = 5e-6
    # XLA's CPU dot is several times slower in bfloat16 than in float32 (measured ~4x at
    # batch 1 and 256); the condensed kernel computes in float32 either way.
    half_precision_dense_slowdown: float = 4.0

    def dense(self, batch: int, n_in: int, n_cols: int, itemsize: int) -> float:
        slow = self.half_precision_dense_slowdown if itemsize == 2 else 1.0
        return self.overhead_s + slow * max(
            n_in * n_cols * itemsize / self.dense_bytes_per_s,
            batch * n_in * n_cols / self.dense_macs_per_s,
        )

    def condensed(self, batch: int, n_active: int, k: int) -> float:
        rate = self.cond_small_macs_per_s if batch < self.small_batch else (
            self.cond_large_macs_per_s)
        return self.overhead_s + batch * n_active * k / rate


# A GPU model (no measurements yet: the Pallas kernel reads k rows per output tile, the
# dense matmul runs on tensor cores); used only to order the forms.
GPU_COST = CostModel(
    dense_macs_per_s=200e12, dense_bytes_per_s=2e12, cond_small_macs_per_s=50e9,
    cond_large_macs_per_s=5e12, small_batch=1, overhead_s=5e-6,
    half_precision_dense_slowdown=0.5,
)


def default_cost_model(backend: str | None = None) -> CostModel:
    backend = backend or jax.default_backend()
    return CostModel() if backend == "cpu" else GPU_COST


@struct.dataclass
class SparseLinear:
    """A sparse layer ready for inference: the condensed form and, optionally, the
    structured-only form (the dense matmul when no neuron is ablated)."""

    condensed: CondensedLinear
    structured: StructuredLinear | None = None

    @property
    def n_in(self) -> int:
        return self.condensed.n_in

    @property
    def n_out(self) -> int:
        return self.condensed.n_out

    @property
    def n_active(self) -> int:
        return self.condensed.n_active


def sparse_linear(kernel, mask, bias=None, *, pad: bool = False, structured: bool = True,
                  name: str = "layer") -> SparseLinear:
    """Exports one layer to a :class:`SparseLinear` (host, outside jit)."""
    c = condense_layer(kernel, mask, bias, pad=pad, name=name)
    s = structure_layer(kernel, mask, bias, name=name) if structured else None
    return SparseLinear(c, s)


def choose_form(layer: SparseLinear, batch: int, cost: CostModel | None = None) -> str:
    """``"condensed"`` or ``"structured"``: the cheaper form under ``cost`` for ``batch``."""
    if layer.structured is None:
        return "condensed"
    cost = cost or default_cost_model()
    c = layer.condensed
    t_cond = cost.condensed(batch, c.n_active, c.k)
    t_dense = cost.dense(batch, c.n_in, c.n_active, np.dtype(c.values.dtype).itemsize)
    return "condensed" if t_cond < t_dense else "structured"


def sparse_dense(x: jax.Array, layer: SparseLinear, *, form: str = "auto",
                 impl: str = "auto", cost: CostModel | None = None) -> jax.Array:
    """``[..., n_in] -> [..., n_active]``; ``form="auto"`` dispatches on the static batch."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    if form == "auto":
        form = choose_form(layer, math.prod(x.shape[:-1]), cost)
    if form == "structured":
        if layer.structured is None:
            raise ValueError("this SparseLinear was exported without the structured form")
        return structured_dense(x, layer.structured)
    return condensed_dense(x, layer.condensed, impl=impl)


def sparse_dense_full(x: jax.Array, layer: SparseLinear, **kw) -> jax.Array:
    """Like :func:`sparse_dense` but ``[..., n_out]``: exactly the masked dense layer."""
    return expand(sparse_dense(x, layer, **kw), layer.condensed)


