"""Training on the condensed form: constant fan-in Dense layers that never hold a dense kernel.

A Dense layer with ``n_in`` inputs, ``n_out`` neurons and constant fan-in ``k`` is stored as

* ``values [n_out, k]``: the weights (a trainable parameter),
* ``indices [n_out, k]``: their input positions, ascending within a neuron (structure, not a
  parameter: kept outside the params, so an optax optimizer never sees it),
* ``bias [n_out]``,

and computes ``y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]``. The
params and the optimizer's moments then scale with ``nnz = n_out * k``, not with
``n_in * n_out``. The layout has a static shape, so one compiled step serves the whole run.
SRigL's neuron ablation uses the *padded* layout (:func:`pad_condensed`): ``capacity``
slots per neuron, of which neuron ``i`` uses the first ``fan[i]`` (0 when ablated, ``k'``
otherwise); the padding holds zeros and gets no gradient.

Pieces, each a pure function:

* conversion, exact both ways: :func:`condense_for_training` / :func:`expand_from_training`
  (one layer) and :func:`condense_params` / :func:`expand_params` (a params tree and its
  masks). Masks that are not constant fan-in are refused naming the leaf.
* :func:`condensed_linear`: the layer as a ``jax.custom_vjp`` whose backward is
  ``dvalues`` (per-slot dot products) and ``dx`` (scatter-add through the index lists);
  the jnp formulas in :mod:`jaxsparse.condensed.kernels.train_cpu` are the reference, the
  C++ XLA FFI kernels beside them the fast CPU path (``impl="auto"``).
* :func:`srigl_condensed`: SRigL with constant fan-in (Lasby et al. 2024; neuron ablation
  with ``ablation=True`` on the padded layout) on the condensed form. The optimizer state
  exists for ``values`` only; at a topology update the rule is
  :func:`jaxsparse.algorithms.structured.srigl_layer`'s (same counts, keys and tie-breaks as
  ``jaxsparse.srigl(..., ablation=...)``). The drop is selected on the slots and the
  growth, per neuron, on the dense gradient: given whole (``[n_in, n_out]`` per layer,
  :func:`dense_weight_grads`; the reference, with ``selection="dense"`` running
  ``srigl_layer`` itself, always so with ablation) or as each layer's :class:`GrowthInputs`
  ``(x, dy)`` (:func:`growth_inputs`), from which :func:`grow_blocked` builds ``x^T @ dy``
  one block of neurons at a time (temporaries ``n_in * growth_block``, not ``n_in *
  n_out``; tested equal bit for bit). With ablation the saliency ranks the gradient over
  the whole layer: :func:`srigl_ablation_condensed_layer_blocked` finds its threshold by
  counting passes over the blocks (each pass recomputes the blocks' ``x^T @ dy``), then
  counts, ablates and grows per block, with the same bounded temporaries (tested equal
  bit for bit to the dense-view rule);
  the result is applied to values, indices and every param-shaped leaf of the optimizer
  state by slot moves. One compiled step (``lax.cond``), or a host loop over a ``"skip"``
  and an ``"update"`` program (``step(..., topology=...)``) that keeps the update's dense
  temporaries out of the plain steps.
* :class:`CondensedTrainDense`: a linen layer that trains this way;
  :func:`dense_weight_grads`, the dense gradient the topology update grows by, and
  :func:`growth_inputs`, its two factors per layer (computed only when called: in a train
  step, inside the update branch).

Example:
    >>> cparams, indices = condense_params(params, masks)        # from a masked dense model
    >>> tx = srigl_condensed(optax.adam(1e-3), key=jax.random.key(0), end_step=5000)
    >>> state = tx.init(cparams, indices)
    >>> def step(cparams, state, x, y):
    ...     idx = get_indices(state)
    ...     grads = jax.grad(loss)(cparams, idx, x, y)
    ...     return tx.step(grads, state, cparams,   # per layer GrowthInputs(x, dy)
    ...                    dense_grads=lambda: layer_inputs_and_output_grads(cparams, idx, x, y))

Limits: Dense layers only (2-D kernels); with ablation a neuron holds at most ``capacity``
weights (a smaller capacity than the masked rule's ``k'`` keeps more neurons active
instead), and the memory-bounded update (:class:`GrowthInputs`) multiplies each layer out
several times (a few counting passes for the saliency threshold, one for the salient counts,
one for the growth) where the whole-layer one does it once; float32 for the C++ kernels
(other dtypes run the jnp reference); one index list per neuron (no group-shared layout).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jaxsparse import schedules, topology
from jaxsparse.algorithms.structured import (
    _tau,
    fan_ins_after_ablation,
    min_neurons,
    output_layer_path,
    srigl_drop_count,
    srigl_layer,
)
from jaxsparse.condensed.checks import (
    INDEX_DTYPES,
    bad_rows,
    check_index_range,
    check_operands,
    clamp,
    is_traced,
    poison_rows,
)
from jaxsparse.condensed.export import index_dtype as smallest_index_dtype
from jaxsparse.condensed.kernels import train_cpu
from jaxsparse.condensed.reference import condensed_matmul_reference
from jaxsparse.masks import is_none, path_to_str
from jaxsparse.transform import all_finite

PyTree = Any

IMPLS = ("auto", "xla", "cpu")

# ----------------------------------------------------------------------------- conversion


def _host(x, what: str, name: str) -> np.ndarray:
    if is_traced(x):
        raise TypeError(f"{name}: {what} is a traced value; conversion to the condensed form "
                        "runs on the host (the fan-in k is a shape). Call it outside jit.")
    return np.asarray(x)


def condense_for_training(kernel, mask, bias=None, *, index_dtype=None, name: str = "layer"):
    """One masked Dense layer -> ``(values [n_out, k], indices [n_out, k], bias)``, exactly.

    Args:
        kernel: ``[n_in, n_out]`` weights (entries outside the mask are ignored).
        mask: ``bool[n_in, n_out]`` with the same number ``k >= 1`` of active inputs in every
            column (SRigL without ablation, ``random_mask_per_neuron``).
        bias: optional ``[n_out]`` (returned as is; ``None`` stays ``None``).
        index_dtype: int8/int16/int32; default the smallest that holds ``n_in - 1``.
        name: the leaf named in error messages.

    Raises:
        ValueError: not 2-D, shapes differ, a column with another fan-in than the others
            (named, with its count), an all-zero column, or ``n_in`` too large for
            ``index_dtype``. TypeError: a non-bool mask, a traced argument.

    Example:
        >>> values, indices, bias = condense_for_training(w, mask, b, name="dense0")
        >>> w2, mask2 = expand_from_training(values, indices, n_in=w.shape[0])  # == w*mask
    """
    kernel = _host(kernel, "kernel", name)
    mask = _host(mask, "mask", name)
    if kernel.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D Dense kernel [n_in, n_out], got shape "
                         f"{kernel.shape}")
    if mask.dtype != np.bool_:
        raise TypeError(f"{name}: mask must be a bool array, got dtype {mask.dtype}")
    if mask.shape != kernel.shape:
        raise ValueError(f"{name}: mask shape {mask.shape} does not match kernel shape "
                         f"{kernel.shape}")
    n_in, n_out = kernel.shape
    fan = mask.sum(axis=0)
    if n_out == 0 or n_in == 0:
        raise ValueError(f"{name}: empty layer {kernel.shape}")
    k = int(fan[0])
    off = np.flatnonzero(fan != k)
    if k == 0 or off.size:
        col = int(off[0]) if off.size else 0
        raise ValueError(
            f"{name}: condensed training needs constant fan-in (every neuron the same number "
            f"k >= 1 of active inputs), but neuron 0 has {k} and neuron {col} has "
            f"{int(fan[col])} ({np.unique(fan).size} distinct fan-ins). Train with "
            "jaxsparse.srigl(..., ablation=False), or condense for inference with "
            "jaxsparse.condense(..., pad=True).")
    idt = np.dtype(smallest_index_dtype(n_in) if index_dtype is None else index_dtype)
    if idt not in [np.dtype(d) for d in INDEX_DTYPES]:
        raise TypeError(f"{name}: index_dtype must be int8, int16 or int32, got {idt}")
    if n_in - 1 > np.iinfo(idt).max:
        raise ValueError(f"{name}: n_in={n_in} inputs do not fit index dtype {idt} (index "
                         "overflow); use a wider index_dtype")
    # Column-major nonzeros are ordered by neuron, then ascending input: exactly k per neuron.
    rows = np.nonzero(mask.T)[1].reshape(n_out, k)
    values = np.take_along_axis(kernel.T, rows, axis=1)
    if bias is not None:
        bias = _host(bias, "bias", name)
        if bias.shape != (n_out,):
            raise ValueError(f"{name}: bias shape {bias.shape} does not match n_out={n_out}")
        bias = jnp.asarray(bias)
    return jnp.asarray(values), jnp.asarray(rows.astype(idt)), bias


def live_slots(fan: jax.Array, capacity: int) -> jax.Array:
    """``bool[n_out, capacity]``: slot ``s`` of neuron ``i`` holds a weight iff ``s < fan[i]``
    (the padded layout of :func:`pad_condensed`; jit-safe)."""
    return jnp.arange(capacity, dtype=jnp.int32)[None, :] < jnp.asarray(fan, jnp.int32)[:, None]


def _dense_positions(indices: jax.Array, n_in: int, fan) -> tuple[jax.Array, jax.Array]:
    """``(rows, cols)`` of every slot in the ``[n_in, n_out]`` view; padded slots (``fan``)
    get row ``n_in``, which ``mode="drop"`` scatters ignore."""
    n_out = indices.shape[0]
    cols = jnp.broadcast_to(jnp.arange(n_out, dtype=jnp.int32)[:, None], indices.shape)
    rows = indices.astype(jnp.int32)
    if fan is not None:
        rows = jnp.where(live_slots(fan, indices.shape[1]), rows, n_in)
    return rows, cols


def to_mask(indices: jax.Array, n_in: int, fan=None) -> jax.Array:
    """``bool[n_in, n_out]``: the dense mask of ``indices [n_out, k]`` (jit-safe); with
    ``fan [n_out]`` only each neuron's first ``fan[i]`` slots count (padded layout)."""
    rows, cols = _dense_positions(indices, n_in, fan)
    return jnp.zeros((n_in, indices.shape[0]), bool).at[rows, cols].set(True, mode="drop")


