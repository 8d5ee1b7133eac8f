"""Sparsity metrics: per-layer and global sparsity, active neurons, ITOP rate.

The array functions are pure and jit-safe (they return jax scalars); :func:`sparsity_table`
and :func:`format_table` are host-side helpers for printing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.masks import Masks, PyTree, is_none, path_to_str


def _mask_items(masks: Masks):
    flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
    return [(path_to_str(p), m) for p, m in flat if m is not None]


def layer_sparsity(masks: Masks) -> dict[str, jax.Array]:
    """``{path: sparsity}`` for every masked leaf."""
    return {p: 1.0 - jnp.mean(m.astype(jnp.float32)) for p, m in _mask_items(masks)}


def global_sparsity(masks: Masks, params: PyTree | None = None) -> jax.Array:
    """Fraction of zeros over the masked leaves, or over all of ``params`` when given
    (dense leaves then count as fully active)."""
    items = _mask_items(masks)
    nnz = sum(jnp.sum(m, dtype=jnp.int32) for _, m in items)
    size = sum(m.size for _, m in items)
    if params is not None:
        m_leaves = jax.tree.leaves(masks, is_leaf=is_none)
        for m, p in zip(m_leaves, jax.tree.leaves(params)):
            if m is None:
                nnz = nnz + p.size
                size += p.size
    return 1.0 - jnp.asarray(nnz, jnp.float32) / max(size, 1)


def active_neurons(mask: jax.Array) -> jax.Array:
    """Number of output neurons (last axis) with at least one active input weight."""
    return jnp.sum(jnp.any(mask.reshape(-1, mask.shape[-1]), axis=0), dtype=jnp.int32)


def fan_in(mask: jax.Array) -> jax.Array:
    """Active inputs per output neuron: ``int32[n_out]``."""
    return jnp.sum(mask.reshape(-1, mask.shape[-1]), axis=0, dtype=jnp.int32)


def itop_rate(ever_active: Masks) -> jax.Array:
    """In-time over-parameterisation rate (Liu et al. 2021): the fraction of prunable weights
    that have been active at some point. Pass ``jaxsparse.get_ever_active(opt_state)``."""
    items = _mask_items(ever_active)
    nnz = sum(jnp.sum(m, dtype=jnp.int32) for _, m in items)
    return jnp.asarray(nnz, jnp.float32) / max(sum(m.size for _, m in items), 1)


class LayerRow(NamedTuple):
    path: str
    shape: tuple
    size: int
    active: int
    sparsity: float
    active_neurons: int
    neurons: int


def sparsity_table(masks: Masks, params: PyTree | None = None) -> list[LayerRow]:
    """One row per leaf (masked leaves, and dense ones too when ``params`` is given)."""
    rows = []
    if params is None:
        for path, m in _mask_items(masks):
            rows.append(_row(path, np.asarray(m)))
        return rows
    m_flat = jax.tree.leaves(masks, is_leaf=is_none)
    p_flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for m, (p, x) in zip(m_flat, p_flat):
        path = path_to_str(p)
        rows.append(_row(path, np.ones(np.shape(x), bool) if m is None else np.asarray(m)))
    return rows


def _row(path, m: np.ndarray) -> LayerRow:
    active = int(m.sum())
    neurons = m.shape[-1] if m.ndim else 1
    act_n = int(m.reshape(-1, neurons).any(axis=0).sum()) if m.ndim else int(active > 0)
    return LayerRow(path, tuple(m.shape), int(m.size), active,
                    1.0 - active / max(m.size, 1), act_n, neurons)


def format_table(rows: list[LayerRow]) -> str:
    """A fixed-width text table of :func:`sparsity_table` rows with a total line."""
    head = ("layer", "shape", "active/size", "sparsity", "active neurons")
    body = [
        (r.path, "x".join(map(str, r.shape)), f"{r.active}/{r.size}", f"{r.sparsity:.4f}",
         f"{r.active_neurons}/{r.neurons}")
        for r in rows
    ]
    active, size = sum(r.active for r in rows), sum(r.size for r in rows)
    body.append(("total", "", f"{active}/{size}", f"{1 - active / max(size, 1):.4f}", ""))
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *map(line, body[:-1]), sep, line(body[-1])])


def ablated_fraction(mask: jax.Array) -> jax.Array:
    """Fraction of output neurons with no active input (ablated)."""
    n_out = mask.shape[-1]
    return 1.0 - active_neurons(mask).astype(jnp.float32) / n_out


def fan_in_histogram(mask) -> dict[int, int]:
    """``{fan-in: number of neurons}`` over all neurons (host)."""
    values, counts = np.unique(np.asarray(fan_in(jnp.asarray(mask))), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


class StructureRow(NamedTuple):
    path: str
    neurons: int
    active_neurons: int
    ablated_fraction: float
    fan_in_min: int
    fan_in_max: int
    constant_fan_in: bool
    dense_fan_in: int


def structure_table(masks: Masks) -> list[StructureRow]:
    """Per masked leaf: neurons, active neurons (the layer's *effective width*: the width of
    its structured-only export), ablated fraction, and the fan-in range of active neurons."""
    rows = []
    for path, m in _mask_items(masks):
        m = np.asarray(m)
        fan = m.reshape(-1, m.shape[-1]).sum(axis=0)
        act = fan[fan > 0]
        rows.append(StructureRow(
            path, int(m.shape[-1]), int(act.size), 1.0 - act.size / m.shape[-1],
            int(act.min()) if act.size else 0, int(act.max()) if act.size else 0,
            bool(act.size == 0 or act.min() == act.max()), int(np.prod(m.shape[:-1]))))
    return rows


def format_structure_table(rows: list[StructureRow]) -> str:
    """A text table of :func:`structure_table` rows (effective width = active neurons)."""
    head = ("layer", "effective width", "ablated", "fan-in (active)", "constant", "dense fan-in")
    body = [(r.path, f"{r.active_neurons}/{r.neurons}", f"{r.ablated_fraction:.1%}",
             f"{r.fan_in_min}" if r.constant_fan_in else f"{r.fan_in_min}-{r.fan_in_max}",
             "yes" if r.constant_fan_in else "no", str(r.dense_fan_in)) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])
