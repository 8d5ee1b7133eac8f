"""Pallas kernel on Mosaic GPU (Hopper and newer) for condensed inference.

The maintained Pallas GPU backend (Triton-Pallas is deprecated from JAX 0.11) has no
in-kernel gather, so the kernel is built around what Mosaic GPU does have: TMA copies with
dynamic offsets and scalar reads from shared memory. It runs the group-shared layout (``G``
neurons share one index list; ``G = 1`` is the plain condensed layout):

* the wrapper transposes the input once to ``xt [n_in, batch]`` (a row = one input
  feature over the batch, contiguous in HBM);
* persistent CUDA blocks walk the work items (one per group and batch tile); for each it
  TMA-copies the group's index list, values and
  bias into shared memory, then issues one TMA copy per index, ``xt[idx[j], tile]`` ->
  ``rows[j]`` (the gather: ``k`` contiguous row segments), all tracked by one barrier;
* every neuron of the group then reads the same ``k`` gathered rows from shared memory:
  ``acc[i] = bias[i] + sum_j values[i, j] * rows[j]`` (float32), so the global-memory
  gather is paid once per group, not once per neuron;
* the ``[G, block_b]`` output tile leaves through shared memory with a TMA store.

The kernel is a ``plgpu.kernel`` (``pallas_call`` is deprecated for Mosaic GPU, and its
interpret mode in JAX 0.10 runs only grid point 0). Every input is passed whole and all
copies are explicit, which keeps the kernel within what the Mosaic GPU interpret mode
simulates (TMA, barriers, shared memory, several blocks), so CPU tests run the same kernel
logic. Sizes are padded so every TMA moves
a multiple of 128 bytes (``k`` to 32 or 64 slots, the bias to 32 lanes).

Not yet measured on a GPU (none was available while writing it): the per-neuron
accumulation runs on CUDA cores. A tensor-core (WGMMA) version, ``values[g] [G, k] @
rows [k, block_b]`` per group (``G = 64``, bf16), was tried without a GPU and needs one to
finish: JAX 0.10 refuses a one-row TMA into a tiled/swizzled shared-memory buffer (the
slice start must be a multiple of the 8-row tile), copying the gathered rows through
registers into a swizzled buffer fails Mosaic GPU's bank-conflict-free transfer planning,
and the interpret mode implements neither ``transpose_ref`` nor ``layout_cast``, so it could
not be checked on CPU either.

Example:
    >>> y = condensed_matmul_mosaic_gpu(x, layer.values, layer.indices, layer.bias,
    ...                                 group_size=layer.group_size)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxsparse.condensed.checks import check_operands, guarded

__all__ = ["MosaicGpuConfig", "condensed_matmul_mosaic_gpu", "interpret_params",
           "lower_for_cuda"]


@dataclasses.dataclass(frozen=True)
class MosaicGpuConfig:
    """Static tuning config: ``block_b`` batch columns per work item (multiple of 64) and
    the number of persistent CUDA blocks (a few per SM: an H100 has 132 SMs)."""

    block_b: int = 128
    blocks: int = 528


def interpret_params():
    """The Mosaic GPU interpret-mode parameters (a private JAX API in 0.10; ``None`` if
    this JAX has no GPU interpret mode)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # pragma: no cover - depends on the installed JAX
        return None
    return InterpretGPUParams()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _kernel(idx_g, v_g, b_g, xt_g, o_g, idx_s, v_s, b_s, rows, out_s, *, k: int, g: int,
            block_b: int, n_bt: int, n_work: int, blocks: int):
    # Persistent blocks: block ``pid`` takes work items pid, pid + blocks, ... (a work item is
    # one (group, batch tile)). Barriers are scoped per item, so each starts at phase 0.
    pid = jax.lax.axis_index("blocks")

    @pl.loop(pid, n_work, step=blocks)
    def _(w):
        grp, bt = w // n_bt, w % n_bt
        pl.run_scoped(
            functools.partial(_item, grp, bt, idx_g, v_g, b_g, xt_g, o_g, idx_s, v_s, b_s,
                              rows, out_s, k=k, g=g, block_b=block_b),
            plgpu.Barrier(num_arrivals=3),
            plgpu.Barrier(num_arrivals=k),
        )


def _item(grp, bt, idx_g, v_g, b_g, xt_g, o_g, idx_s, v_s, b_s, rows, out_s, bar_meta,
          bar_rows, *, k: int, g: int, block_b: int):
    col0 = bt * block_b
    plgpu.copy_gmem_to_smem(idx_g.at[pl.ds(grp, 1)], idx_s, bar_meta)
    plgpu.copy_gmem_to_smem(v_g.at[pl.ds(grp, 1)], v_s, bar_meta)
    plgpu.copy_gmem_to_smem(b_g.at[pl.ds(grp, 1)], b_s, bar_meta)
    plgpu.barrier_wait(bar_meta)

    def gather(j, c):  # one TMA per gathered row segment, all on one barrier
        row = idx_s[0, j]
        plgpu.copy_gmem_to_smem(xt_g.at[pl.ds(row, 1), pl.ds(col0, block_b)],
                                rows.at[pl.ds(j, 1)], bar_rows)
        return c

    jax.lax.fori_loop(0, k, gather, 0)
    plgpu.barrier_wait(bar_rows)
    for i in range(g):
        def term(j, i=i):
            return v_s[0, i, j].astype(jnp.float32) * rows[j, :].astype(jnp.float32)

        # Slot 0 is peeled so the loop carry starts in the rows' register layout (a splat
        # of the bias would not match it).
        acc = jax.lax.fori_loop(1, k, lambda j, acc: acc + term(j), term(0) + b_s[0, i])
        out_s[i, :] = acc.astype(out_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_s, o_g.at[pl.ds(grp * g, g), pl.ds(col0, block_b)])
    plgpu.wait_smem_to_gmem(0)  # out_s is reused by the next item