def expand_from_training(values: jax.Array, indices: jax.Array, n_in: int, fan=None):
    """``(kernel [n_in, n_out], mask)``: the masked dense layer of a condensed one (jit-safe).

    ``fan [n_out]``: live slots per neuron of a padded layout (:func:`pad_condensed`); the
    padding writes nothing. Indices outside ``[0, n_in)`` write nothing (``mode="drop"``);
    check them first (:func:`validate_indices`) when they come from outside.
    """
    rows, cols = _dense_positions(indices, n_in, fan)
    kernel = jnp.zeros((n_in, values.shape[0]), values.dtype).at[rows, cols].set(
        values, mode="drop")
    return kernel, to_mask(indices, n_in, fan)


def validate_indices(indices, n_in: int, *, name: str = "layer", fan=None) -> None:
    """Raises ``ValueError`` naming the layer when concrete ``indices [n_out, k]`` has an entry
    outside ``[0, n_in)`` or a neuron reads one input twice among its live slots (all slots,
    or the first ``fan[i]`` of neuron ``i``); traced indices are not checked."""
    if indices.ndim != 2:
        raise ValueError(f"{name}: indices must be [n_out, k], got shape {indices.shape}")
    if jnp.dtype(indices.dtype) not in [jnp.dtype(d) for d in INDEX_DTYPES]:
        raise TypeError(f"{name}: indices must be int8, int16 or int32, got {indices.dtype}")
    if is_traced(indices) or is_traced(fan):
        return
    check_index_range(indices, n_in, name=name)
    a = np.asarray(indices).astype(np.int64)
    if fan is not None:
        fan = np.asarray(fan)
        if fan.shape != (a.shape[0],) or (fan < 0).any() or (fan > a.shape[1]).any():
            raise ValueError(f"{name}: fan must be [n_out={a.shape[0]}] in [0, {a.shape[1]}], "
                             f"got shape {fan.shape}, range [{fan.min()}, {fan.max()}]")
        pad = np.arange(a.shape[1])[None, :] >= fan[:, None]
        a = np.where(pad, -1 - np.arange(a.shape[1])[None, :], a)  # distinct, never inputs
    a = np.sort(a, axis=1)
    dup = np.flatnonzero((a[:, 1:] == a[:, :-1]).any(axis=1))
    if dup.size:
        raise ValueError(f"{name}: neuron {int(dup[0])} reads one input twice; each neuron's "
                         "indices must be distinct")


def _split_path(path: str) -> tuple[str, str]:
    head, _, leaf = path.rpartition("/")
    return head, leaf


def _flat_paths(tree, is_leaf=None) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {path_to_str(p): x for p, x in flat}


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, x in flat.items():
        node = out
        *heads, leaf = path.split("/")
        for h in heads:
            node = node.setdefault(h, {})
        node[leaf] = x
    return out


def condense_params(params: PyTree, masks: PyTree, *, index_dtype=None):
    """A masked params tree (nested dicts) -> ``(condensed params, indices tree)``.

    Every masked ``.../kernel`` leaf (2-D) becomes ``.../values [n_out, k]`` beside its bias;
    its indices go to ``indices`` at ``.../indices``. Leaves without a mask (``None``) are
    copied unchanged. The result is what :class:`CondensedTrainDense` layers of the same
    names hold (``{"params": cparams, "sparsity": indices}``).

    Raises:
        ValueError / TypeError naming the leaf: a masked leaf that is not a 2-D ``kernel``,
        non-constant fan-in, masks and params of different structure.
    """
    p_flat = _flat_paths(params)
    m_flat = _flat_paths(masks, is_leaf=is_none)
    if set(m_flat) - set(p_flat):
        extra = sorted(set(m_flat) - set(p_flat))[0]
        raise ValueError(f"mask leaf {extra!r} has no params leaf")
    out, idx = {}, {}
    for path, x in p_flat.items():
        m = m_flat.get(path)
        if m is None:
            out[path] = x
            continue
        head, leaf = _split_path(path)
        if leaf != "kernel" or np.ndim(x) != 2:
            raise ValueError(f"{path}: condensed training covers 2-D Dense kernels named "
                             f"'kernel'; this masked leaf has shape {np.shape(x)}")
        v, i, _ = condense_for_training(x, m, index_dtype=index_dtype, name=path)
        out[f"{head}/values" if head else "values"] = v
        idx[f"{head}/indices" if head else "indices"] = i
    return _nest(out), _nest(idx)


def expand_params(cparams: PyTree, indices: PyTree, n_in: dict[str, int], fan: PyTree = None):
    """Inverse of :func:`condense_params` (and of :func:`pad_condensed`): ``(masked dense
    params, masks)``.

    Args:
        cparams, indices: as :func:`condense_params` returns them.
        n_in: input width of each condensed layer, by the layer's path (``"dense0"``).
        fan: for a padded layout, the live slots per neuron (the structure of ``indices``,
            ``int[n_out]`` leaves: :func:`pad_condensed`, ``CondensedState.fan``); ``None``:
            every slot is live.

    Returns:
        Params with ``.../kernel [n_in, n_out]`` (zero outside the mask) in place of
        ``values`` and a masks tree (bool at kernels, ``None`` elsewhere).
    """
    c_flat = _flat_paths(cparams)
    i_flat = _flat_paths(indices)
    f_flat = {} if fan is None else _flat_paths(fan)
    out, masks = {}, {}
    for path, x in c_flat.items():
        head, leaf = _split_path(path)
        ipath = f"{head}/indices" if head else "indices"
        if leaf != "values" or ipath not in i_flat:
            out[path], masks[path] = x, None
            continue
        if head not in n_in:
            raise ValueError(f"{head}: n_in of this condensed layer is not given")
        if fan is not None and ipath not in f_flat:
            raise ValueError(f"{ipath}: fan has no leaf for this condensed layer")
        kpath = f"{head}/kernel" if head else "kernel"
        f = f_flat.get(ipath)
        validate_indices(i_flat[ipath], n_in[head], name=ipath, fan=f)
        out[kpath], masks[kpath] = expand_from_training(x, i_flat[ipath], n_in[head], f)
    return _nest(out), _nest(masks)


def constant_fan(indices: PyTree, k) -> PyTree:
    """The ``fan`` tree of a padded layout whose neurons all use their first ``k`` slots:
    the structure of ``indices``, ``int32[n_out]`` leaves; ``k`` an int or ``{layer path:
    int}`` (e.g. for :class:`CondensedTrainDense` layers built with a ``capacity``)."""
    out = {}
    for ipath, idx in _flat_paths(indices).items():
        head, _ = _split_path(ipath)
        kk = k.get(head) if isinstance(k, dict) else k
        if isinstance(kk, bool) or not isinstance(kk, (int, np.integer)):
            raise TypeError(f"{head}: k must be an int, got {kk!r}")
        if not 1 <= kk <= np.shape(idx)[1]:
            raise ValueError(f"{head}: k={kk} must be in [1, {np.shape(idx)[1]}] (the slots)")
        out[ipath] = jnp.full((np.shape(idx)[0],), int(kk), jnp.int32)
    return _nest(out)


def pad_condensed(cparams: PyTree, indices: PyTree, capacity, n_in: dict[str, int]):
    """Constant fan-in condensed layers -> the padded layout that neuron ablation needs.

    SRigL with ablation (:func:`srigl_condensed` with ``ablation=True``) leaves ablated
    neurons with no weights and the others with ``k' = floor(k0 * n_out / n_active) >= k0``
    each. The padded layout keeps static shapes for that: ``values`` and ``indices`` get
    ``capacity`` slots per neuron, of which neuron ``i`` uses the first ``fan[i]``
    (ascending inputs); the rest hold value 0 and index 0 and are masked out of the
    gradients, the optimizer state and every conversion.

    Args:
        cparams, indices: constant fan-in ``k`` layers (:func:`condense_params`).
        capacity: slots per neuron, an int for every layer or ``{layer path: int}`` (layers
            not named stay unpadded); ``k <= capacity <= n_in``. The rule never gives a
            neuron more than ``capacity`` weights (see :func:`srigl_condensed`); with
            ``capacity = n_in`` it is exactly the masked rule.
        n_in: input width of each condensed layer, by the layer's path.

    Returns:
        ``(cparams, indices, fan)``: ``fan`` has the structure of ``indices`` with
        ``int32[n_out]`` leaves (``k`` everywhere), for ``srigl_condensed(...).init(cparams,
        indices, fan)`` and :func:`expand_params`.

    Raises:
        ValueError naming the layer: capacity below ``k`` or above ``n_in``, a layer without
        ``n_in``.
    """
    p_flat = dict(_flat_paths(cparams))
    i_flat = _flat_paths(indices)
    idx_out = {}
    for ipath, idx in i_flat.items():
        head, _ = _split_path(ipath)
        vpath = f"{head}/values" if head else "values"
        k = np.shape(idx)[1]
        cap = capacity.get(head, k) if isinstance(capacity, dict) else capacity
        if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)):
            raise TypeError(f"{head}: capacity must be an int, got {cap!r}")
        if head not in n_in:
            raise ValueError(f"{head}: n_in of this condensed layer is not given")
        if not k <= cap <= n_in[head]:
            raise ValueError(f"{head}: capacity={cap} must be in [k={k}, n_in={n_in[head]}]")
        pad = ((0, 0), (0, int(cap) - k))
        p_flat[vpath] = jnp.pad(jnp.asarray(p_flat[vpath]), pad)
        idx_out[ipath] = jnp.pad(jnp.asarray(idx), pad)
    fan = constant_fan(indices, {_split_path(ip)[0]: int(np.shape(i)[1])
                                 for ip, i in i_flat.items()})
    return _nest(p_flat), _nest(idx_out), fan


