"""Flax layers for condensed inference, linen and NNX, and swaps of trained Dense layers.

* ``CondensedDense`` (linen) / ``CondensedLinear`` (NNX): a Dense layer stored in condensed
  form. ``values`` and ``bias`` are parameters; ``indices``, ``neurons`` and
  ``ablated_bias`` are structure (linen collection ``"condensed"``, NNX variable type
  :class:`CondensedStructure`), so ``nnx.Param`` filters and optimizers never touch them.
  By default the output has the full ``n_out`` features (exactly the masked Dense layer).
* Model-level swaps: :func:`condensed_interceptor` runs a linen model with every sparse
  ``nn.Dense`` computed by its condensed form; :func:`swap_linear` replaces the sparse
  ``nnx.Linear`` layers of an NNX model in place.

For MLPs where ablated neurons should also shrink the next layer, use
:func:`jaxsparse.condensed.condense_mlp`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jaxsparse.condensed.dispatch import SparseLinear, condensed_dense, sparse_dense_full
from jaxsparse.condensed.export import CondensedLinear as CondensedParams
from jaxsparse.condensed.export import condense_layer, expand, validate_condensed
from jaxsparse.masks import is_none, path_to_str

# ----------------------------------------------------------------------------- linen


class CondensedDense(nn.Module):
    """Linen Dense layer in condensed form.

    Build its variables from a trained layer with :meth:`variables_from`::

        layer = jaxsparse.condensed.condense_layer(kernel, mask, bias)
        mod = CondensedDense(features=layer.n_out, n_active=layer.n_active, k=layer.k,
                             index_dtype=layer.indices.dtype, group_size=layer.group_size)
        y = mod.apply(CondensedDense.variables_from(layer), x)
    """

    features: int
    n_active: int
    k: int
    index_dtype: Any = jnp.int32
    param_dtype: Any = jnp.float32
    expand_output: bool = True
    impl: str = "auto"
    group_size: int = 1

    @nn.compact
    def __call__(self, x):
        values = self.param("values", nn.initializers.zeros_init(), (self.n_active, self.k),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.n_active,),
                          self.param_dtype)
        indices = self.variable("condensed", "indices", jnp.zeros,
                                (self.n_active // self.group_size, self.k),
                                self.index_dtype).value
        neurons = self.variable("condensed", "neurons", jnp.arange, self.n_active,
                                dtype=jnp.int32).value
        ablated = self.variable("condensed", "ablated_bias", jnp.zeros, (self.features,),
                                self.param_dtype).value
        layer = CondensedParams(values, indices, bias, neurons, ablated, x.shape[-1],
                                self.features, group_size=self.group_size)
        y = condensed_dense(x, layer, impl=self.impl)
        return expand(y, layer) if self.expand_output else y

    @staticmethod
    def variables_from(layer: CondensedParams) -> dict:
        """The ``{"params", "condensed"}`` variables holding ``layer`` (validated)."""
        validate_condensed(layer)
        return {
            "params": {"values": layer.values, "bias": layer.bias},
            "condensed": {"indices": layer.indices, "neurons": layer.neurons,
                          "ablated_bias": layer.ablated_bias},
        }


@contextlib.contextmanager
def condensed_interceptor(layers: dict[str, CondensedParams | SparseLinear], *,
                          impl: str = "auto"):
    """Within the context, every linen ``nn.Dense`` whose path is in ``layers`` runs in
    condensed form (full ``n_out`` outputs, exactly the masked layer).

    ``layers`` is what :func:`jaxsparse.condensed.condense` returns (keys like
    ``params/Dense_0``). Example::

        layers = jaxsparse.condense(params, masks)
        with condensed_interceptor(layers):
            logits = model.apply(params, x)
    """
    for name, layer in layers.items():
        validate_condensed(layer.condensed if isinstance(layer, SparseLinear) else layer, name)

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Dense) and context.method_name == "__call__":
            key = "/".join(("params", *mod.scope.path))
            layer = layers.get(key)
            if layer is not None:
                if isinstance(layer, SparseLinear):
                    return sparse_dense_full(args[0], layer, impl=impl)
                return expand(condensed_dense(args[0], layer, impl=impl), layer)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


# ----------------------------------------------------------------------------- NNX


class CondensedStructure(nnx.Variable):
    """Index structure of a condensed layer: not a parameter, never trained."""


class CondensedLinear(nnx.Module):
    """NNX Dense layer in condensed form; build it with :meth:`from_condensed`."""

    def __init__(self, layer: CondensedParams, *, expand_output: bool = True,
                 impl: str = "auto"):
        validate_condensed(layer)
        self.values = nnx.Param(layer.values)
        self.bias = nnx.Param(layer.bias)
        self.indices = CondensedStructure(layer.indices)
        self.neurons = CondensedStructure(layer.neurons)
        self.ablated_bias = CondensedStructure(layer.ablated_bias)
        self.in_features = layer.n_in
        self.out_features = layer.n_out
        self.group_size = layer.group_size
        self.expand_output = expand_output
        self.impl = impl

    @classmethod
    def from_condensed(cls, layer: CondensedParams, **kw) -> CondensedLinear:
        return cls(layer, **kw)

    def params(self) -> CondensedParams:
        return CondensedParams(self.values[...], self.indices[...], self.bias[...],
                               self.neurons[...], self.ablated_bias[...], self.in_features,
                               self.out_features, group_size=self.group_size)

    def __call__(self, x):
        layer = self.params()
        y = condensed_dense(x, layer, impl=self.impl)
        return expand(y, layer) if self.expand_output else y


def swap_linear(model: nnx.Module, masks, *, pad: bool = False,
                impl: str = "auto") -> list[str]:
    """Replaces, in place, every ``nnx.Linear`` of ``model`` whose kernel has a mask in
    ``masks`` (a tree like ``nnx.state(model, nnx.Param)`` with bool / ``None`` leaves)
    by a :class:`CondensedLinear`. Returns the swapped layer paths.

    Example::

        swapped = swap_linear(model, masks)   # e.g. ["layers/0", "layers/1"]
        logits = model(x)                     # allclose to the masked dense model
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
    by_path = {path_to_str(p): m for p, m in flat if m is not None}
    targets = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            name = "/".join(str(p) for p in path)
            mask = by_path.get(f"{name}/kernel")
            if mask is not None:
                targets.append((path, name, node, mask))
    for path, name, lin, mask in targets:
        bias = None if lin.bias is None else lin.bias[...]
        layer = condense_layer(lin.kernel[...], mask, bias, pad=pad, name=name)
        new = CondensedLinear(layer, impl=impl)
        parent = model
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return [name for _, name, _, _ in targets]


__all__ = [
    "CondensedDense",
    "CondensedLinear",
    "CondensedStructure",
    "condensed_interceptor",
    "swap_linear",
]
