"""Export trained sparse Dense layers to the condensed and structured-only forms.

Conventions (Flax): a Dense kernel is ``[n_in, n_out]``; a *neuron* is a column; its fan-in
is axis 0. A neuron whose mask column is all ``False`` is *ablated*: its weights are all zero
so it outputs ``bias[i]`` (and ``act(bias[i])`` after the activation).

* **Condensed** (:class:`CondensedLinear`): for the ``n_active`` active neurons, ``values``
  and ``indices`` of shape ``[n_active, k]`` where ``k`` is the constant fan-in.
  Masks whose active neurons do not all have the same fan-in (RigL, SET, ...) are rejected
  with a ``ValueError`` by default; ``pad=True`` pads every neuron to the largest fan-in with
  zero-valued slots (exactly equivalent, but costs ``max fan-in`` per neuron).
* **Group-shared condensed** (``group_size=G``): ``G`` consecutive output neurons (kernel
  columns ``[g*G, (g+1)*G)``) share one index list, so ``indices`` is
  ``[n_active // G, k]`` and one gather of ``k`` inputs feeds a ``[G, k]`` matmul (the
  shape tensor cores and TPU MXUs run; also fewer index bytes on CPU). A group is dropped
  only when all its neurons are ablated; an ablated neuron inside a live group keeps
  zero values and its bias (exactly its dense output).
* **Structured-only** (:class:`StructuredLinear`): the ablated neurons removed, a smaller
  dense ``[n_in, n_active]`` matmul.

Both forms produce ``[..., n_active]`` outputs; :func:`expand` puts them back into the
layer's ``n_out`` positions with the ablated neurons' constant bias, so a single layer is
exactly equivalent to the masked dense layer. The model-level export
(:mod:`jaxsparse.condensed.model`) instead folds ``act(bias)`` of ablated neurons into the
next layer and shrinks that layer's input.

All exports run on the host (numpy): the shapes ``n_active`` and ``k`` depend on the mask
values. Structure compiled here is validated here, so kernels can trust it.

Reference: Lasby et al. 2024, "Dynamic Sparse Training with Structured Sparsity" (SRigL).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsparse.condensed.checks import check_index_range, check_operands, is_traced
from jaxsparse.masks import is_none, path_to_str

PyTree = Any


def index_dtype(n: int) -> np.dtype:
    """Smallest signed integer dtype holding every index in ``[0, n)``.

    >>> index_dtype(128), index_dtype(129), index_dtype(32768), index_dtype(32769)
    (dtype('int8'), dtype('int16'), dtype('int16'), dtype('int32'))
    """
    for dt in (np.int8, np.int16, np.int32):
        if n - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


@struct.dataclass
class CondensedLinear:
    """A Dense layer in condensed form.

    Attributes:
        values: ``[n_active, k]`` weights of the active neurons.
        indices: ``[n_active, k]`` their input positions, dtype :func:`index_dtype` ``(n_in)``,
            ascending within a neuron (padding slots, if any, come last and have value 0).
        bias: ``[n_active]`` bias of the active neurons.
        neurons: ``int32[n_active]`` positions of the active neurons in the ``n_out`` outputs.
        ablated_bias: ``[n_out]``: the bias of ablated neurons, 0 at active positions; the
            output of the dense layer where the condensed one has no neuron.
        n_in, n_out: static sizes of the dense layer.
        padded: static; ``True`` when built with ``pad=True`` from a non-constant fan-in mask.
        group_size: static ``G``; ``indices`` is ``[n_active // G, k]`` and neuron ``i``
            reads ``indices[i // G]`` (1: every neuron has its own list).
    """

    values: jax.Array
    indices: jax.Array
    bias: jax.Array
    neurons: jax.Array
    ablated_bias: jax.Array
    n_in: int = struct.field(pytree_node=False)
    n_out: int = struct.field(pytree_node=False)
    padded: bool = struct.field(pytree_node=False, default=False)
    group_size: int = struct.field(pytree_node=False, default=1)

    @property
    def n_active(self) -> int:
        return self.values.shape[0]

    @property
    def k(self) -> int:
        return self.values.shape[1]


@struct.dataclass
class StructuredLinear:
    """A Dense layer with its ablated neurons removed: ``kernel [n_in, n_active]``."""

    kernel: jax.Array
    bias: jax.Array
    neurons: jax.Array
    ablated_bias: jax.Array
    n_in: int = struct.field(pytree_node=False)
    n_out: int = struct.field(pytree_node=False)

    @property
    def n_active(self) -> int:
        return self.kernel.shape[1]


# ----------------------------------------------------------------------------- validation


def _host(x, what: str, name: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{name}: {what} is a traced value; condensed export runs on the host because "
            "the condensed shapes depend on the mask. Call it outside jit."
        )
    return np.asarray(x)


def _check_layer(kernel, mask, bias, name: str):
    kernel = _host(kernel, "kernel", name)
    mask = _host(mask, "mask", name)
    if kernel.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D Dense kernel [n_in, n_out], got {kernel.shape}")
    if not np.issubdtype(kernel.dtype, np.floating) and kernel.dtype != jnp.bfloat16:
        raise TypeError(f"{name}: kernel must be floating point, got {kernel.dtype}")
    if mask.dtype != np.bool_:
        raise TypeError(f"{name}: mask must be a bool array, got dtype {mask.dtype}")
    if mask.shape != kernel.shape:
        raise ValueError(
            f"{name}: mask shape {mask.shape} does not match kernel shape {kernel.shape}"
        )
    n_out = kernel.shape[1]
    if bias is None:
        bias = np.zeros((n_out,), kernel.dtype)
    else:
        bias = _host(bias, "bias", name)
        if bias.shape != (n_out,):
            raise ValueError(f"{name}: bias shape {bias.shape} does not match n_out={n_out}")
        if bias.dtype != kernel.dtype:
            raise TypeError(
                f"{name}: bias dtype {bias.dtype} differs from kernel dtype {kernel.dtype}"
            )
    return kernel, mask, bias


def _split_bias(bias: np.ndarray, active: np.ndarray):
    ablated_bias = np.where(active, np.zeros((), bias.dtype), bias)
    return bias[active], ablated_bias


def fan_in_profile(mask) -> tuple[np.ndarray, np.ndarray]:
    """``(fan_in, active)``: host ``int[n_out]`` fan-in and ``bool[n_out]`` active neurons."""
    m = np.asarray(mask)
    fan = m.sum(axis=0)
    return fan, fan > 0


# ----------------------------------------------------------------------------- per layer


def condense_layer(
    kernel, mask, bias=None, *, pad: bool = False, group_size: int = 1, name: str = "layer"
) -> CondensedLinear:
    """Condenses one Dense layer (optionally in the group-shared layout).

    Args:
        kernel: ``[n_in, n_out]`` weights (entries outside the mask are ignored).
        mask: ``bool[n_in, n_out]``.
        bias: optional ``[n_out]``, same dtype as the kernel.
        pad: accept masks whose active neurons have different fan-in by padding to the
            largest with zero-valued slots. Without it such masks raise ``ValueError``.
        group_size: ``G`` > 1 builds the group-shared layout; it must divide ``n_out``, and
            the live neurons of each group must share one mask column (as
            ``srigl(..., group_size=G)`` trains them) unless ``pad=True``, which gives each
            group the union of its neurons' inputs.
        name: layer name used in error messages.

    Example:
        >>> layer = condense_layer(params["kernel"], mask, params["bias"])
        >>> y = condensed_dense(x, layer)          # [batch, n_active]
        >>> y_full = expand(y, layer)              # == x @ (kernel * mask) + bias
    """
    kernel, mask, bias = _check_layer(kernel, mask, bias, name)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{name}: group_size must be a positive int, got {group_size!r}")
    if group_size > 1:
        return _condense_grouped(kernel, mask, bias, pad, group_size, name)
    n_in, n_out = kernel.shape
    fan, active = fan_in_profile(mask)
    fans = np.unique(fan[active])
    if len(fans) > 1 and not pad:
        bad = np.flatnonzero(active & (fan != fans[-1]))[:5]
        raise ValueError(
            f"{name}: the condensed form needs constant fan-in, but active neurons have fan-in "
            f"between {fans[0]} and {fans[-1]} (e.g. neurons {bad.tolist()} have "
            f"{fan[bad].tolist()}, others {fans[-1]}). Train with constant fan-in (SRigL), "
            "pass pad=True to pad to the largest fan-in, or use the structured form."
        )
    k = int(fans[-1]) if len(fans) else 0
    m = mask[:, active]
    w = np.where(m, kernel[:, active], np.zeros((), kernel.dtype))
    # Stable sort puts each neuron's active rows first, ascending; padding slots (inactive
    # rows, zero value) follow, so every index is in range.
    order = np.argsort(~m, axis=0, kind="stable")[:k]  # [k, n_active]
    values = np.take_along_axis(w, order, axis=0).T
    indices = order.T.astype(index_dtype(n_in))
    b_active, ablated_bias = _split_bias(bias, active)
    return CondensedLinear(
        values=jnp.asarray(values),
        indices=jnp.asarray(indices),
        bias=jnp.asarray(b_active),
        neurons=jnp.asarray(np.flatnonzero(active).astype(np.int32)),
        ablated_bias=jnp.asarray(ablated_bias),
        n_in=n_in,
        n_out=n_out,
        padded=len(fans) > 1,
    )


def _condense_grouped(kernel, mask, bias, pad: bool, g: int, name: str) -> CondensedLinear:
    n_in, n_out = kernel.shape
    if n_out % g:
        raise ValueError(
            f"{name}: group_size={g} does not divide the layer's n_out={n_out} output neurons"
        )
    _, col_active = fan_in_profile(mask)
    union = mask.reshape(n_in, n_out // g, g).any(axis=2)  # [n_in, n_groups]
    live = union.any(axis=0)
    shared = (mask == np.repeat(union, g, axis=1)) | ~col_active[None, :]
    if not pad and not shared.all():
        col = int(np.flatnonzero(~shared.all(axis=0))[0])
        raise ValueError(
            f"{name}: group_size={g} needs the live neurons of each group to share one mask "
            f"column, but neuron {col} (group {col // g}) differs from its group's other "
            "neurons. Train with srigl(..., group_size=G), or pass pad=True to give each "
            "group the union of its inputs."
        )
    fan = union.sum(axis=0)
    fans = np.unique(fan[live])
    if len(fans) > 1 and not pad:
        bad = np.flatnonzero(live & (fan != fans[-1]))[:5]
        raise ValueError(
            f"{name}: the condensed form needs constant fan-in, but groups have fan-in between "
            f"{fans[0]} and {fans[-1]} (e.g. groups {bad.tolist()} have {fan[bad].tolist()}). "
            "Pass pad=True to pad to the largest fan-in."
        )
    k = int(fans[-1]) if len(fans) else 0
    u = union[:, live]  # [n_in, n_live]
    order = np.argsort(~u, axis=0, kind="stable")[:k]  # [k, n_live], active rows first
    cols = (np.flatnonzero(live)[:, None] * g + np.arange(g)[None, :]).reshape(-1)
    w = np.where(mask, kernel, np.zeros((), kernel.dtype))[:, cols]  # [n_in, n_live * g]
    rows = np.repeat(order, g, axis=1)  # [k, n_live * g]
    values = np.take_along_axis(w, rows, axis=0).T
    in_cols = np.zeros(n_out, bool)
    in_cols[cols] = True
    b_active, ablated_bias = _split_bias(bias, in_cols)
    padded = bool(len(fans) > 1 or not shared.all())
    return CondensedLinear(
        values=jnp.asarray(values),
        indices=jnp.asarray(order.T.astype(index_dtype(n_in))),
        bias=jnp.asarray(b_active),
        neurons=jnp.asarray(cols.astype(np.int32)),
        ablated_bias=jnp.asarray(ablated_bias),
        n_in=n_in,
        n_out=n_out,
        padded=padded,
        group_size=g,
    )


def structure_layer(kernel, mask, bias=None, *, name: str = "layer") -> StructuredLinear:
    """Structured-only form of one Dense layer: ablated neurons removed, ``[n_in, n_active]``."""
    kernel, mask, bias = _check_layer(kernel, mask, bias, name)
    _, active = fan_in_profile(mask)
    w = np.where(mask, kernel, np.zeros((), kernel.dtype))[:, active]
    b_active, ablated_bias = _split_bias(bias, active)
    return StructuredLinear(
        kernel=jnp.asarray(w),
        bias=jnp.asarray(b_active),
        neurons=jnp.asarray(np.flatnonzero(active).astype(np.int32)),
        ablated_bias=jnp.asarray(ablated_bias),
        n_in=kernel.shape[0],
        n_out=kernel.shape[1],
    )


def validate_condensed(layer: CondensedLinear, name: str = "layer") -> None:
    """Checks a (possibly hand-built or loaded) :class:`CondensedLinear`; raises on bad input.

    Shapes and dtypes always; index and neuron ranges when the arrays are concrete (on the
    host). Kernels never trust a gather to catch a bad index (gathers clamp), so every
    public entry point calls this or the per-call checks of
    :mod:`jaxsparse.condensed.checks`.

    Raises:
        ValueError / TypeError naming ``name`` and the offending field.
    """
    if not isinstance(layer, CondensedLinear):
        raise TypeError(f"{name}: expected a CondensedLinear, got {type(layer).__name__}")
    v, i, b, nrn, ab = (layer.values, layer.indices, layer.bias, layer.neurons,
                        layer.ablated_bias)
    g = layer.group_size
    for field in ("n_in", "n_out"):
        n = getattr(layer, field)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name}: {field} must be a non-negative int, got {n!r}")
    check_operands(jax.ShapeDtypeStruct((layer.n_in,), v.dtype), v, i, b, group_size=g,
                   name=name)
    if nrn.shape != (v.shape[0],) or nrn.dtype != jnp.int32:
        raise ValueError(
            f"{name}: neurons must be int32[{v.shape[0]}], got {nrn.dtype}{list(nrn.shape)}"
        )
    if ab.shape != (layer.n_out,) or ab.dtype != v.dtype:
        raise ValueError(
            f"{name}: ablated_bias must be {v.dtype}[{layer.n_out}], got "
            f"{ab.dtype}{list(ab.shape)}"
        )
    if v.shape[0] > layer.n_out:
        raise ValueError(f"{name}: {v.shape[0]} active neurons but n_out={layer.n_out}")
    check_index_range(i, layer.n_in, what="indices", bound="n_in", name=name)
    if not is_traced(nrn):
        check_index_range(nrn, layer.n_out, what="neurons", bound="n_out", name=name)
        nh = np.asarray(nrn)
        if nh.size > 1 and not (np.diff(nh) > 0).all():
            pos = int(np.flatnonzero(np.diff(nh) <= 0)[0]) + 1
            raise ValueError(
                f"{name}: neurons must be strictly increasing positions, but neurons[{pos}] "
                f"= {int(nh[pos])} follows {int(nh[pos - 1])}"
            )


# ----------------------------------------------------------------------------- forward


def expand(y: jax.Array, layer: CondensedLinear | StructuredLinear) -> jax.Array:
    """Places ``[..., n_active]`` outputs back at their ``n_out`` positions.

    Ablated neurons get their (constant) bias, so ``expand(condensed_dense(x, l), l)`` equals
    the masked dense layer ``x @ (kernel * mask) + bias``.
    """
    if layer.n_active == layer.n_out:
        return y  # neurons == arange(n_out)
    base = jnp.broadcast_to(layer.ablated_bias.astype(y.dtype), (*y.shape[:-1], layer.n_out))
    return base.at[..., layer.neurons].set(y)


def to_dense(layer: CondensedLinear | StructuredLinear) -> tuple[jax.Array, jax.Array]:
    """Rebuilds ``(kernel * mask, bias)`` of the dense layer (for tests and round trips)."""
    if isinstance(layer, StructuredLinear):
        cols = layer.kernel
    else:
        cols = jnp.zeros((layer.n_in, layer.n_active), layer.values.dtype)
        rows = jnp.repeat(layer.indices.astype(jnp.int32), layer.group_size, axis=0)
        cols = cols.at[rows, jnp.arange(layer.n_active, dtype=jnp.int32)[:, None]].add(
            layer.values
        )
    kernel = jnp.zeros((layer.n_in, layer.n_out), cols.dtype).at[:, layer.neurons].set(cols)
    bias = layer.ablated_bias.at[layer.neurons].set(layer.bias)
    return kernel, bias


# ----------------------------------------------------------------------------- whole tree


def condense(params: PyTree, masks: PyTree, *, pad: bool = False,
             group_size: int = 1) -> dict[str, CondensedLinear]:
    """Condenses every sparse 2-D Dense kernel of a params tree.

    Each masked leaf named ``.../kernel`` of rank 2 becomes one :class:`CondensedLinear`,
    using the sibling ``.../bias`` if there is one (``pad`` and ``group_size`` as in
    :func:`condense_layer`). Masked leaves of other ranks (conv
    kernels) are not condensed; they raise unless excluded from the masks.

    Returns:
        ``{layer path: CondensedLinear}``, the layer path being the kernel's path without
        the trailing ``/kernel`` (e.g. ``params/Dense_0``).

    Example:
        >>> layers = jaxsparse.condense(params, jaxsparse.get_masks(opt_state))
        >>> layers["params/Dense_0"].indices.dtype
        dtype('int16')
    """
    p_flat, _ = jax.tree_util.tree_flatten_with_path(params)
    by_path = {path_to_str(p): x for p, x in p_flat}
    m_flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
    out = {}
    for p, m in m_flat:
        if m is None:
            continue
        path = path_to_str(p)
        if path not in by_path:
            raise ValueError(f"mask entry {path!r} has no params leaf")
        prefix, _, leaf = path.rpartition("/")
        if leaf != "kernel" or np.ndim(m) != 2:
            raise ValueError(
                f"{path}: only 2-D Dense kernels (named 'kernel') can be condensed, got a "
                f"mask of shape {np.shape(m)}; set its mask to None or condense it yourself"
            )
        bias = by_path.get(f"{prefix}/bias" if prefix else "bias")
        out[prefix] = condense_layer(by_path[path], m, bias, pad=pad, group_size=group_size,
                                     name=path)
    return out