# ----------------------------------------------------------------------------- the layer op

_warned = {"cpu": False}


def choose_train_impl(impl: str, dtype) -> str:
    """``"cpu"`` (C++ kernels) or ``"xla"`` (the jnp reference formulas) for ``impl``.

    ``"auto"`` picks the C++ kernels on the CPU backend for float32 when they build, else
    the reference; ``"cpu"`` demands the kernels (``RuntimeError`` when unavailable).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "xla":
        return "xla"
    usable = jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu"
    if impl == "cpu":
        if not usable:
            raise ValueError(f"impl='cpu' needs float32 on the CPU backend, got {dtype} on "
                             f"{jax.default_backend()}")
        if not train_cpu.available():
            raise RuntimeError(f"condensed training kernels unavailable: "
                               f"{train_cpu.unavailable_reason()}")
        return "cpu"
    if not usable:
        return "xla"
    if train_cpu.available():
        return "cpu"
    if not _warned["cpu"]:
        _warned["cpu"] = True
        warnings.warn("jaxsparse: the condensed training kernels are unavailable "
                      f"({train_cpu.unavailable_reason()}); using the jnp formulation.",
                      RuntimeWarning, stacklevel=3)
    return "xla"


def _forward(x, values, indices, bias, impl: str):
    if impl == "cpu":
        return train_cpu.condensed_forward_cpu(x, values, indices, bias)
    return condensed_matmul_reference(x, values, indices, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _linear(x, values, bias, indices, impl):
    return _forward(x, values, indices, bias, impl)


def _linear_fwd(x, values, bias, indices, impl):
    return _forward(x, values, indices, bias, impl), (x, values, indices)


def _linear_bwd(impl, res, dy):
    x, values, indices = res
    n_in = x.shape[-1]
    bias_grad = jnp.sum(dy.reshape(-1, dy.shape[-1]).astype(jnp.float32), axis=0
                        ).astype(values.dtype)
    if impl == "cpu":  # the kernels range-check the indices (an error on a bad one)
        dv = train_cpu.condensed_dvalues_cpu(x, dy, indices)
        dx = train_cpu.condensed_dx_cpu(dy, values, indices, n_in)
        return dx, dv, bias_grad, None
    # Reference: reads through clamped indices; a neuron with a bad index gets NaN gradients
    # and, as its contributions went to the wrong inputs, so does every dx entry.
    bad = bad_rows(indices, n_in)
    safe = clamp(indices, n_in)
    dv = poison_rows(train_cpu.condensed_dvalues_reference(x, dy, safe).T, bad).T
    dx = train_cpu.condensed_dx_reference(dy, values, safe, n_in)
    dx = jnp.where(jnp.any(bad), jnp.full((), jnp.nan, dx.dtype), dx)
    return dx, dv, bias_grad, None


_linear.defvjp(_linear_fwd, _linear_bwd)


def condensed_linear(x: jax.Array, values: jax.Array, indices: jax.Array,
                     bias: jax.Array | None = None, *, impl: str = "auto") -> jax.Array:
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]``, differentiable.

    Gradients (``jax.custom_vjp``): ``dvalues`` by per-slot dot products, ``dx`` by a
    scatter-add through the index lists, ``dbias`` a sum; ``indices`` gets none. The C++
    kernels (``impl="cpu"``; ``"auto"`` on CPU for float32) and the jnp reference
    (``"xla"``) are tested equal, and against the masked dense layer.

    Args:
        x: ``[..., n_in]``.
        values: ``[n_out, k]``, the dtype of ``x``.
        indices: ``[n_out, k]`` int8/int16/int32 in ``[0, n_in)``.
        bias: optional ``[n_out]``.
        impl: ``"auto"``, ``"xla"`` or ``"cpu"``.

    Raises:
        ValueError / TypeError: bad shapes or dtypes, a concrete index out of range. A traced
        bad index gives NaN (reference) or a run-time error (C++), never a wrong number.

    Example:
        >>> y = condensed_linear(x, values, indices, bias)
        >>> dv = jax.grad(lambda v: condensed_linear(x, v, indices).sum())(values)
    """
    check_operands(x, values, indices, bias, name="condensed_linear")
    check_index_range(indices, x.shape[-1], name="condensed_linear")
    path = choose_train_impl(impl, x.dtype)
    if bias is None:
        return _linear(x, values, jnp.zeros((values.shape[0],), values.dtype), indices, path)
    return _linear(x, values, bias, indices, path)


# ----------------------------------------------------------------------------- topology


