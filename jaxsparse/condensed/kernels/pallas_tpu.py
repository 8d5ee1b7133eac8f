"""Pallas TPU kernel for condensed inference in the group-shared layout.

Layout: the wrapper transposes the input once to ``xt [n_in, batch]`` (a row of ``xt`` is
one input feature over the batch, contiguous in HBM). ``G`` output neurons share one index
list (``group_size``; 1 is the plain condensed layout), so the output tile of a group is

    y_tile[G, block_b] = values[g] [G, k] @ xt[indices[g], batch tile] [k, block_b]

one MXU matmul over the ``k`` gathered rows. The grid is ``(batch tiles, groups)``:

* the index lists are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``), so the
  kernel reads each row number as a scalar;
* ``xt`` stays in HBM (``memory_space=ANY``); the ``k`` rows of a group are DMA'd into a
  VMEM buffer, double-buffered as JAX's paged-attention kernel does: while group ``g`` is
  multiplied, the rows of group ``g + 1`` are in flight into the other buffer (the group
  axis is sequential, ``"arbitrary"``; the batch axis is ``"parallel"``);
* the values and the bias of a group arrive through ordinary ``BlockSpec`` pipelining.

Accumulation is float32; the result is cast to the input dtype. On CPU the kernel runs in
the Pallas TPU interpret mode (``interpret=True``), which simulates SMEM, VMEM, DMAs and
semaphores; :func:`lower_for_tpu` lowers it for TPU without a TPU (Mosaic serialisation).

Real-TPU constraints this design respects: ``block_b`` is a multiple of 128 (lanes); the
values/bias/output blocks span their full ``G`` and ``k`` axes; all index lists must fit in
SMEM (``n_active / G * k * 4`` bytes), which the group-shared layout divides by ``G``.

Reference: Lasby et al. 2024 (SRigL, condensed inference); the DMA pattern follows the
paged-attention kernel of ``jax.experimental.pallas.ops.tpu``.

Example:
    >>> y = condensed_matmul_tpu(x, layer.values, layer.indices, layer.bias,
    ...                          group_size=layer.group_size)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxsparse.condensed.checks import check_operands, guarded

__all__ = ["TpuConfig", "condensed_matmul_tpu", "lower_for_tpu"]


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Static tuning config: ``block_b`` batch columns per output tile (multiple of 128)."""

    block_b: int = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _kernel(idx_ref, xt_hbm, v_ref, b_ref, o_ref, rows, sems, *, k: int, block_b: int):
    # idx_ref: SMEM int32[n_groups * k]; xt_hbm: HBM [n_in, b_p]; v_ref: VMEM [1, G, k];
    # b_ref: VMEM f32[1, G, 1]; o_ref: VMEM [1, G, block_b]; rows: VMEM [2, k, block_b];
    # sems: DMA semaphores [2].
    bt, g = pl.program_id(0), pl.program_id(1)
    n_groups = pl.num_programs(1)
    col0 = pl.multiple_of(bt * block_b, block_b)

    def copy(group, slot, j):
        row = idx_ref[group * k + j]
        return pltpu.make_async_copy(
            xt_hbm.at[pl.ds(row, 1), pl.ds(col0, block_b)],
            rows.at[slot, pl.ds(j, 1), :],
            sems.at[slot],
        )

    def start_group(group, slot):
        def body(j, c):
            copy(group, slot, j).start()
            return c

        jax.lax.fori_loop(0, k, body, 0)

    slot = g % 2

    @pl.when(g == 0)
    def _():  # first group of this batch tile: nothing was prefetched for it
        start_group(g, slot)

    @pl.when(g + 1 < n_groups)
    def _():  # prefetch the next group's rows while this one computes
        start_group(g + 1, 1 - slot)

    def wait(j, c):
        copy(g, slot, j).wait()
        return c

    jax.lax.fori_loop(0, k, wait, 0)
    acc = jnp.dot(v_ref[0], rows[slot], preferred_element_type=jnp.float32)  # [G, block_b]
    o_ref[0] = (acc + b_ref[0]).astype(o_ref.dtype)


