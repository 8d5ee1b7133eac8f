"""Forward passes of exported layers, the kernel dispatch and the per-batch form dispatch.

``condensed_dense`` runs a :class:`CondensedLinear` through the kernel :func:`choose_impl`
picks for the platform and what is available there (issue 16):

==========  ==============================================================================
platform    kernel
==========  ==============================================================================
cpu         the fused C++ XLA FFI kernel (``kernels/cpu.py``); XLA if it cannot be built
gpu         Pallas on Mosaic GPU on Hopper and newer (``kernels/pallas_mosaic_gpu.py``);
            else Pallas on Triton while the installed JAX has it, compute capability >= 8.0
            (``kernels/pallas_gpu.py``); else XLA
tpu         Pallas TPU (``kernels/pallas_tpu.py``): index lists scalar-prefetched to SMEM,
            gathered rows DMA'd to VMEM, an MXU matmul per group
other       XLA (the reference formulation)
==========  ==============================================================================

On a GPU or TPU where no kernel is usable the XLA formulation runs, with one warning per
process and platform. ``impl=`` forces a choice. ``sparse_dense`` runs a
:class:`SparseLinear`, which carries the condensed form and optionally the structured-only
form, and picks whichever a simple cost model predicts is faster for the (static) batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import numpy as np
from flax import struct

from jaxsparse.condensed.export import (
    CondensedLinear,
    StructuredLinear,
    condense_layer,
    expand,
    structure_layer,
    validate_condensed,
)
from jaxsparse.condensed.reference import (
    condensed_matmul_reference,
    structured_matmul_reference,
)

KERNELS = ("reference", "xla", "cpu", "mosaic_gpu", "triton", "pallas_tpu")
INTERPRET = ("mosaic_gpu_interpret", "triton_interpret", "pallas_tpu_interpret")
ALIASES = {"pallas": "triton", "pallas_interpret": "triton_interpret"}
IMPLS = ("auto", *KERNELS, *INTERPRET, *ALIASES)
FORMS = ("auto", "condensed", "structured")

_warned_platforms: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Platform:
    """What :func:`choose_impl` decides on: the backend and what runs there.

    Attributes:
        name: ``jax.default_backend()`` (``"cpu"``, ``"gpu"``, ``"tpu"``, ...).
        compute_capability: CUDA compute capability of device 0 (e.g. 9.0), else ``None``.
        have: kernels whose code is importable and usable in this process.
    """

    name: str
    compute_capability: float | None = None
    have: frozenset[str] = frozenset()


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@functools.cache
def detect_platform(backend: str | None = None) -> Platform:
    """The :class:`Platform` of this process (cached; the C++ build is checked lazily)."""
    name = backend or jax.default_backend()
    cc = None
    if name in ("gpu", "cuda"):
        name = "gpu"
        try:
            cc = float(jax.devices("gpu")[0].compute_capability)
        except (AttributeError, RuntimeError, ValueError, TypeError):
            cc = None
    have = set()
    if _importable("jaxsparse.condensed.kernels.pallas_mosaic_gpu"):
        have.add("mosaic_gpu")
    from jaxsparse.condensed.kernels import pallas_gpu

    if pallas_gpu.TRITON_AVAILABLE:
        have.add("triton")
    if _importable("jaxsparse.condensed.kernels.pallas_tpu"):
        have.add("pallas_tpu")
    if name == "cpu":
        have.add("cpu")  # availability (a compiler) is decided by the kernel's own fallback
    return Platform(name, cc, frozenset(have))


def choose_impl(platform: Platform) -> str:
    """The kernel for ``platform``: a pure function of it, so every branch is testable.

    Returns one of :data:`KERNELS`; ``"xla"`` where no kernel fits.
    """
    have, cc = platform.have, platform.compute_capability
    if platform.name == "cpu":
        return "cpu" if "cpu" in have else "xla"
    if platform.name == "gpu":
        if "mosaic_gpu" in have and cc is not None and cc >= 9.0:
            return "mosaic_gpu"
        if "triton" in have and cc is not None and cc >= 8.0:
            return "triton"
        return "xla"
    if platform.name == "tpu":
        return "pallas_tpu" if "pallas_tpu" in have else "xla"
    return "xla"


def _warn_fallback(platform: Platform) -> None:
    if platform.name in ("gpu", "tpu") and platform.name not in _warned_platforms:
        _warned_platforms.add(platform.name)
        cc = "" if platform.compute_capability is None else (
            f" (compute capability {platform.compute_capability})")
        warnings.warn(
            f"jaxsparse: no condensed kernel is usable on this {platform.name}{cc}; running "
            "the XLA formulation (correct, slower). Mosaic GPU needs compute capability >= "
            "9.0, Triton >= 8.0.",
            RuntimeWarning,
            stacklevel=3,
        )


def run_kernel(impl: str, x, values, indices, bias, *, group_size: int = 1):
    """Runs one kernel by name (see :data:`IMPLS`) on raw operands."""
    impl = ALIASES.get(impl, impl)
    interpret = impl.endswith("_interpret")
    kernel = impl.removesuffix("_interpret")
    if kernel in ("reference", "xla"):
        return condensed_matmul_reference(x, values, indices, bias, group_size=group_size)
    if kernel == "cpu":
        from jaxsparse.condensed.kernels.cpu import condensed_matmul_cpu

        return condensed_matmul_cpu(x, values, indices, bias, group_size=group_size)
    if kernel == "triton":
        from jaxsparse.condensed.kernels.pallas_gpu import condensed_matmul_pallas

        return condensed_matmul_pallas(x, values, indices, bias, group_size=group_size,
                                       interpret=interpret)
    if kernel == "mosaic_gpu":
        from jaxsparse.condensed.kernels.pallas_mosaic_gpu import condensed_matmul_mosaic_gpu

        return condensed_matmul_mosaic_gpu(x, values, indices, bias, group_size=group_size,
                                           interpret=interpret)
    if kernel == "pallas_tpu":
        from jaxsparse.condensed.kernels.pallas_tpu import condensed_matmul_tpu

        return condensed_matmul_tpu(x, values, indices, bias, group_size=group_size,
                                    interpret=interpret)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def condensed_dense(x: jax.Array, layer: CondensedLinear, *, impl: str = "auto") -> jax.Array:
    """``[..., n_in] -> [..., n_active]`` through a condensed layer.

    The layer is validated first (shapes, dtypes; index ranges when concrete), so no kernel
    ever gathers through an unchecked index.

    Args:
        x: ``[..., n_in]`` inputs of the layer's dtype.
        layer: the layer (``group_size`` > 1: the group-shared layout).
        impl: ``"auto"`` (:func:`choose_impl` for this platform), or force one of
            ``"reference"``/``"xla"``, ``"cpu"``, ``"mosaic_gpu"``, ``"triton"``,
            ``"pallas_tpu"``, or an ``*_interpret`` variant (a Pallas kernel interpreted on
            any backend, for tests). ``"pallas"`` is an alias of ``"triton"``.

    Example:
        >>> y = condensed_dense(x, jaxsparse.condense_layer(kernel, mask, bias))
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if x.shape[-1:] != (layer.n_in,):
        raise ValueError(
            f"x has {x.shape[-1] if x.ndim else 0} input features, the layer expects "
            f"{layer.n_in}"
        )
    validate_condensed(layer, "condensed_dense layer")
    if impl == "auto":
        platform = detect_platform()
        impl = choose_impl(platform)
        if impl == "xla":
            _warn_fallback(platform)
    return run_kernel(impl, x, layer.values, layer.indices, layer.bias,
                      group_size=layer.group_size)


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