def _running_counts(mask: jax.Array, block: int = 64) -> jax.Array:
    """``int32[n_out, n_in]``: active inputs of each neuron up to and including each input.

    A blocked prefix sum (a matmul with a triangular block, exact in float32 below 2**24,
    then the block offsets): XLA's CPU cumsum over a long axis is several times slower.
    """
    n_in, n_out = mask.shape
    n_blocks = -(-n_in // block)
    x = jnp.pad(mask.T.astype(jnp.float32), ((0, 0), (0, n_blocks * block - n_in)))
    x = x.reshape(n_out, n_blocks, block)
    within = jnp.einsum("obi,ij->obj", x, jnp.triu(jnp.ones((block, block), jnp.float32)))
    totals = within[:, :, -1]
    offsets = jnp.cumsum(totals, axis=1) - totals
    counts = (within + offsets[:, :, None]).reshape(n_out, n_blocks * block)[:, :n_in]
    return counts.astype(jnp.int32)


def mask_to_indices(mask: jax.Array, k: int, dtype=jnp.int32, *, pad: bool = False
                    ) -> jax.Array:
    """``[n_out, k]`` ascending input positions of a constant fan-in ``bool[n_in, n_out]``
    mask (jit-safe; the caller guarantees exactly ``k`` per column): slot ``s`` of a neuron
    is the first input where its running count reaches ``s + 1``. ``pad=True``: a column may
    have fewer than ``k`` (at most ``k``: the caller's guarantee); its missing slots get
    index 0 (the padded layout, :func:`pad_condensed`)."""
    if mask.shape[0] - 1 > np.iinfo(np.int32).max or mask.shape[0] >= 2**24:
        raise ValueError(f"mask_to_indices: n_in={mask.shape[0]} is too large")
    targets = jnp.arange(1, k + 1, dtype=jnp.int32)
    counts = _running_counts(mask)
    slots = jax.vmap(lambda c: jnp.searchsorted(c, targets, side="left", method="scan"))(counts)
    if pad:  # a target beyond the column's count is not found: searchsorted gives n_in
        slots = jnp.where(slots < mask.shape[0], slots, 0)
    return slots.astype(dtype)


def random_indices(key: jax.Array, n_in: int, n_out: int, k: int, dtype=jnp.int32):
    """``k`` distinct random inputs per neuron (``topology.random_mask_per_neuron``)."""
    mask = topology.random_mask_per_neuron(key, (n_in, n_out), k)
    return mask_to_indices(mask, k, dtype)


def move_slots(a: jax.Array, src: jax.Array) -> jax.Array:
    """``out[i, s] = a[i, src[i, s]]`` where ``src >= 0``, else 0 (a grown slot)."""
    moved = jnp.take_along_axis(a, jnp.maximum(src, 0).astype(jnp.int32), axis=1)
    return jnp.where(src >= 0, moved, jnp.zeros((), a.dtype))


SELECTIONS = ("slots", "dense")


def _view_ranks(tie_key: jax.Array, rows: jax.Array, cols: jax.Array, n_out: int
                ) -> jax.Array:
    """The keyed tie ranks (``topology.tie_ranks``) of the positions ``(rows, cols)`` (int
    arrays, broadcast together) of a whole ``[n_in, n_out]`` view, computed for those
    positions only: ``tie_ranks``' position is ``offset + row * s + col``, here with a 1x1
    shape and the global positions as the offset."""
    pos = rows.astype(jnp.uint32) * jnp.uint32(n_out) + cols.astype(jnp.uint32)
    return topology.tie_ranks((1, 1), tie_key, whole=False, offset=pos)


def _drop_on_slots(values, indices, n_keep, key, live=None):
    """``bool[n_out, k]``: the slots that survive the drop, as ``topology.top_k_mask(|W|,
    n_keep, where=mask, tie_key=key)`` on the dense view would choose them.

    The same keys (``sortable_key(|w|)``) and tie ranks (the dense positions' keyed hash,
    ``tie_ranks`` of the ``[n_in, n_out]`` view) with the candidates being exactly the
    slots (the ``live`` ones of a padded layout), so the top ``n_keep`` (key, rank) pairs
    are the same set; the scores are ``nnz`` long instead of ``n_in * n_out``.
    """
    n_out, k = values.shape
    keys = topology.candidate_keys(jnp.abs(values).astype(jnp.float32), live)
    cols = jnp.arange(n_out, dtype=jnp.int32)[:, None]
    ranks = _view_ranks(key, indices.astype(jnp.int32), cols, n_out)
    return topology.select_by_counting(keys, ranks, n_keep, whole=True)


def srigl_condensed_layer(values: jax.Array, indices: jax.Array, dense_grad: jax.Array,
                          key: jax.Array, *, fraction, selection: str = "slots"
                          ) -> tuple[jax.Array, jax.Array]:
    """One constant fan-in SRigL update of one condensed layer.

    The rule is :func:`jaxsparse.algorithms.structured.srigl_layer` (``ablation=False``,
    budget ``k * n_out``), with its counts, scores, keys and tie-breaks, so the result is
    that of the masked run: drop the ``floor(fraction * nnz)`` smallest ``|W|`` of the
    layer, then regrow every neuron back to ``k`` by ``|dense_grad|``.

    ``selection="dense"`` runs ``srigl_layer`` itself on the layer's dense view (the
    reference). ``"slots"`` (default, tested equal) selects the drop on the ``nnz`` slots
    (without ablation every neuron keeps at most ``k`` weights, so ``srigl_layer``'s
    per-neuron trim of the kept set is the identity and is skipped); only the growth, which
    ranks every input of every neuron by its gradient, is dense.

    Args:
        values: ``[n_out, k]`` current weights (before this step's optimizer update).
        indices: ``[n_out, k]`` ascending input positions.
        dense_grad: ``[n_in, n_out]`` gradient of the loss w.r.t. the dense effective weight.
        key: this layer's PRNG key (tie-breaks).
        fraction: drop fraction (traced ok).
        selection: ``"slots"`` or ``"dense"``.

    Returns:
        ``(new_indices, src)``: the new ascending positions, and for each new slot the old
        slot holding the same input (``-1``: grown, starts at zero with fresh moments).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    n_in, n_out = dense_grad.shape
    k = values.shape[1]
    if selection == "dense":
        weight, mask = expand_from_training(values, indices, n_in)
        new_mask = srigl_layer(mask, weight, dense_grad.astype(weight.dtype), key, k0=k,
                               fraction=fraction, gamma_sal=0.0, ablation=False,
                               min_neurons=n_out, tau=1)
    else:
        # The keys and counts of srigl_layer (same split of the key, same float32 count).
        k_keep, _, _, k_fill = jax.random.split(key, 4)
        budget = jnp.asarray(k * n_out, jnp.int32)
        n_drop = jnp.floor(jnp.asarray(fraction, jnp.float32) * budget.astype(jnp.float32)
                           ).astype(jnp.int32)
        kept = _drop_on_slots(values, indices, budget - n_drop, k_keep)
        cols = jnp.broadcast_to(jnp.arange(n_out, dtype=jnp.int32)[:, None], (n_out, k))
        keep = jnp.zeros((n_in, n_out), bool).at[indices.astype(jnp.int32), cols].max(
            kept, mode="drop")
        need = k - jnp.sum(kept, axis=1, dtype=jnp.int32)
        grow = topology.top_k_per_neuron(jnp.abs(dense_grad), need, where=~keep,
                                         tie_key=k_fill)
        new_mask = keep | grow
    new_indices = mask_to_indices(new_mask, k, indices.dtype)
    return new_indices, slot_sources(indices, new_indices)


class GrowthInputs(NamedTuple):
    """What growth needs of one condensed layer to build its dense gradient block by block.

    The dense weight gradient of a Dense layer is ``x^T @ dy``; keeping the two factors
    costs ``batch * (n_in + n_out)`` numbers instead of ``n_in * n_out``.

    Attributes:
        x: ``[..., n_in]`` the layer's input.
        dy: ``[..., n_out]`` the loss gradient w.r.t. the layer's output (same leading axes).
    """

    x: jax.Array
    dy: jax.Array


def _is_growth_inputs(v) -> bool:
    return isinstance(v, GrowthInputs)


def weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``x^T @ dy``, ``float32 [n_in, n_out]``: the dense weight gradient of a Dense layer
    from its input ``x [..., n_in]`` and output gradient ``dy [..., n_out]`` (float32
    accumulation at ``HIGHEST`` precision on every backend)."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    dy = dy.reshape(-1, dy.shape[-1]).astype(jnp.float32)
    return jnp.einsum("bi,bo->io", x, dy, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)


def growth_scores(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``|x^T @ dy|`` (:func:`weight_grad`): the growth scores of the neurons of ``dy``."""
    return jnp.abs(weight_grad(x, dy))


def _select_per_neuron(keys: jax.Array, ranks: Callable[[], jax.Array], k) -> jax.Array:
    """Per column, the ``k`` largest nonzero ``keys`` with ties to the higher ``ranks()``:
    ``topology``'s rule, by counting on its counting platforms and by sorting elsewhere."""

    def counting(keys, k):
        return topology.select_by_counting(keys, ranks(), k, whole=False)

    def sorting(keys, k):
        return topology.select_by_sorting(keys, ranks(), k, whole=False)

    return jax.lax.platform_dependent(keys, jnp.asarray(k, jnp.int32), default=sorting,
                                      **{p: counting for p in topology.COUNTING_PLATFORMS})


def _neuron_blocks(n_out: int, block) -> tuple[int, jax.Array, jax.Array]:
    """``(size, starts, rows)``: ``n_out`` neurons in blocks of ``size = min(block, n_out)``,
    block ``b`` covering neurons ``starts[b] + rows``. The last block is shifted left to end
    at ``n_out`` (it repeats a few neurons of the one before): every block is a full slice
    of the real neurons."""
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"growth block must be an int >= 1, got {block!r}")
    size = min(int(block), n_out)
    n_blocks = -(-n_out // size)
    starts = jnp.minimum(jnp.arange(n_blocks, dtype=jnp.int32) * size, n_out - size)
    return size, starts, jnp.arange(size, dtype=jnp.int32)


def _scatter_blocks(per_block: jax.Array, starts: jax.Array, rows: jax.Array, n_out: int
                    ) -> jax.Array:
    """``[n_blocks, size, ...]`` per-neuron results -> ``[n_out, ...]`` (a neuron repeated
    by the shifted last block gets the same result from both)."""
    at = (starts[:, None] + rows[None, :]).reshape(-1)
    flat = per_block.reshape(-1, *per_block.shape[2:])
    return jnp.zeros((n_out, *per_block.shape[2:]), per_block.dtype).at[at].set(flat)


def _block_keep(indices: jax.Array, kept: jax.Array, start, size: int, n_in: int
                ) -> jax.Array:
    """``bool[n_in, size]``: the inputs of the ``kept`` slots of neurons ``start + rows``
    (the dense view's columns of one block)."""
    rows = jnp.arange(size, dtype=jnp.int32)
    idx = jax.lax.dynamic_slice_in_dim(indices, start, size).astype(jnp.int32)
    return jnp.zeros((n_in, size), bool).at[idx.T, rows[None, :]].max(
        jax.lax.dynamic_slice_in_dim(kept, start, size).T, mode="drop")


def _block_scores(x: jax.Array, dy: jax.Array, start, size: int, dtype) -> jax.Array:
    """``|x^T @ dy|`` of neurons ``start .. start + size`` (``x [b, n_in]``, ``dy [b,
    n_out]``), the gradient rounded to ``dtype`` first as the dense view's would be."""
    g = weight_grad(x, jax.lax.dynamic_slice_in_dim(dy, start, size, axis=1))
    return jnp.abs(g.astype(dtype))


def _flat_growth_inputs(x: jax.Array, dy: jax.Array, n_out: int, what: str):
    """``(x [b, n_in], dy [b, n_out])`` from ``[..., n_in]`` / ``[..., n_out]``."""
    if dy.shape[-1] != n_out or x.shape[:-1] != dy.shape[:-1]:
        raise ValueError(f"{what}growth inputs x {x.shape} and dy {dy.shape} are not "
                         f"[..., n_in] and [..., n_out={n_out}] with the same leading axes")
    return x.reshape(-1, x.shape[-1]), dy.reshape(-1, n_out)


def _grow_blocks(indices, kept, need, x, dy, tie_key, block, *, dtype, pad: bool):
    """Per neuron, the ``kept`` slots' inputs plus the ``need`` best other inputs by
    ``|x^T @ dy|`` (rounded to ``dtype``), one block of neurons at a time: ``(new indices
    [n_out, k], their counts int32[n_out] or None without pad)``. See
    :func:`grow_blocked`."""
    n_out, k = indices.shape
    n_in = x.shape[-1]
    size, starts, rows = _neuron_blocks(n_out, block)

    def one(start):
        cols = start + rows
        keep = _block_keep(indices, kept, start, size, n_in)
        keys = topology.candidate_keys(_block_scores(x, dy, start, size, dtype), where=~keep)

        def ranks():
            # Computed for this block's positions only (the whole view's ranks sliced
            # would be loop-invariant: XLA hoists and materializes them).
            if tie_key is None:  # earliness down each column, as tie_ranks without a key
                return jnp.broadcast_to(
                    jnp.arange(n_in - 1, -1, -1, dtype=jnp.uint32)[:, None], (n_in, size))
            return _view_ranks(tie_key, jnp.arange(n_in, dtype=jnp.int32)[:, None],
                               cols[None, :], n_out)

        new = keep | _select_per_neuron(keys, ranks, need[cols])
        fan = topology.count_per_neuron(new) if pad else None
        return mask_to_indices(new, k, indices.dtype, pad=pad), fan

    new, fan = jax.lax.map(one, starts)  # [n_blocks, size, k], [n_blocks, size]
    return (_scatter_blocks(new, starts, rows, n_out),
            None if fan is None else _scatter_blocks(fan, starts, rows, n_out))


def grow_blocked(indices: jax.Array, kept: jax.Array, x: jax.Array, dy: jax.Array,
                 tie_key: jax.Array, *, block: int = 256) -> jax.Array:
    """Regrows every neuron to ``k`` by ``|x^T @ dy|``, one block of neurons at a time.

    The rule is ``topology.top_k_per_neuron(growth_scores(x, dy), k - kept.sum(1),
    where=~keep, tie_key=tie_key)`` on the dense ``[n_in, n_out]`` view (``keep``: the kept
    slots' inputs), with the same scores, keys and tie ranks (the keyed hash of each
    position of the whole ``[n_in, n_out]`` view), so the result is the same bit for bit.
    Growth is per neuron, so blocks of ``block`` neurons are independent: a ``lax.map``
    over them needs temporaries of ``n_in * block`` entries, never ``n_in * n_out``.

    Args:
        indices: ``[n_out, k]`` current input positions (ascending).
        kept: ``bool[n_out, k]`` the slots that survive the drop.
        x: ``[..., n_in]`` layer input; dy: ``[..., n_out]`` gradient at its output.
        tie_key: the growth's PRNG key (tie-breaks; ``None``: earlier inputs win ties).
        block: neurons per block (``>= 1``; at most ``n_out`` is used).

    Returns:
        ``[n_out, k]`` the new ascending input positions (dtype of ``indices``).
    """
    n_out, k = indices.shape
    _neuron_blocks(n_out, block)  # checks block
    x, dy = _flat_growth_inputs(x, dy, n_out, "")
    need = k - jnp.sum(kept, axis=1, dtype=jnp.int32)
    return _grow_blocks(indices, kept, need, x, dy, tie_key, block, dtype=jnp.float32,
                        pad=False)[0]


def srigl_condensed_layer_blocked(values: jax.Array, indices: jax.Array,
                                  growth: GrowthInputs, key: jax.Array, *, fraction,
                                  block: int = 256, name: str = "layer"
                                  ) -> tuple[jax.Array, jax.Array]:
    """:func:`srigl_condensed_layer` (``selection="slots"``) with ``dense_grad = x^T @ dy``
    never built: the drop on the slots, the growth by :func:`grow_blocked`. Same result
    bit for bit (tested); the temporaries scale with ``n_in * block + nnz``.

    Args:
        values, indices: ``[n_out, k]`` as for :func:`srigl_condensed_layer`.
        growth: the layer's :class:`GrowthInputs` (``x [..., n_in]``, ``dy [..., n_out]``).
        key: this layer's PRNG key.
        fraction: drop fraction (traced ok).
        block: neurons per growth block.
        name: the layer named in error messages.

    Returns:
        ``(new_indices, src)`` as :func:`srigl_condensed_layer`.
    """
    n_out, k = values.shape
    x, dy = growth
    _flat_growth_inputs(x, dy, n_out, f"{name}: ")
    k_keep, _, _, k_fill = jax.random.split(key, 4)  # srigl_layer's split
    budget = jnp.asarray(k * n_out, jnp.int32)
    n_drop = srigl_drop_count(budget, fraction)
    kept = _drop_on_slots(values, indices, budget - n_drop, k_keep)
    new_indices = grow_blocked(indices, kept, x, dy, k_fill, block=block)
    return new_indices, slot_sources(indices, new_indices)


def slot_sources(old: jax.Array, new: jax.Array, old_fan=None, new_fan=None) -> jax.Array:
    """``int32[n_out, k]``: for each live slot of ``new`` the slot of ``old`` holding the same
    input, ``-1`` where none does (a grown weight) and at padded slots.

    Both lists ascend over their live slots (the first ``fan[i]``; all without ``fan``), so
    a new input's old slot is found by binary search in its neuron's row.
    """
    n_in_bound = np.iinfo(np.int32).max  # above every input: padded old slots match nothing
    k = old.shape[1]
    o, n = old.astype(jnp.int32), new.astype(jnp.int32)
    if old_fan is not None:
        o = jnp.where(live_slots(old_fan, k), o, n_in_bound)
    pos = jax.vmap(lambda a, b: jnp.searchsorted(a, b, method="scan"))(o, n)
    pos = jnp.minimum(pos, k - 1)
    found = jnp.take_along_axis(o, pos, axis=1) == n
    if new_fan is not None:
        found &= live_slots(new_fan, new.shape[1])
    return jnp.where(found, pos, -1)


def _capacity_guard(min_neurons, k0, n_out: int, cap: int, n_in: int, what: str = ""
                    ) -> jax.Array:
    """``min_neurons``, raised so that ``floor(k0 * n_out / n_active)`` fits in ``cap``
    slots (when ``cap < n_in``): at least ``floor(k0 * n_out / (cap + 1)) + 1`` active."""
    if cap > n_in:
        raise ValueError(f"{what}capacity {cap} exceeds n_in={n_in}")
    if cap < n_in:
        return jnp.maximum(min_neurons, k0 * n_out // (cap + 1) + 1)
    return jnp.asarray(min_neurons, jnp.int32)


def srigl_ablation_condensed_layer(values: jax.Array, indices: jax.Array, fan: jax.Array,
                                   dense_grad: jax.Array, key: jax.Array, *, fraction, k0,
                                   tau, min_neurons) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One SRigL update with neuron ablation of one padded condensed layer.

    The rule is :func:`jaxsparse.algorithms.structured.srigl_layer` itself
    (``ablation=True``, budget ``k0 * n_out``: same counts, saliency, threshold, keys and
    tie-breaks as the masked run), on the layer's dense view; the new mask is then written
    back into the padded layout (:func:`pad_condensed`). Active neurons get ``k' =
    floor(k0 * n_out / n_active)`` slots, ablated ones none. A neuron cannot hold more than
    ``capacity`` weights, so at least ``floor(k0 * n_out / (capacity + 1)) + 1`` neurons
    stay active (when ``capacity < n_in``): with a capacity that never binds the result is
    exactly the masked rule's. This is the readable reference: it builds the dense view
    (weights, mask, gradient: several ``[n_in, n_out]`` arrays);
    :func:`srigl_ablation_condensed_layer_blocked` gives the same result from the gradient's
    factors with temporaries of ``n_in * block`` entries.

    Args:
        values, indices: ``[n_out, capacity]`` (the first ``fan[i]`` slots of neuron ``i``
            live, ascending).
        fan: ``int32[n_out]`` live slots per neuron.
        dense_grad: ``[n_in, n_out]`` gradient w.r.t. the dense effective weight.
        key: this layer's PRNG key.
        fraction: drop fraction (traced ok).
        k0, tau, min_neurons: as for ``srigl_layer`` (traced ok).

    Returns:
        ``(new_indices, src, new_fan)``: ``src`` as :func:`slot_sources`.
    """
    n_in, n_out = dense_grad.shape
    k0 = jnp.asarray(k0, jnp.int32)
    min_neurons = _capacity_guard(min_neurons, k0, n_out, values.shape[1], n_in)
    cap = values.shape[1]
    weight, mask = expand_from_training(values, indices, n_in, fan)
    new_mask = srigl_layer(mask, weight, dense_grad.astype(weight.dtype), key, k0=k0,
                           fraction=fraction, gamma_sal=0.0, ablation=True,
                           min_neurons=min_neurons, tau=tau)
    new_indices = mask_to_indices(new_mask, cap, indices.dtype, pad=True)
    new_fan = topology.count_per_neuron(new_mask)
    return new_indices, slot_sources(indices, new_indices, fan, new_fan), new_fan


def srigl_ablation_condensed_layer_blocked(
        values: jax.Array, indices: jax.Array, fan: jax.Array, growth: GrowthInputs,
        key: jax.Array, *, fraction, k0, tau, min_neurons, block: int = 256,
        name: str = "layer") -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`srigl_ablation_condensed_layer` with ``dense_grad = x^T @ dy`` never built.

    Same rule, same result bit for bit (tested), with temporaries of ``n_in * block +
    nnz + n_out`` entries instead of several ``[n_in, n_out]`` arrays:

    * the drop (top ``B - n_drop`` live slots by ``|W|``, layer-wide) on the slots;
    * saliency: the layer-wide top ``n_drop`` of ``|x^T @ dy|`` over every position, as a
      threshold (:func:`jaxsparse.topology.top_k_threshold`) found by counting passes over
      blocks of ``block`` neurons that recompute their scores (one matmul of the layer per
      pass: a few passes after a first one bracketed by a strided sample); then one more
      pass counts each neuron's salient grown positions that are not kept;
    * ablation and the new fan-in ``k'`` from the salient counts
      (:func:`jaxsparse.algorithms.structured.fan_ins_after_ablation`), the per-neuron trim
      of the kept slots to ``k'`` on the slots (slot order is input order: the same
      earliness tie-break);
    * the growth to ``k'`` per neuron, one block at a time as in :func:`grow_blocked`.

    Args:
        values, indices, fan, key, fraction, k0, tau, min_neurons: as for
            :func:`srigl_ablation_condensed_layer`.
        growth: the layer's :class:`GrowthInputs` (``x [..., n_in]``, ``dy [..., n_out]``).
        block: neurons per block (``>= 1``; at most ``n_out`` is used).
        name: the layer named in error messages.

    Returns:
        ``(new_indices, src, new_fan)`` as :func:`srigl_ablation_condensed_layer`.
    """
    n_out, cap = values.shape
    x, dy = _flat_growth_inputs(*growth, n_out, f"{name}: ")
    n_in = x.shape[-1]
    size, starts, rows = _neuron_blocks(n_out, block)
    if n_in * n_out >= 2**31:
        raise ValueError(f"{name}: layer [{n_in}, {n_out}] has >= 2**31 positions")
    k0 = jnp.asarray(k0, jnp.int32)
    min_neurons = _capacity_guard(min_neurons, k0, n_out, cap, n_in, f"{name}: ")
    k_keep, k_grow, k_abl, k_fill = jax.random.split(key, 4)  # srigl_layer's split
    budget = k0 * n_out
    n_drop = srigl_drop_count(budget, fraction)
    kept = _drop_on_slots(values, indices, budget - n_drop, k_keep,
                          live=live_slots(fan, cap))
    positions = jnp.arange(n_in, dtype=jnp.int32)[:, None]

    def block_keys(b):
        """Block ``b``'s growth keys (every position a candidate) and tie ranks."""
        cols = starts[b] + rows
        keys = topology.candidate_keys(_block_scores(x, dy, starts[b], size, values.dtype))
        return keys, (lambda: _view_ranks(k_grow, positions, cols[None, :], n_out))

    def scan(part):
        def one(b):
            keys, ranks = block_keys(b)
            owned = starts[b] + rows >= b * size  # the shifted last block repeats neurons
            return part(jnp.where(owned[None, :], keys, jnp.uint32(0)), ranks)
        return jax.lax.map(one, jnp.arange(starts.shape[0], dtype=jnp.int32))

    row_step, col_step = topology.sample_strides((n_in, n_out))
    sample = topology.candidate_keys(jnp.abs(weight_grad(x[:, ::row_step], dy[:, ::col_step])
                                             .astype(values.dtype)))
    threshold = topology.top_k_threshold(scan, n_drop, n_in * n_out, sample=sample)

    def salient_grown(b):
        """Per neuron of block ``b``: salient grown positions that are not kept."""
        keys, ranks = block_keys(b)
        grown = topology.in_top_k(keys, ranks(), threshold)
        return topology.count_per_neuron(grown & ~_block_keep(indices, kept, starts[b],
                                                                size, n_in))

    grown = _scatter_blocks(jax.lax.map(salient_grown, jnp.arange(starts.shape[0])),
                            starts, rows, n_out)
    counts = jnp.sum(kept, axis=1, dtype=jnp.int32) + grown
    k_vec = fan_ins_after_ablation(counts, n_out=n_out, budget=budget, fan_in=n_in, tau=tau,
                                   min_neurons=min_neurons, key=k_abl)
    # Survivors keep their top k' kept weights by |W|, ties to the earlier slot (= input).
    w_keys = topology.candidate_keys(jnp.abs(values), kept)
    keep = topology.top_k_keys(w_keys.T, k_vec, per_neuron=True).T
    need = k_vec - jnp.sum(keep, axis=1, dtype=jnp.int32)
    new_indices, new_fan = _grow_blocks(indices, keep, need, x, dy, k_fill, block,
                                        dtype=values.dtype, pad=True)
    return new_indices, slot_sources(indices, new_indices, fan, new_fan), new_fan


class CondensedState(NamedTuple):
    """State of :func:`srigl_condensed`.

    Attributes:
        indices: the indices tree (``int[n_out, k]`` at ``.../indices`` per condensed layer).
        inner_state: the wrapped optimizer's state (over the condensed params: values, not
            dense kernels).
        count: ``int32[]`` steps taken.
        key: PRNG key; update ``t`` uses ``fold_in(key, t)``, layer ``j`` ``fold_in(., j)``.
        fan: with ablation, the live slots per neuron (the structure of ``indices``,
            ``int32[n_out]`` leaves; 0 for an ablated neuron); ``None`` without.
        consts: with ablation, per layer (flattening order) ``{"k0", "tau", "output"}``:
            the initial constant fan-in (budget ``k0 * n_out``), the ablation threshold and
            whether it is the output layer (no neuron ablated); ``None`` without.
    """

    indices: PyTree
    inner_state: optax.OptState
    count: jax.Array
    key: jax.Array
    fan: PyTree = None
    consts: Any = None


TOPOLOGY_MODES = ("scheduled", "skip", "update")


class CondensedSparsity(NamedTuple):
    """A condensed sparse optimizer: ``init(params, indices, fan=None)`` and
    ``step(grads, state, params, dense_grads, topology="scheduled") -> (new_params,
    new_state)``.

    ``step`` returns the params rather than additive updates: a topology update moves
    values between slots, which ``params + updates`` cannot express exactly in floating
    point. ``is_update_step(count)`` says whether step ``count`` changes the topology.

    ``topology="scheduled"`` (one compiled step for the whole run) decides under
    ``lax.cond``; XLA then reserves the update branch's dense temporaries for every step.
    A host loop can instead compile two programs, ``"skip"`` (no topology work,
    ``dense_grads`` not needed; memory scales with the nonzeros) and ``"update"`` (always
    updates), and pick one per step with ``is_update_step(state.count)``: the same
    results, the dense temporaries only in the update program.
    """

    init: Callable[[PyTree, PyTree], CondensedState]
    step: Callable[..., tuple[PyTree, CondensedState]]
    is_update_step: Callable[[jax.Array], jax.Array]


def get_indices(state: CondensedState) -> PyTree:
    """The current indices tree (``{"sparsity": get_indices(state)}`` for Flax layers)."""
    return state.indices


def _layers(params: PyTree, indices: PyTree) -> list[tuple[str, str]]:
    """``(values path, indices path)`` of every condensed layer, in flattening order."""
    p_flat = _flat_paths(params)
    pairs = []
    for ipath, idx in _flat_paths(indices).items():
        head, leaf = _split_path(ipath)
        vpath = f"{head}/values" if head else "values"
        if leaf != "indices":
            raise ValueError(f"indices tree leaf {ipath!r} must be named 'indices'")
        if vpath not in p_flat:
            raise ValueError(f"{ipath}: no params leaf {vpath!r} for these indices")
        if np.shape(p_flat[vpath]) != np.shape(idx):
            raise ValueError(f"{ipath}: shape {np.shape(idx)} differs from {vpath} "
                             f"{np.shape(p_flat[vpath])}")
        pairs.append((vpath, ipath))
    if not pairs:
        raise ValueError("the indices tree holds no condensed layer")
    return pairs


def _ablation_consts(pairs, fan_flat, gamma_sal, output_layer) -> list[dict]:
    """Per layer ``{"k0", "tau", "output"}`` (host; ``fan`` concrete and constant per layer)."""
    heads = [_split_path(ip)[0] for _, ip in pairs]
    out = output_layer_path(heads, output_layer, "condensed layer")
    consts = []
    for head, (_, ipath) in zip(heads, pairs):
        f = _host(fan_flat[ipath], "fan", ipath)
        if f.ndim != 1 or f.size == 0 or (f != f[0]).any() or f[0] < 1:
            raise ValueError(f"{ipath}: SRigL starts from constant fan-in k0 >= 1 per neuron; "
                             f"fan has {np.unique(f).tolist()[:5]} (shape {f.shape})")
        k0 = int(f[0])
        consts.append({"k0": jnp.int32(k0), "tau": jnp.int32(_tau(gamma_sal, k0)),
                       "output": jnp.asarray(head == out)})
    return consts


def srigl_condensed(
    inner: optax.GradientTransformation,
    *,
    key: jax.Array,
    end_step: int,
    update_every: int = 100,
    begin_step: int = 0,
    drop_fraction: float = 0.3,
    drop_fraction_decay: str = "cosine",
    selection: str | None = None,
    ablation: bool = False,
    gamma_sal: float = 0.3,
    output_layer: str | None = None,
    growth_block: int = 256,
) -> CondensedSparsity:
    """SRigL (Lasby et al. 2024) trained on the condensed form.

    Same schedule, counts, scores and keys as ``jaxsparse.srigl(inner, ...,
    ablation=ablation)`` on the masked dense model (tested equal: same masks, same params
    to float tolerance), but the params are ``values [n_out, k]`` and the inner optimizer's
    state is built over them, so params + moments scale with the nonzeros. Per step:

    1. at an update step (``periodic(update_every, end_step, begin_step)``, under
       ``lax.cond`` with ``topology="scheduled"``; always with ``"update"``, never with
       ``"skip"``): new indices per layer (:func:`srigl_condensed_layer`, or
       :func:`srigl_ablation_condensed_layer` with ablation; their ``_blocked`` versions
       for :class:`GrowthInputs`), on the pre-step values and the dense gradients or their
       factors (``dense_grads()`` is called inside that branch only);
       non-finite gradients keep the topology for that step;
    2. the inner optimizer's update of every param (values, biases, dense leaves); with
       ablation the gradients of padded slots are zero and padded values stay zero;
    3. at an update step: kept slots move with their values and moments, grown slots start
       at zero with zero moments (every param-shaped leaf of the inner state, through
       ``optax.tree.map_params``: any elementwise optimizer).

    Neuron ablation (``ablation=True``) needs the padded layout of :func:`pad_condensed`
    and its ``fan`` at ``init(params, indices, fan)``: ablated neurons keep their slots
    with ``fan = 0``, survivors use ``k' >= k0`` of their ``capacity`` slots. Where the
    masked rule would give a neuron more than ``capacity`` weights, more neurons stay
    active instead (see :func:`srigl_ablation_condensed_layer`); ``capacity = n_in`` is
    always exact, a smaller one is exact as long as it does not bind. The output layer
    (default: the last condensed layer in flattening order; ``output_layer``, a regex on the
    layer path, as in ``jaxsparse.srigl``) keeps all its neurons; the others keep at least
    ``max(1, floor(k0 * n_out / n_in))``.

    Args:
        inner: any optax optimizer (elementwise in its per-weight state, as Adam, SGD with
            momentum, RMSProp, Lion; a global-norm clip is fine too: the masked gradients
            of the dense run have the same norm).
        key, end_step, update_every, begin_step, drop_fraction, drop_fraction_decay,
        gamma_sal, output_layer: as for ``jaxsparse.srigl``.
        selection: ``"slots"`` (default) or ``"dense"``: the reference, ``srigl_layer`` on
            each layer's dense view (see :func:`srigl_condensed_layer`). With ablation a
            dense gradient always takes the reference
            (:func:`srigl_ablation_condensed_layer`); ``"slots"`` matters for
            :class:`GrowthInputs`.
        ablation: SRigL's neuron ablation (default False: constant fan-in, every slot live).
        growth_block: neurons per block when ``dense_grads`` gives a layer's
            :class:`GrowthInputs` and ``selection="slots"``: the update runs
            :func:`srigl_condensed_layer_blocked` (with ablation
            :func:`srigl_ablation_condensed_layer_blocked`), whose temporaries scale with
            ``n_in * growth_block``. With ``selection="dense"`` the dense gradient is built
            from them whole (:func:`weight_grad`).

    Example:
        >>> tx = srigl_condensed(optax.adam(1e-3), key=jax.random.key(0), end_step=5000)
        >>> state = tx.init(cparams, indices)
        >>> cparams, state = tx.step(grads, state, cparams, dense_grads=lambda: dgrads())
        >>> # with ablation: the padded layout
        >>> cparams, indices, fan = pad_condensed(cparams, indices, 2 * k, n_in)
        >>> tx = srigl_condensed(optax.adam(1e-3), key=key, end_step=5000, ablation=True)
        >>> state = tx.init(cparams, indices, fan)
    """
    if key is None:
        raise ValueError("srigl_condensed needs key=jax.random.key(seed)")
    if selection is None:
        selection = "slots"
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not 0.0 <= gamma_sal <= 1.0:
        raise ValueError(f"gamma_sal must be in [0, 1], got {gamma_sal!r}")
    if (isinstance(growth_block, bool) or not isinstance(growth_block, (int, np.integer))
            or growth_block < 1):
        raise ValueError(f"growth_block must be an int >= 1, got {growth_block!r}")
    fraction = schedules.drop_fraction_schedule(drop_fraction, end_step, drop_fraction_decay)
    is_update_step = schedules.periodic(update_every, end_step, begin_step)

    def init(params, indices, fan=None) -> CondensedState:
        pairs = _layers(params, indices)
        if not ablation:
            if fan is not None:
                raise ValueError("srigl_condensed: fan (a padded layout) is for ablation=True; "
                                 "without ablation every slot is live")
            return CondensedState(indices, inner.init(params), jnp.zeros((), jnp.int32),
                                  jnp.copy(key))
        if fan is None:  # unpadded: every slot live (the capacity then allows no ablation)
            fan = jax.tree.map(lambda i: jnp.full((i.shape[0],), i.shape[1], jnp.int32),
                               indices)
        f_flat = _flat_paths(fan)
        for _, ipath in pairs:
            if ipath not in f_flat:
                raise ValueError(f"{ipath}: fan has no leaf for this condensed layer")
            validate_indices(_flat_paths(indices)[ipath], np.iinfo(np.int32).max, name=ipath,
                             fan=f_flat[ipath])
        fan = jax.tree.map(lambda f: jnp.asarray(f, jnp.int32), fan)
        consts = _ablation_consts(pairs, f_flat, gamma_sal, output_layer)
        return CondensedState(indices, inner.init(params), jnp.zeros((), jnp.int32),
                              jnp.copy(key), fan, consts)

    def step(grads, state: CondensedState, params, dense_grads=None, *,
             topology: str = "scheduled"):
        if topology not in TOPOLOGY_MODES:
            raise ValueError(f"topology must be one of {TOPOLOGY_MODES}, got {topology!r}")
        if dense_grads is None and topology != "skip":
            raise ValueError("srigl_condensed.step needs dense_grads: per condensed layer "
                             "its dense weight gradient or its GrowthInputs(x, dy) (a tree "
                             "or a zero-argument function giving one, called at update steps "
                             "only)")
        if ablation and (state.fan is None or state.consts is None):
            raise ValueError("srigl_condensed(ablation=True).step needs a state from its own "
                             "init (with fan and per-layer constants)")
        pairs = _layers(params, state.indices)
        p_flat = _flat_paths(params)
        i_flat = _flat_paths(state.indices)
        f_flat = _flat_paths(state.fan) if ablation else {}
        fans = [f_flat.get(ip) for _, ip in pairs]
        count = state.count

        def new_topology(_):
            dg = dense_grads() if callable(dense_grads) else dense_grads
            dg_leaves = jax.tree.leaves(dg, is_leaf=_is_growth_inputs)
            if len(dg_leaves) != len(pairs):
                raise ValueError(f"dense_grads has {len(dg_leaves)} leaves for "
                                 f"{len(pairs)} condensed layers")
            finite = all_finite(grads) & all_finite(dg)
            key_t = jax.random.fold_in(state.key, count)
            news, srcs, new_fans = [], [], []
            for j, ((vpath, ipath), g) in enumerate(zip(pairs, dg_leaves)):
                values, idx = p_flat[vpath], i_flat[ipath]
                key_j = jax.random.fold_in(key_t, j)
                if isinstance(g, GrowthInputs):
                    if selection == "slots" and ablation:
                        c = state.consts[j]
                        n_out = values.shape[0]
                        new, src, nf = srigl_ablation_condensed_layer_blocked(
                            values, idx, fans[j], g, key_j, fraction=fraction(count),
                            k0=c["k0"], tau=c["tau"],
                            min_neurons=min_neurons(c["k0"], n_out, g.x.shape[-1],
                                                    c["output"]),
                            block=growth_block, name=ipath)
                        new_fans.append(jnp.where(finite, nf, fans[j]))
                        news.append(jnp.where(finite, new, idx))
                        srcs.append(jnp.where(finite, src, _identity(idx)))
                        continue
                    if selection == "slots":
                        new, src = srigl_condensed_layer_blocked(
                            values, idx, g, key_j, fraction=fraction(count),
                            block=growth_block, name=ipath)
                        news.append(jnp.where(finite, new, idx))
                        srcs.append(jnp.where(finite, src, _identity(idx)))
                        continue
                    if g.x.shape[:-1] != g.dy.shape[:-1]:
                        raise ValueError(f"{ipath}: growth inputs x {g.x.shape} and dy "
                                         f"{g.dy.shape} differ in their leading axes")
                    g = weight_grad(g.x, g.dy)
                if g.ndim != 2 or g.shape[1] != values.shape[0]:
                    raise ValueError(f"{ipath}: dense gradient shape {g.shape} is not "
                                     f"[n_in, n_out={values.shape[0]}]")
                if ablation:
                    c = state.consts[j]
                    n_in, n_out = g.shape
                    new, src, nf = srigl_ablation_condensed_layer(
                        values, idx, fans[j], g, key_j, fraction=fraction(count),
                        k0=c["k0"], tau=c["tau"],
                        min_neurons=min_neurons(c["k0"], n_out, n_in, c["output"]))
                    new_fans.append(jnp.where(finite, nf, fans[j]))
                else:
                    new, src = srigl_condensed_layer(values, idx, g, key_j,
                                                     fraction=fraction(count),
                                                     selection=selection)
                news.append(jnp.where(finite, new, idx))
                srcs.append(jnp.where(finite, src, _identity(idx)))
            return news, srcs, new_fans

        def keep(_):
            return ([i_flat[ip] for _, ip in pairs], [_identity(i_flat[ip]) for _, ip in pairs],
                    [f for f in fans if f is not None])

        if topology == "scheduled":
            update = is_update_step(count)
            news, srcs, new_fans = jax.lax.cond(update, new_topology, keep, None)
        else:
            update = topology == "update"
            news, srcs, new_fans = (new_topology if update else keep)(None)
        if ablation:  # padded slots: no gradient, value zero (ablated neurons hold nothing)
            live = {vp: live_slots(f, p_flat[vp].shape[1]) for (vp, _), f in zip(pairs, fans)}
            grads = _map_values(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)),
                                grads, live)
        updates, inner_state = inner.update(grads, state.inner_state, params)
        new_params = optax.apply_updates(params, updates)
        if ablation:
            new_params = _map_values(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)),
                                     new_params, live)

        src_by_path = {vp: s for (vp, _), s in zip(pairs, srcs)}
        sentinel = jnp.zeros((0,), jnp.int32)
        src_tree = jax.tree.unflatten(
            jax.tree.structure(params),
            [src_by_path.get(p, sentinel) for p in _flat_paths(params)])

        def one(v, s):
            # Only a condensed layer's values (and their per-weight state) have a slot map.
            if s.shape == (0,) or not hasattr(v, "shape") or v.shape != s.shape:
                return v
            return move_slots(v, s)

        def moved(operands):
            p, st = operands
            return (jax.tree.map(one, p, src_tree),
                    optax.tree.map_params(inner, one, st, src_tree))

        if topology == "scheduled":
            new_params, inner_state = jax.lax.cond(update, moved, lambda o: o,
                                                   (new_params, inner_state))
        elif update:
            new_params, inner_state = moved((new_params, inner_state))
        new_indices = jax.tree.unflatten(jax.tree.structure(state.indices), news)
        new_fan = (jax.tree.unflatten(jax.tree.structure(state.fan), new_fans) if ablation
                   else state.fan)
        return new_params, CondensedState(new_indices, inner_state, count + 1, state.key,
                                          new_fan, state.consts)

    return CondensedSparsity(init, step, is_update_step)