def _interpret_params(interpret):
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


def _call(x, values, indices, bias, *, group_size: int, config: TpuConfig, interpret):
    lead, n_in = x.shape[:-1], x.shape[-1]
    n_active, k = values.shape
    g = group_size
    n_groups = n_active // g
    x2 = x.reshape(-1, n_in)
    batch = x2.shape[0]
    bb = config.block_b
    b_p = _round_up(max(batch, 1), bb)
    if n_groups == 0 or k == 0 or batch == 0:
        y = jnp.broadcast_to(bias.astype(jnp.float32), (batch, n_active)).astype(x.dtype)
        return y.reshape(*lead, n_active)
    xt = jnp.pad(x2, ((0, b_p - batch), (0, 0))).T  # [n_in, b_p]
    v3 = values.reshape(n_groups, g, k)
    b3 = bias.astype(jnp.float32).reshape(n_groups, g, 1)
    idx = indices.astype(jnp.int32).reshape(-1)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b_p // bb, n_groups),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((1, g, k), lambda b, grp, idx: (grp, 0, 0)),
            pl.BlockSpec((1, g, 1), lambda b, grp, idx: (grp, 0, 0)),
        ],
        out_specs=pl.BlockSpec((1, g, bb), lambda b, grp, idx: (grp, 0, b)),
        scratch_shapes=[
            pltpu.VMEM((2, k, bb), x.dtype),
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    yt = pl.pallas_call(
        functools.partial(_kernel, k=k, block_b=bb),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((n_groups, g, b_p), x.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret_params(interpret),
        name="condensed_matmul_tpu",
    )(idx, xt, v3, b3)
    return yt.reshape(n_active, b_p)[:, :batch].T.reshape(*lead, n_active)


_jitted = jax.jit(_call, static_argnames=("group_size", "config", "interpret"))


def condensed_matmul_tpu(x, values, indices, bias=None, *, group_size: int = 1,
                         config: TpuConfig = TpuConfig(), interpret=False):
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i // G, j]] + bias[i]`` on TPU.

    Args:
        x: ``[..., n_in]`` float32 / bfloat16 inputs.
        values: ``[n_active, k]``; indices: ``[n_active // group_size, k]`` int8/16/32.
        bias: optional ``[n_active]``.
        group_size: neurons sharing one index list (an MXU tile wants 8 or more).
        config: :class:`TpuConfig`.
        interpret: run in the Pallas TPU interpret mode (any backend; tests): ``True`` or a
            ``pltpu.InterpretParams`` (e.g. with ``detect_races=True``).

    Index ranges are checked first (:func:`jaxsparse.condensed.checks.guarded`): concrete
    indices on the host (error), traced ones clamped with the affected outputs set to NaN.
    """
    check_operands(x, values, indices, bias, group_size=group_size,
                   name="condensed_matmul_tpu")
    if bias is None:
        bias = jnp.zeros((values.shape[0],), values.dtype)
    kernel = functools.partial(_jitted, group_size=group_size, config=config,
                               interpret=interpret)
    return guarded(kernel, x, values, indices, bias, group_size=group_size,
                   name="condensed_matmul_tpu")


def lower_for_tpu(x, values, indices, bias=None, *, group_size: int = 1,
                  config: TpuConfig = TpuConfig()):
    """Deviceless lowering for TPU (shapes only): raises if Mosaic TPU rejects the kernel."""
    if bias is None:
        bias = jax.ShapeDtypeStruct((values.shape[0],), values.dtype)
    f = functools.partial(_call, group_size=group_size, config=config, interpret=False)
    return jax.jit(f).trace(x, values, indices, bias).lower(lowering_platforms=("tpu",))