def _call(x, values, indices, bias, *, group_size: int, config: MosaicGpuConfig,
          interpret: bool):
    lead, n_in = x.shape[:-1], x.shape[-1]
    n_active, k = values.shape
    g = group_size
    n_groups = n_active // g
    x2 = x.reshape(-1, n_in)
    batch = x2.shape[0]
    if n_groups == 0 or k == 0 or batch == 0:
        y = jnp.broadcast_to(bias.astype(jnp.float32), (batch, n_active)).astype(x.dtype)
        return y.reshape(*lead, n_active)
    bb = config.block_b
    b_p = _round_up(batch, bb)
    k_p = _round_up(k, 32 if x.dtype.itemsize == 4 else 64)  # 128-byte TMA transfers
    g_p = _round_up(g, 32)
    xt = jnp.pad(x2, ((0, b_p - batch), (0, 0))).T  # [n_in, b_p]
    idx = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, k_p - k)))  # pad: row 0, value 0
    v3 = jnp.pad(values.reshape(n_groups, g, k), ((0, 0), (0, 0), (0, k_p - k)))
    b2 = jnp.pad(bias.astype(jnp.float32).reshape(n_groups, g), ((0, 0), (0, g_p - g)))
    n_bt = b_p // bb
    n_work = n_groups * n_bt
    blocks = min(n_work, config.blocks)
    yt = plgpu.kernel(
        functools.partial(_kernel, k=k_p, g=g, block_b=bb, n_bt=n_bt, n_work=n_work,
                          blocks=blocks),
        out_type=jax.ShapeDtypeStruct((n_active, b_p), x.dtype),
        scratch_types=[
            plgpu.SMEM((1, k_p), jnp.int32),
            plgpu.SMEM((1, g, k_p), x.dtype),
            plgpu.SMEM((1, g_p), jnp.float32),
            plgpu.SMEM((k_p, bb), x.dtype),
            plgpu.SMEM((g, bb), x.dtype),
        ],
        grid=(blocks,),
        grid_names=("blocks",),
        compiler_params=plgpu.CompilerParams(),
        interpret=(interpret if not isinstance(interpret, bool)
                   else interpret_params() if interpret else None),
    )(idx, v3, b2, xt)
    return yt[:, :batch].T.reshape(*lead, n_active)


_jitted = jax.jit(_call, static_argnames=("group_size", "config", "interpret"))


def condensed_matmul_mosaic_gpu(x, values, indices, bias=None, *, group_size: int = 1,
                                config: MosaicGpuConfig = MosaicGpuConfig(),
                                interpret=False):
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i // G, j]] + bias[i]``, Mosaic GPU.

    Args:
        x: ``[..., n_in]`` float32 / bfloat16 inputs.
        values: ``[n_active, k]``; indices: ``[n_active // group_size, k]`` int8/16/32.
        bias: optional ``[n_active]``.
        group_size: neurons sharing one index list.
        config: :class:`MosaicGpuConfig`.
        interpret: run in the Mosaic GPU interpret mode on any backend (tests): ``True`` or
            an ``InterpretGPUParams`` (e.g. with ``detect_races=True``).

    Index ranges are checked first (:func:`jaxsparse.condensed.checks.guarded`): concrete
    indices on the host (error), traced ones clamped with the affected outputs set to NaN.
    """
    check_operands(x, values, indices, bias, group_size=group_size,
                   name="condensed_matmul_mosaic_gpu")
    if interpret is True and interpret_params() is None:
        raise RuntimeError("this JAX has no Mosaic GPU interpret mode")
    if bias is None:
        bias = jnp.zeros((values.shape[0],), values.dtype)
    kernel = functools.partial(_jitted, group_size=group_size, config=config,
                               interpret=interpret)
    return guarded(kernel, x, values, indices, bias, group_size=group_size,
                   name="condensed_matmul_mosaic_gpu")


def lower_for_cuda(x, values, indices, bias=None, *, group_size: int = 1,
                   config: MosaicGpuConfig = MosaicGpuConfig()):
    """Deviceless CUDA lowering (shapes only): raises if Mosaic GPU rejects the kernel."""
    if bias is None:
        bias = jax.ShapeDtypeStruct((values.shape[0],), values.dtype)
    f = functools.partial(_call, group_size=group_size, config=config, interpret=False)
    return jax.jit(f).trace(x, values, indices, bias).lower(lowering_platforms=("cuda",))
