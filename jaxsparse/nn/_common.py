"""Pieces shared by the variational-dropout and L0 layers: the dense and convolution
products, the layers' parameter creation, PRNG-key resolution and dtype casting, parameter
grouping over a params tree, and the penalty-weight ramp."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsparse.masks import PyTree, path_to_str

Padding = str | int | Sequence[int | tuple[int, int]]


def compute_dtype(x: jax.Array, dtype) -> Any:
    """The dtype a layer computes in: ``dtype`` when given, else the input's float dtype."""
    if dtype is not None:
        return dtype
    x_dtype = jnp.asarray(x).dtype
    return x_dtype if jnp.issubdtype(x_dtype, jnp.floating) else jnp.float32


def dense_product(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """``x @ kernel`` over the last axis of ``x`` (any leading batch axes)."""
    return jax.lax.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision
    )


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    return value


def conv_padding(padding: Padding, n: int):
    """Normalises a Flax-style padding into what ``lax.conv_general_dilated`` accepts."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs; got {padding!r}")
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * n
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != n:
        raise ValueError(f"padding needs {n} entries (one per spatial axis), got {padding!r}")
    return pads


def conv_product(
    x: jax.Array,
    kernel: jax.Array,
    strides,
    padding: Padding,
    kernel_dilation,
    feature_group_count: int = 1,
    precision=None,
) -> jax.Array:
    """Channels-last convolution as in ``flax.linen.Conv``: ``x`` is ``[batch..., *spatial,
    in]``, ``kernel`` is ``[*kernel_size, in // groups, out]``."""
    n = kernel.ndim - 2
    if x.ndim < n + 2:
        raise ValueError(
            f"a {n}-d convolution needs inputs of rank >= {n + 2} ([batch, *spatial, "
            f"channels]), got shape {x.shape}"
        )
    batch_shape = x.shape[: x.ndim - n - 1]
    x = jnp.reshape(x, (-1, *x.shape[x.ndim - n - 1:]))
    spatial = tuple(range(1, n + 1))
    dn = jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, n + 1, *spatial),
        rhs_spec=(n + 1, n, *range(n)),
        out_spec=(0, n + 1, *spatial),
    )
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=_tuple(strides, n, "strides"),
        padding=conv_padding(padding, n),
        rhs_dilation=_tuple(kernel_dilation, n, "kernel_dilation"),
        dimension_numbers=dn,
        feature_group_count=feature_group_count,
        precision=precision,
    )
    return jnp.reshape(y, (*batch_shape, *y.shape[1:]))


def module_conv_product(module) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``(x, kernel) -> conv_product(...)`` with the convolution settings of a conv layer
    (its ``strides``, ``padding``, ``kernel_dilation``, ``feature_group_count`` and
    ``precision`` attributes)."""
    return functools.partial(
        conv_product,
        strides=module.strides,
        padding=module.padding,
        kernel_dilation=module.kernel_dilation,
        feature_group_count=module.feature_group_count,
        precision=module.precision,
    )


def add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    if bias is None:
        return y
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def check_finite(value, name: str, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False) -> float:
    """Validates a host number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and v <= high and (v > low if low_open else v >= low)
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a finite number in {bracket}{low}, {high}], got {value!r}")
    return v


def key_from(rng, layer: str) -> jax.Array:
    """A PRNG key from a key, an ``nnx.Rngs`` or an ``nnx.RngStream``."""
    if isinstance(rng, nnx.Rngs):
        return rng["dropout"]() if "dropout" in rng else rng.default()
    if isinstance(rng, nnx.RngStream):
        return rng()
    if isinstance(rng, jax.Array):
        return rng
    raise TypeError(
        f"{layer}: rngs must be a jax.random.key, an nnx.Rngs or an nnx.RngStream, got "
        f"{type(rng).__name__}"
    )


def missing_rng_error(layer: str) -> ValueError:
    return ValueError(
        f"{layer} is stochastic in training (deterministic=False) and needs a PRNG key: pass "
        f"it explicitly (rng=jax.random.key(0) for linen, rngs=... for NNX), or call with "
        f"deterministic=True for evaluation"
    )


