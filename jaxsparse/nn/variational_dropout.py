"""Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017) as Flax layers.

Each weight ``theta`` has its own Gaussian multiplicative noise with variance
``alpha = sigma^2 / theta^2``, parameterised additively by ``log_sigma2`` (init -10):

* ``log alpha = log sigma^2 - log theta^2``, clipped to ``[-8, 8]``;
* training samples the *pre-activations* (local reparameterisation trick):
  ``y ~ N(x theta, x^2 sigma^2)`` with ``sigma^2 = alpha theta^2`` (the clipped alpha, so the
  noise stays bounded), drawn with an explicit PRNG key;
* evaluation is deterministic: ``y = x (theta * [log alpha < threshold])`` (threshold 3 by
  default; the paper tunes it between 0.5 and 3);
* the loss adds ``weight * KL`` with the paper's approximation
  ``-KL ~= k1 sigmoid(k2 + k3 log alpha) - 0.5 log1p(1 / alpha) - k1``
  (:func:`kl_divergence`), usually ramped up with :func:`penalty_schedule`.

The layers keep the kernel under the name ``kernel`` next to ``log_sigma2``, so
:func:`to_masks` returns a jaxsparse mask tree (a bool mask at each VD kernel, ``None``
elsewhere) that feeds ``jaxsparse.metrics`` and condensed export.

Linen: :class:`VDDense`, :class:`VDConv`. NNX: :class:`VDDenseNNX`, :class:`VDConvNNX`.

Reference: D. Molchanov, A. Ashukha, D. Vetrov, "Variational Dropout Sparsifies Deep Neural
Networks", ICML 2017.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.masks import Masks, PyTree
from jaxsparse.nn._common import (
    Padding,
    add_bias,
    cast_all,
    check_finite,
    compute_dtype,
    conv_args,
    conv_kernel_shape,
    conv_padding,
    dense_kernel_shape,
    dense_product,
    linen_noise_key,
    linen_params,
    masks_at,
    module_conv_product,
    nnx_noise_key,
    nnx_params,
    parameter_groups,
    penalty_schedule,
)

K1 = 0.63576
K2 = 1.87320
K3 = 1.48695
LOG_ALPHA_MIN = -8.0
LOG_ALPHA_MAX = 8.0
DEFAULT_THRESHOLD = 3.0
DEFAULT_LOG_SIGMA2_INIT = -10.0
# Keeps log(theta^2) and sqrt(variance) finite (and differentiable) at exactly zero.
_EPS = 1e-8

__all__ = [
    "K1",
    "K2",
    "K3",
    "VDConv",
    "VDConvNNX",
    "VDDense",
    "VDDenseNNX",
    "kl_approx",
    "kl_divergence",
    "log_alpha",
    "penalty_schedule",
    "to_masks",
    "vd_apply",
]


def check_threshold(threshold) -> float:
    """Validates a log-alpha threshold in (-8, 8] (log alpha is clipped to [-8, 8])."""
    return check_finite(
        threshold, "threshold (on log alpha)", LOG_ALPHA_MIN, LOG_ALPHA_MAX, low_open=True
    )


def log_alpha(theta: jax.Array, log_sigma2: jax.Array) -> jax.Array:
    """``clip(log sigma^2 - log theta^2, -8, 8)``, elementwise.

    Example:
      >>> log_alpha(jnp.array([1.0]), jnp.array([-10.0]))
      Array([-8.], dtype=float32)
    """
    la = log_sigma2 - jnp.log(jnp.square(theta) + _EPS)
    return jnp.clip(la, LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def kl_approx(log_alpha_values: jax.Array) -> jax.Array:
    """Elementwise approximation of KL(q(w | theta, alpha) || log-uniform prior), up to a
    constant: ``-(k1 sigmoid(k2 + k3 log alpha) - 0.5 log1p(1/alpha) - k1)``.

    It is ~0 for large alpha (pruned weights) and grows as alpha shrinks.

    Example:
      >>> kl_approx(jnp.array([8.0]))  # nearly zero
    """
    la = log_alpha_values
    neg_kl = K1 * jax.nn.sigmoid(K2 + K3 * la) - 0.5 * jnp.log1p(jnp.exp(-la)) - K1
    return -neg_kl


def kl_divergence(params: PyTree) -> jax.Array:
    """Sum of :func:`kl_approx` over every variational-dropout layer of ``params``.

    A layer is any pair of sibling leaves named ``kernel`` and ``log_sigma2`` (linen params
    dict or NNX state). Add ``weight * kl_divergence(params)`` to the data loss; with a loss
    averaged over examples the paper's weight is ``1 / num_train_examples``.

    Raises:
      ValueError: when ``params`` has no variational-dropout layer.

    Example:
      >>> loss = cross_entropy + penalty_schedule(1 / 60000, 5000)(step) * kl_divergence(p)
    """
    groups = parameter_groups(params, ("kernel", "log_sigma2"), "variational dropout")
    total = jnp.zeros((), jnp.float32)
    for leaves in groups.values():
        la = log_alpha(leaves["kernel"], leaves["log_sigma2"])
        total = total + jnp.sum(kl_approx(la), dtype=jnp.float32)
    return total


def to_masks(params: PyTree, threshold: float = DEFAULT_THRESHOLD) -> Masks:
    """jaxsparse masks of the weights variational dropout keeps: ``log alpha < threshold``.

    Returns a tree shaped like ``params`` with a bool array at each VD ``kernel`` and ``None``
    at every other leaf (``log_sigma2``, biases, ordinary layers).

    Raises:
      ValueError: when the threshold is outside (-8, 8] or ``params`` has no VD layer.

    Example:
      >>> masks = to_masks(variables["params"], threshold=3.0)
      >>> jaxsparse.metrics.global_sparsity(masks)
    """
    threshold = check_threshold(threshold)
    groups = parameter_groups(params, ("kernel", "log_sigma2"), "variational dropout")
    by_path = {
        path: log_alpha(leaves["kernel"], leaves["log_sigma2"]) < threshold
        for path, leaves in groups.items()
    }
    return masks_at(params, by_path)


def vd_apply(
    product: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    theta: jax.Array,
    log_sigma2: jax.Array,
    bias: jax.Array | None,
    *,
    deterministic: bool,
    key: jax.Array | None,
    threshold: float,
) -> jax.Array:
    """The variational-dropout forward pass for any linear ``product(x, kernel)``.

    Training (``deterministic=False``): ``mean + sqrt(var + 1e-8) * N(0, 1)`` with
    ``mean = product(x, theta)`` and ``var = product(x^2, alpha theta^2)``. Evaluation:
    ``product(x, where(log alpha < threshold, theta, 0))``. The bias is added after either.
    """
    la = log_alpha(theta, log_sigma2)
    if deterministic:
        kept = jnp.where(la < threshold, theta, jnp.zeros((), theta.dtype))
        return add_bias(product(x, kept), bias)
    mean = product(x, theta)
    variance = product(jnp.square(x), jnp.exp(la) * jnp.square(theta))
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    return add_bias(mean + jnp.sqrt(variance + _EPS) * noise, bias)


class _VDLinen(nn.Module):
    """Shared call logic of the linen VD layers."""

    def _run(self, product, x, kernel, log_sigma2, bias, deterministic, rng):
        threshold = check_threshold(self.threshold)
        det, key = linen_noise_key(self, deterministic, rng)
        dtype = compute_dtype(x, self.dtype)
        x, kernel, log_sigma2, bias = cast_all(dtype, x, kernel, log_sigma2, bias)
        return vd_apply(product, x, kernel, log_sigma2, bias, deterministic=det, key=key,
                        threshold=threshold)


class VDDense(_VDLinen):
    """Linen dense layer with sparse variational dropout.

    Attributes:
      features: number of outputs.
      use_bias: whether to add a bias.
      threshold: eval-time log-alpha threshold in (-8, 8]; weights at or above it are zero.
      log_sigma2_init: initial ``log sigma^2`` (-10: almost no noise at the start).
      deterministic: default mode; the call argument overrides it.
      dtype, param_dtype, precision, kernel_init, bias_init: as in ``flax.linen.Dense``.
      rng_collection: collection used when no explicit ``rng`` is passed in training.

    Example:
      >>> layer = VDDense(10)
      >>> variables = layer.init(jax.random.key(0), x, deterministic=True)
      >>> y = layer.apply(variables, x, deterministic=False, rng=jax.random.key(1))
      >>> kl = kl_divergence(variables["params"])
    """

    features: int
    use_bias: bool = True
    threshold: float = DEFAULT_THRESHOLD
    log_sigma2_init: float = DEFAULT_LOG_SIGMA2_INIT
    deterministic: bool | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x, *, deterministic: bool | None = None, rng: jax.Array | None = None):
        shape = dense_kernel_shape(jnp.shape(x)[-1], self.features,
                                   "input features (x.shape[-1])", "features")
        params = linen_params(self, shape, "log_sigma2", self.log_sigma2_init)
        product = functools.partial(dense_product, precision=self.precision)
        return self._run(product, x, *params, deterministic, rng)


class VDConv(_VDLinen):
    """Linen convolution (channels last, like ``flax.linen.Conv``) with sparse variational
    dropout; see :class:`VDDense` for the shared attributes.

    Attributes:
      kernel_size: spatial window, e.g. ``(3, 3)``.
      strides, padding, kernel_dilation, feature_group_count: as in ``flax.linen.Conv``
        (padding: ``"SAME"``, ``"VALID"``, an int or ``(low, high)`` pairs).

    Example:
      >>> layer = VDConv(16, (3, 3))
      >>> variables = layer.init(jax.random.key(0), images, deterministic=True)
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    threshold: float = DEFAULT_THRESHOLD
    log_sigma2_init: float = DEFAULT_LOG_SIGMA2_INIT
    deterministic: bool | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x, *, deterministic: bool | None = None, rng: jax.Array | None = None):
        shape = conv_kernel_shape(self.kernel_size, jnp.shape(x)[-1], self.features,
                                  self.feature_group_count, "input channels (x.shape[-1])")
        conv_padding(self.padding, len(shape) - 2)  # refuse a bad padding before any init
        params = linen_params(self, shape, "log_sigma2", self.log_sigma2_init)
        return self._run(module_conv_product(self), x, *params, deterministic, rng)


