"""Pallas GPU kernel for condensed inference (Triton backend).

Layout that avoids materialising the ``[batch, n_active, k]`` gather: the input is
transposed once to ``xt [n_in, batch]``; a program owns an output tile of ``block_n``
neurons x ``block_b`` batch rows and loops over the ``k`` slots. At slot ``j`` it reads the
slot's indices for its neurons (``indices_t[j, neurons]``, contiguous because the wrapper
stores values and indices slot-major ``[k, n_active]``), gathers those rows of ``xt`` for
its batch columns (a ``[block_n, block_b]`` tile) and accumulates ``v[:, None] * tile`` in
float32.

Backend choice (JAX 0.10): gathers inside a GPU kernel lower only through the Triton
backend (selected by passing ``plgpu_triton.CompilerParams``); Mosaic GPU cannot gather on
Hopper. Triton lowering is deprecated upstream, so this module is the one to revisit when it
goes. On CPU the kernel runs in interpret mode (tests); ``lower_for_cuda`` checks that the
Triton lowering accepts it without a GPU.

Example:
    >>> y = condensed_matmul_pallas(x, layer.values, layer.indices, layer.bias)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxsparse.condensed.checks import check_operands, guarded
from jaxsparse.condensed.reference import condensed_matmul_reference

try:  # deprecated upstream from JAX 0.11: this kernel exists only while JAX ships Triton
    from jax.experimental.pallas import triton as plgpu_triton

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed JAX
    plgpu_triton = None
    TRITON_AVAILABLE = False

__all__ = [
    "TRITON_AVAILABLE",
    "PallasConfig",
    "condensed_matmul_pallas",
    "condensed_matmul_reference",
    "lower_for_cuda",
]


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Static tuning config: output tile ``block_n`` neurons x ``block_b`` batch rows."""

    block_n: int = 64
    block_b: int = 64
    num_warps: int = 4
    num_stages: int = 2


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _kernel(xt_ref, vt_ref, it_ref, b_ref, o_ref, *, k: int, block_b: int):
    # xt_ref: [n_in, batch_p] (whole array), vt_ref / it_ref: [k, block_n], b_ref: [block_n],
    # o_ref: [block_n, block_b] tile of the transposed output.
    col0 = pl.program_id(1) * block_b
    cols = col0 + jnp.arange(block_b, dtype=jnp.int32)

    def body(j, acc):
        rows = it_ref[j, :].astype(jnp.int32)  # [block_n]
        w = vt_ref[j, :].astype(jnp.float32)  # [block_n]
        tile = xt_ref[rows[:, None], cols[None, :]].astype(jnp.float32)  # gather rows
        return acc + w[:, None] * tile

    acc = jnp.zeros(o_ref.shape, jnp.float32) + b_ref[...].astype(jnp.float32)[:, None]
    acc = jax.lax.fori_loop(0, k, body, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def condensed_matmul_pallas(
    x, values, indices, bias=None, *, group_size: int = 1,
    config: PallasConfig = PallasConfig(), interpret=False
):
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i // G, j]] + bias[i]`` (Triton).

    Index ranges are checked before the kernel runs (:func:`jaxsparse.condensed.checks.
    guarded`): concrete indices on the host (error), traced ones clamped for the kernel with
    the affected neurons' outputs set to NaN. The group-shared layout (``group_size`` > 1)
    runs with its index lists repeated per neuron.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("this JAX has no Pallas Triton backend; use impl='mosaic_gpu'")
    check_operands(x, values, indices, bias, group_size=group_size,
                   name="condensed_matmul_pallas")
    if group_size > 1:
        indices = jax.numpy.repeat(indices, group_size, axis=0)
    return guarded(functools.partial(_pallas, config=config, interpret=interpret),
                   x, values, indices, bias, name="condensed_matmul_pallas")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _pallas(x, values, indices, bias, *, config: PallasConfig, interpret: bool):
    if bias is None:
        bias = jnp.zeros((values.shape[0],), values.dtype)
    lead, n_in = x.shape[:-1], x.shape[-1]
    n_active, k = values.shape
    x2 = x.reshape(-1, n_in)
    batch = x2.shape[0]
    bn = min(config.block_n, _round_up(n_active, 16))
    bb = min(config.block_b, _round_up(batch, 16))
    na_p, b_p = _round_up(n_active, bn), _round_up(batch, bb)
    xt = jnp.pad(x2, ((0, b_p - batch), (0, 0))).T  # [n_in, b_p]
    vt = jnp.pad(values, ((0, na_p - n_active), (0, 0))).T  # [k, na_p]
    it = jnp.pad(indices, ((0, na_p - n_active), (0, 0))).T
    bp = jnp.pad(bias, (0, na_p - n_active))
    yt = pl.pallas_call(
        functools.partial(_kernel, k=k, block_b=bb),
        grid=(na_p // bn, b_p // bb),
        in_specs=[
            pl.BlockSpec((n_in, b_p), lambda i, j: (0, 0)),
            pl.BlockSpec((k, bn), lambda i, j: (0, i)),
            pl.BlockSpec((k, bn), lambda i, j: (0, i)),
            pl.BlockSpec((bn,), lambda i, j: (i,)),
        ],
        out_specs=pl.BlockSpec((bn, bb), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((na_p, b_p), x.dtype),
        compiler_params=plgpu_triton.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="condensed_matmul",
    )(xt, vt, it, bp)
    return yt[:n_active, :batch].T.reshape(*lead, n_active)


def lower_for_cuda(x, values, indices, bias=None, *, config: PallasConfig = PallasConfig()):
    """Deviceless lowering for CUDA: raises if the Triton backend rejects the kernel."""
    f = functools.partial(condensed_matmul_pallas, config=config)
    return jax.jit(f).trace(x, values, indices, bias).lower(lowering_platforms=("cuda",))