def linen_noise_key(module: nn.Module, deterministic, rng) -> tuple[Any, jax.Array | None]:
    """``(deterministic, key)`` for a call of a stochastic linen layer.

    ``deterministic`` is merged with the module attribute of that name; in training the key
    is the explicit ``rng`` or, without one, drawn from ``module.rng_collection``.
    """
    det = nn.merge_param("deterministic", module.deterministic, deterministic)
    if det:
        return det, None
    if rng is None:
        if not module.has_rng(module.rng_collection):
            raise missing_rng_error(type(module).__name__)
        rng = module.make_rng(module.rng_collection)
    return det, rng


def nnx_noise_key(module: nnx.Module, deterministic, rngs) -> tuple[bool, jax.Array | None]:
    """``(deterministic, key)`` for a call of a stochastic NNX layer: the call argument
    overrides ``module.deterministic``; training needs ``rngs`` (see :func:`key_from`)."""
    det = module.deterministic if deterministic is None else deterministic
    if det:
        return True, None
    if rngs is None:
        raise missing_rng_error(type(module).__name__)
    return False, key_from(rngs, type(module).__name__)


def linen_params(module: nn.Module, shape: tuple[int, ...], aux_name: str, aux_init: float):
    """Declares ``kernel``, ``aux_name`` (constant ``aux_init``, same shape) and, with
    ``module.use_bias``, ``bias`` of shape ``(module.features,)``; returns the three (bias
    ``None`` without one)."""
    dtype = module.param_dtype
    kernel = module.param("kernel", module.kernel_init, shape, dtype)
    aux = module.param(aux_name, nn.initializers.constant(aux_init), shape, dtype)
    bias = (
        module.param("bias", module.bias_init, (module.features,), dtype)
        if module.use_bias else None
    )
    return kernel, aux, bias


def nnx_params(shape: tuple[int, ...], out_features: int, aux_init: float, *, use_bias: bool,
               param_dtype, kernel_init: Callable, bias_init: Callable, rngs: nnx.Rngs):
    """NNX counterpart of :func:`linen_params`: ``nnx.Param`` kernel and auxiliary parameter
    (filled with ``aux_init``), and a bias ``nnx.Param`` or ``nnx.data(None)``."""
    kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
    aux = nnx.Param(jnp.full(shape, aux_init, param_dtype))
    if use_bias:
        bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
    else:
        bias = nnx.data(None)
    return kernel, aux, bias