def _map_values(fn, tree: PyTree, by_path: dict[str, jax.Array]) -> PyTree:
    """``fn(leaf, by_path[path])`` at the leaves named in ``by_path``; others unchanged."""
    flat = _flat_paths(tree)
    return jax.tree.unflatten(jax.tree.structure(tree),
                              [fn(x, by_path[p]) if p in by_path else x for p, x in flat.items()])


def _identity(idx: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(idx.shape[1], dtype=jnp.int32)[None, :], idx.shape)


# ----------------------------------------------------------------------------- Flax


class CondensedTrainDense(nn.Module):
    """A linen Dense layer trained in condensed form (constant fan-in ``k``).

    Variables: ``params``: ``values [features, slots]``, ``bias [features]``; ``sparsity``:
    ``indices [features, slots]`` (random distinct inputs per neuron at init; structure, so
    ``optax`` only ever sees values and bias); ``slots`` is ``capacity`` (padded layout, for
    ``srigl_condensed(..., ablation=True)``: the first ``k`` slots live at init, the rest
    zero, ``constant_fan(variables["sparsity"], {name: k})`` their ``fan``) or ``k``. With a ``probe`` collection given
    (:func:`dense_weight_grads`), the layer adds ``x @ probe`` (``probe`` all zeros): the
    output is unchanged and the gradient w.r.t. ``probe`` is the dense weight gradient that
    growth needs.

    Attributes:
        features: ``n_out``.
        k: fan-in, ``1 <= k <= n_in``.
        use_bias: add a bias.
        index_dtype: default the smallest int type holding ``n_in - 1``.
        sparse_scaling: initial values with variance ``1 / k`` (sparsity-aware, as
            ``jaxsparse.sparse_init``) instead of the dense layer's ``1 / n_in``.
        impl: ``"auto"``, ``"xla"`` or ``"cpu"`` (see :func:`condensed_linear`).
        capacity: slots per neuron for the padded layout, ``k <= capacity <= n_in``;
            ``None``: ``k`` (unpadded).
        values_init: initializer ``(key, shape, dtype)`` of the ``[features, k]`` live
            values (e.g. ``nn.initializers.normal(0.02)``); ``None``: truncated normal with
            the dense layer's variance (``sparse_scaling``).
        out_axis: logical axis name of the neurons (``values``/``bias`` rows get it, the
            slot axis none; the params are then ``nn.Partitioned`` boxes at init, as with
            ``nn.with_logical_partitioning``); ``None``: unannotated. The indices stay
            unannotated (replicated).

    Example:
        >>> layer = CondensedTrainDense(features=300, k=39)
        >>> variables = layer.init(jax.random.key(0), x)   # {"params", "sparsity"}
        >>> y = layer.apply(variables, x)
    """

    features: int
    k: int
    use_bias: bool = True
    index_dtype: Any = None
    param_dtype: Any = jnp.float32
    sparse_scaling: bool = False
    impl: str = "auto"
    capacity: int | None = None
    values_init: Callable | None = None
    out_axis: str | None = None

    @nn.compact
    def __call__(self, x):
        n_in = x.shape[-1]
        if not 1 <= self.k <= n_in:
            raise ValueError(f"{self.name}: fan-in k={self.k} must be in [1, n_in={n_in}]")
        slots = self.k if self.capacity is None else self.capacity
        if not self.k <= slots <= n_in:
            raise ValueError(f"{self.name}: capacity={slots} must be in [k={self.k}, "
                             f"n_in={n_in}]")
        pad = ((0, 0), (0, slots - self.k))
        idt = self.index_dtype or smallest_index_dtype(n_in)
        if np.dtype(idt) not in [np.dtype(d) for d in INDEX_DTYPES] or (
                n_in - 1 > np.iinfo(idt).max):
            raise ValueError(f"{self.name}: index dtype {np.dtype(idt)} cannot index "
                             f"n_in={n_in} inputs (int8/int16/int32 wide enough)")
        indices = self.variable(
            "sparsity", "indices",
            lambda: jnp.pad(random_indices(self.make_rng("params"), n_in, self.features,
                                           self.k, idt), pad),
        ).value
        scale = 1.0 if self.sparse_scaling else self.k / n_in
        init = self.values_init or nn.initializers.variance_scaling(
            scale, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2)

        def values_init(key, shape, dtype):
            return jnp.pad(init(key, shape, dtype), pad)

        bias_init = nn.initializers.zeros_init()
        if self.out_axis is not None:
            values_init = nn.with_logical_partitioning(values_init, (self.out_axis, None))
            bias_init = nn.with_logical_partitioning(bias_init, (self.out_axis,))
        values = self.param("values", values_init, (self.features, self.k), self.param_dtype)
        bias = (self.param("bias", bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        y = condensed_linear(x, values.astype(x.dtype), indices,
                             None if bias is None else bias.astype(x.dtype), impl=self.impl)
        if not self.is_initializing() and (self.has_variable("probe", "kernel")
                                           or self.is_mutable_collection("probe")):
            probe = self.variable("probe", "kernel", jnp.zeros, (n_in, self.features),
                                  x.dtype).value
            y = y + jnp.matmul(x, probe)
        if not self.is_initializing():  # growth_inputs: this layer's x and dL/dy
            if self.has_variable("growth_dy", "y") or self.is_mutable_collection("growth_dy"):
                y = y + self.variable("growth_dy", "y", jnp.zeros, y.shape, y.dtype).value
            if self.is_mutable_collection("growth_x"):
                self.variable("growth_x", "x", jnp.zeros, x.shape, x.dtype).value = x
        return y


def dense_weight_grads(apply_fn: Callable, variables: dict, loss_fn: Callable, *args):
    """Dense weight gradients of every :class:`CondensedTrainDense` layer (the growth scores).

    Args:
        apply_fn: ``model.apply``.
        variables: ``{"params": ..., "sparsity": ...}``.
        loss_fn: ``loss_fn(outputs, *args[1:]) -> scalar``.
        args: ``args[0]`` is the model input; the rest go to ``loss_fn``.

    Returns:
        The ``probe`` tree: ``[n_in, n_out]`` per layer (``.../kernel``), in the layers'
        flattening order (that of the ``sparsity`` tree). Costs one dense forward and
        backward of each condensed layer: call it at topology updates only (as
        :func:`srigl_condensed` does with a zero-argument function).
    """
    x, rest = args[0], args[1:]
    shapes = jax.eval_shape(lambda: apply_fn(variables, x, mutable=["probe"])[1]["probe"])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def loss(probe):
        return loss_fn(apply_fn({**variables, "probe": probe}, x), *rest)

    return jax.grad(loss)(zeros)


def growth_inputs(apply_fn: Callable, variables: dict, loss_fn: Callable, *args):
    """The :class:`GrowthInputs` of every :class:`CondensedTrainDense` layer: its input ``x``
    and the loss gradient ``dy`` at its output, from one forward and backward of the
    condensed model (no dense kernel, no dense gradient).

    ``srigl_condensed(...).step(..., dense_grads=lambda: growth_inputs(...))`` then builds
    each layer's dense gradient ``x^T @ dy`` block by block of neurons at the update
    (:func:`srigl_condensed_layer_blocked`); :func:`dense_weight_grads` is the whole-layer
    reference. Each layer must be applied once per forward (a shared layer's input would
    be overwritten).

    Args:
        apply_fn, variables, loss_fn, args: as for :func:`dense_weight_grads`.

    Returns:
        ``{layer path: GrowthInputs(x [..., n_in], dy [..., n_out])}`` nested like the
        ``sparsity`` tree's layers (same flattening order).
    """
    x, rest = args[0], args[1:]
    shapes = jax.eval_shape(
        lambda: apply_fn(variables, x, mutable=["growth_dy"])[1]["growth_dy"])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def loss(deltas):
        out, state = apply_fn({**variables, "growth_dy": deltas}, x, mutable=["growth_x"])
        return loss_fn(out, *rest), state["growth_x"]

    dys, xs = jax.grad(loss, has_aux=True)(zeros)
    dy_flat, x_flat = _flat_paths(dys), _flat_paths(xs)
    out = {}
    for path, dy in dy_flat.items():
        head, _ = _split_path(path)
        out[head] = GrowthInputs(x_flat[f"{head}/x" if head else "x"], dy)
    return _nest(out)
