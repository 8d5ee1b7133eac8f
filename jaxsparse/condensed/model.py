"""Model-level export of MLPs (and ViT MLP blocks) that also shrinks the next layer's input.

An ablated neuron ``i`` of layer ``l`` (all-``False`` mask column) still outputs the
constant ``act(b_i)``. The export folds ``act(b_i) * W_{l+1}[i, :]`` into layer ``l+1``'s
bias and deletes row ``i`` of ``W_{l+1}``, so layer ``l`` keeps only its active neurons and
layer ``l+1`` reads a smaller input: the exported model is exactly equivalent to the masked
dense one. Deleting rows can leave a neuron of layer ``l+1`` with fewer than ``k`` inputs;
its missing slots become zero-valued padding (``k`` stays constant), and a neuron left with
no input at all is ablated in turn. The last layer is expanded back to its full ``n_out``.

Constant fan-in is checked on the *trained* masks (strict unless ``pad=True``).

Example (a ViT MLP block, Dense 768 -> 3072 -> gelu -> Dense 3072 -> 768)::

    block = condense_mlp([p["Dense_0"], p["Dense_1"]], [m["Dense_0"]["kernel"],
                          m["Dense_1"]["kernel"]], activation=jax.nn.gelu)
    y = mlp_apply(block, x)   # allclose to the masked dense block
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsparse.condensed.dispatch import SparseLinear, sparse_dense, sparse_linear
from jaxsparse.condensed.export import _check_layer, expand, fan_in_profile


@struct.dataclass
class CondensedMLP:
    """Exported MLP: ``layers[l]`` maps the active outputs of ``l-1`` to its active outputs;
    ``activation`` runs between layers (not after the last)."""

    layers: tuple[SparseLinear, ...]
    activation: Callable = struct.field(pytree_node=False, default=jax.nn.relu)


def condense_mlp(
    params: Sequence[dict],
    masks: Sequence,
    *,
    activation: Callable = jax.nn.relu,
    pad: bool = False,
    structured: bool = True,
) -> CondensedMLP:
    """Exports ``Dense -> act -> Dense -> ... -> Dense`` (host, outside jit).

    Args:
        params: per layer a dict with ``"kernel"`` ``[n_in, n_out]`` and optional ``"bias"``.
        masks: per layer a bool mask of the kernel's shape, or ``None`` for a dense layer.
        activation: the elementwise activation between layers.
        pad: accept non-constant fan-in masks (see :func:`condense_layer`).
        structured: also store the structured-only form for the per-batch dispatch.
    """
    if len(params) != len(masks) or not params:
        raise ValueError(f"got {len(params)} param dicts and {len(masks)} masks")
    out = []
    keep_rows = None  # active neurons of the previous layer
    carry = None  # act(b) of the previous layer's ablated neurons, [n_prev]
    for li, (p, m) in enumerate(zip(params, masks, strict=True)):
        name = f"layer {li}"
        kernel = np.asarray(p["kernel"])
        if m is None:
            m = np.ones(kernel.shape, bool)
        kernel, m, bias = _check_layer(kernel, m, p.get("bias"), name)
        fan, active = fan_in_profile(m)
        if not pad and len(np.unique(fan[active])) > 1:
            # Strictness is about the trained mask, before rows are deleted below.
            from jaxsparse.condensed.export import condense_layer

            condense_layer(kernel, m, bias, name=name)  # raises the standard error
        w = np.where(m, kernel, np.zeros((), kernel.dtype))
        if keep_rows is not None:
            if kernel.shape[0] != len(carry):
                raise ValueError(
                    f"{name}: n_in={kernel.shape[0]} does not match the previous layer's "
                    f"n_out={len(carry)}"
                )
            dropped = ~keep_rows
            fold = carry[dropped].astype(np.float64) @ w[dropped].astype(np.float64)
            bias = (bias.astype(np.float64) + fold).astype(bias.dtype)
            w, m = w[keep_rows], m[keep_rows]
        last = li == len(params) - 1
        layer = sparse_linear(w, m, bias, pad=True, structured=structured, name=name)
        out.append(layer)
        _, active = fan_in_profile(m)
        keep_rows = active
        if not last:
            carry = np.asarray(activation(jnp.asarray(np.where(active, 0, bias))))
            carry = np.where(active, np.zeros((), carry.dtype), carry)
    return CondensedMLP(tuple(out), activation)


def mlp_apply(model: CondensedMLP, x: jax.Array, *, form: str = "auto",
              impl: str = "auto") -> jax.Array:
    """Runs an exported MLP; the output has the last layer's full ``n_out`` features."""
    h = x
    for li, layer in enumerate(model.layers):
        h = sparse_dense(h, layer, form=form, impl=impl)
        if li < len(model.layers) - 1:
            h = model.activation(h)
    return expand(h, model.layers[-1].condensed)


def dense_mlp_apply(params: Sequence[dict], masks: Sequence, x: jax.Array,
                    activation: Callable = jax.nn.relu) -> jax.Array:
    """The masked dense MLP the export must match (for tests and benchmarks)."""
    h = x
    for li, (p, m) in enumerate(zip(params, masks, strict=True)):
        w = p["kernel"] if m is None else jnp.where(m, p["kernel"], jnp.zeros((), x.dtype))
        h = h @ w
        if p.get("bias") is not None:
            h = h + p["bias"].reshape((1,) * (h.ndim - 1) + p["bias"].shape)
        if li < len(params) - 1:
            h = activation(h)
    return h