def check_size(value, name: str) -> int:
    """``value`` as an int after checking that it is an int >= 1 (a layer size); the error
    names the argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def dense_kernel_shape(in_features, out_features, in_name: str,
                       out_name: str) -> tuple[int, int]:
    """``(in_features, out_features)`` after checking both are ints >= 1 (a layer with no
    inputs or outputs has no weights; errors name ``in_name`` / ``out_name``)."""
    return check_size(in_features, in_name), check_size(out_features, out_name)


def conv_kernel_shape(kernel_size: Sequence[int], in_features: int, out_features: int,
                      feature_group_count: int, in_name: str,
                      out_name: str = "features") -> tuple[int, ...]:
    """``(*kernel_size, in_features // feature_group_count, out_features)``, after checking
    the sizes are ints >= 1 and that ``feature_group_count`` divides ``in_features`` (named
    ``in_name`` / ``out_name`` in the errors)."""
    if isinstance(kernel_size, (int, np.integer)) or not isinstance(kernel_size, Sequence):
        raise ValueError(f"kernel_size must be a sequence of ints >= 1, got {kernel_size!r}")
    for i, k in enumerate(kernel_size):
        check_size(k, f"kernel_size[{i}]")
    check_size(in_features, in_name)
    check_size(out_features, out_name)
    check_size(feature_group_count, "feature_group_count")
    if in_features % feature_group_count:
        raise ValueError(
            f"{in_name} ({in_features}) must be divisible by feature_group_count "
            f"({feature_group_count})"
        )
    return (*kernel_size, in_features // feature_group_count, out_features)


def conv_args(strides, padding: Padding, kernel_dilation):
    """``strides``, ``padding`` and ``kernel_dilation`` with their sequences made tuples (as
    NNX layers store them)."""
    strides = strides if isinstance(strides, int) else tuple(strides)
    padding = padding if isinstance(padding, (str, int)) else tuple(
        p if isinstance(p, int) else tuple(p) for p in padding
    )
    kernel_dilation = (
        kernel_dilation if isinstance(kernel_dilation, int) else tuple(kernel_dilation)
    )
    return strides, padding, kernel_dilation


def cast_all(dtype, *arrays) -> list:
    """Each array (or ``nnx.Variable``'s value) as ``dtype``; ``None`` entries stay ``None``."""
    return [
        None if a is None else jnp.asarray(a[...] if isinstance(a, nnx.Variable) else a, dtype)
        for a in arrays
    ]


def parameter_groups(params: PyTree, names: tuple[str, str], kind: str) -> dict[str, dict]:
    """Finds the layers of ``params`` that hold both ``names`` (e.g. ``kernel`` and
    ``log_sigma2``) as siblings: ``{path of the first name: {name: leaf}}``.

    Raises ``ValueError`` when there is none or when the two shapes differ.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    siblings: dict[str, dict[str, Any]] = {}
    for p, leaf in flat:
        path = path_to_str(p)
        parent, _, name = path.rpartition("/")
        if name in names:
            siblings.setdefault(parent, {})[name] = leaf
    groups = {}
    for parent, leaves in siblings.items():
        if len(leaves) != 2:
            continue
        a, b = (leaves[n] for n in names)
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"{kind} layer {parent!r}: {names[0]} has shape {jnp.shape(a)} but {names[1]} "
                f"has shape {jnp.shape(b)}"
            )
        groups[f"{parent}/{names[0]}" if parent else names[0]] = leaves
    if not groups:
        paths = [path_to_str(p) for p, _ in flat]
        raise ValueError(
            f"found no {kind} parameters (sibling leaves named {names[0]!r} and {names[1]!r}) "
            f"in the params tree; its leaves are {paths[:8]}"
        )
    return groups


def masks_at(params: PyTree, masks_by_path: dict[str, jax.Array]) -> PyTree:
    """A mask tree shaped like ``params``: the given masks at their paths, ``None`` elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: masks_by_path.get(path_to_str(p)), params
    )


def penalty_schedule(
    peak_value: float, warmup_steps: int, *, begin_step: int = 0
) -> Callable[[Any], jax.Array]:
    """Linear warm-up of a penalty weight (KL or L0) from 0 to ``peak_value``.

    The weight is 0 until ``begin_step``, rises linearly for ``warmup_steps`` steps, then
    stays at ``peak_value``. Ramping the KL weight avoids the early collapse of variational
    dropout to the prior (Molchanov et al. 2017 warm the KL term up over the first epochs).

    Args:
      peak_value: final weight, finite and >= 0 (often ``1 / num_train_examples`` for the KL
        of variational dropout).
      warmup_steps: length of the ramp in steps (>= 0; 0 gives a constant).
      begin_step: step at which the ramp starts.

    Returns:
      An optax schedule ``step -> weight``.

    Example:
      >>> weight = penalty_schedule(1.0 / 60000, warmup_steps=5000)
      >>> loss = data_loss + weight(step) * kl_divergence(params)
    """
    peak = check_finite(peak_value, "peak_value (penalty weight)", low=0.0)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if isinstance(begin_step, bool) or not isinstance(begin_step, int) or begin_step < 0:
        raise ValueError(f"begin_step must be an int >= 0, got {begin_step!r}")
    if warmup_steps == 0:
        return optax.join_schedules(
            [optax.constant_schedule(0.0), optax.constant_schedule(peak)], [begin_step]
        )
    return optax.linear_schedule(0.0, peak, warmup_steps, transition_begin=begin_step)