class _VDNNX(nnx.Module):
    """Shared parameters and call logic of the NNX VD layers."""

    def _init_params(self, shape, out_features, use_bias, log_sigma2_init, param_dtype,
                     kernel_init, bias_init, rngs):
        self.kernel, self.log_sigma2, self.bias = nnx_params(
            shape, out_features, log_sigma2_init, use_bias=use_bias, param_dtype=param_dtype,
            kernel_init=kernel_init, bias_init=bias_init, rngs=rngs,
        )

    def _run(self, product, x, deterministic, rngs):
        det, key = nnx_noise_key(self, deterministic, rngs)
        dtype = compute_dtype(x, self.dtype)
        x, kernel, log_sigma2, bias = cast_all(dtype, x, self.kernel, self.log_sigma2, self.bias)
        return vd_apply(product, x, kernel, log_sigma2, bias, deterministic=det, key=key,
                        threshold=self.threshold)


class VDDenseNNX(_VDNNX):
    """NNX dense layer with sparse variational dropout (parameters ``kernel``,
    ``log_sigma2``, ``bias``).

    Args:
      in_features, out_features: layer sizes.
      use_bias: whether to add a bias.
      threshold: eval-time log-alpha threshold in (-8, 8].
      log_sigma2_init: initial ``log sigma^2``.
      deterministic: default mode (``False``: training); the call argument overrides it.
      dtype, param_dtype, precision, kernel_init, bias_init: as in ``nnx.Linear``.
      rngs: ``nnx.Rngs`` for the initialisation.

    The call takes ``rngs``: a key, an ``nnx.Rngs`` (its ``dropout`` stream, else default)
    or an ``nnx.RngStream``; it is required in training.

    Example:
      >>> layer = VDDenseNNX(784, 300, rngs=nnx.Rngs(0))
      >>> y = layer(x, rngs=jax.random.key(1))           # training
      >>> y = layer(x, deterministic=True)               # evaluation
      >>> masks = to_masks(nnx.state(layer, nnx.Param))
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 threshold: float = DEFAULT_THRESHOLD,
                 log_sigma2_init: float = DEFAULT_LOG_SIGMA2_INIT,
                 deterministic: bool = False, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = nn.initializers.lecun_normal(),
                 bias_init: Callable = nn.initializers.zeros_init(),
                 rngs: nnx.Rngs):
        self.threshold = check_threshold(threshold)
        self.deterministic = deterministic
        self.dtype = dtype
        self.precision = precision
        shape = dense_kernel_shape(in_features, out_features, "in_features", "out_features")
        self._init_params(shape, out_features, use_bias,
                          log_sigma2_init, param_dtype, kernel_init, bias_init, rngs)

    def __call__(self, x, *, deterministic: bool | None = None, rngs=None):
        product = functools.partial(dense_product, precision=self.precision)
        return self._run(product, x, deterministic, rngs)


class VDConvNNX(_VDNNX):
    """NNX convolution (channels last, like ``nnx.Conv``) with sparse variational dropout;
    see :class:`VDDenseNNX` for the shared arguments.

    Example:
      >>> layer = VDConvNNX(3, 16, (3, 3), rngs=nnx.Rngs(0))
      >>> y = layer(images, rngs=jax.random.key(1))
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *,
                 strides: int | Sequence[int] = 1, padding: Padding = "SAME",
                 kernel_dilation: int | Sequence[int] = 1, feature_group_count: int = 1,
                 use_bias: bool = True, threshold: float = DEFAULT_THRESHOLD,
                 log_sigma2_init: float = DEFAULT_LOG_SIGMA2_INIT,
                 deterministic: bool = False, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = nn.initializers.lecun_normal(),
                 bias_init: Callable = nn.initializers.zeros_init(),
                 rngs: nnx.Rngs):
        shape = conv_kernel_shape(kernel_size, in_features, out_features, feature_group_count,
                                  "in_features", "out_features")
        conv_padding(padding, len(shape) - 2)  # refuse a bad padding before any init
        self.threshold = check_threshold(threshold)
        self.deterministic = deterministic
        self.dtype = dtype
        self.precision = precision
        self.strides, self.padding, self.kernel_dilation = conv_args(
            strides, padding, kernel_dilation
        )
        self.feature_group_count = feature_group_count
        self._init_params(shape, out_features, use_bias, log_sigma2_init, param_dtype,
                          kernel_init, bias_init, rngs)

    def __call__(self, x, *, deterministic: bool | None = None, rngs=None):
        return self._run(module_conv_product(self), x, deterministic, rngs)
