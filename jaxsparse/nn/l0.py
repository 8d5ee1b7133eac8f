"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma 2018) as Flax layers.

Every weight ``w`` is multiplied by a gate ``z`` in [0, 1] drawn from the hard-concrete
distribution with location ``log_alpha`` (a parameter, init ~2.197 so the gate is open with
probability ~0.9) and temperature ``beta = 2/3``, stretched to ``(gamma, zeta) = (-0.1, 1.1)``
and clipped:

* training: ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
  ``z = min(1, max(0, s (zeta - gamma) + gamma))`` (one draw per weight and per call, from an
  explicit PRNG key); the layer computes ``x (w * z)``;
* evaluation: ``z = min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``;
* the penalty is the expected number of nonzero gates,
  ``sum sigmoid(log_alpha - beta log(-gamma / zeta))`` (:func:`l0_penalty`);
* :func:`to_masks` keeps the weights whose evaluation gate is above a threshold (0 by
  default: exactly the weights the deterministic layer uses).

The weight stays under the name ``kernel`` next to ``log_alpha``, so masks land at the kernel.

Linen: :class:`L0Dense`, :class:`L0Conv`. NNX: :class:`L0DenseNNX`, :class:`L0ConvNNX`.

Reference: C. Louizos, M. Welling, D. P. Kingma, "Learning Sparse Neural Networks through L0
Regularization", ICLR 2018.
"""

from __future__ import annotations

import functools
import math
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

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
# log(1 - p) - log(p) for a dropout rate p = 0.1: the gate starts open with probability ~0.9.
LOG_ALPHA_INIT = math.log(0.9 / 0.1)
# Keeps log(u) and log(1 - u) finite.
_U_EPS = 1e-6

__all__ = [
    "BETA",
    "GAMMA",
    "ZETA",
    "L0Conv",
    "L0ConvNNX",
    "L0Dense",
    "L0DenseNNX",
    "deterministic_gate",
    "expected_l0",
    "l0_apply",
    "l0_penalty",
    "penalty_schedule",
    "sample_gate",
    "to_masks",
]


def check_gate_hparams(beta, gamma, zeta) -> tuple[float, float, float]:
    """Validates the hard-concrete constants: beta > 0, gamma < 0, zeta > 1."""
    beta = check_finite(beta, "beta (hard-concrete temperature)", 0.0, math.inf, low_open=True)
    gamma = check_finite(gamma, "gamma (lower stretch limit)")
    zeta = check_finite(zeta, "zeta (upper stretch limit)")
    if not gamma < 0.0:
        raise ValueError(f"gamma must be < 0 so that gates can be exactly 0, got {gamma!r}")
    if not zeta > 1.0:
        raise ValueError(f"zeta must be > 1 so that gates can be exactly 1, got {zeta!r}")
    return beta, gamma, zeta


def sample_gate(key: jax.Array, log_alpha: jax.Array, beta: float = BETA, gamma: float = GAMMA,
                zeta: float = ZETA) -> jax.Array:
    """One hard-concrete draw per entry of ``log_alpha`` (training-time gates).

    Example:
      >>> z = sample_gate(jax.random.key(0), jnp.full((3, 4), 2.197))
    """
    u = jax.random.uniform(key, jnp.shape(log_alpha), jnp.asarray(log_alpha).dtype,
                           minval=_U_EPS, maxval=1.0 - _U_EPS)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta)
    return jnp.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)


def deterministic_gate(log_alpha: jax.Array, gamma: float = GAMMA,
                       zeta: float = ZETA) -> jax.Array:
    """Evaluation gate ``min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``.

    Example:
      >>> deterministic_gate(jnp.array([10.0, -10.0]))
      Array([1., 0.], dtype=float32)
    """
    return jnp.clip(jax.nn.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def expected_l0(log_alpha: jax.Array, beta: float = BETA, gamma: float = GAMMA,
                zeta: float = ZETA) -> jax.Array:
    """Probability that each gate is nonzero: ``sigmoid(log_alpha - beta log(-gamma/zeta))``.

    Example:
      >>> expected_l0(jnp.array([BETA * math.log(-GAMMA / ZETA)]))  # 0.5
    """
    return jax.nn.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def l0_penalty(params: PyTree, *, beta: float = BETA, gamma: float = GAMMA,
               zeta: float = ZETA) -> jax.Array:
    """Expected number of nonzero weights over every L0 layer of ``params``.

    A layer is any pair of sibling leaves named ``kernel`` and ``log_alpha``. Add
    ``weight * l0_penalty(params)`` to the data loss (Louizos et al. use a weight
    ``lambda / num_train_examples`` with a loss averaged over examples).

    Raises:
      ValueError: bad hard-concrete constants, or no L0 layer in ``params``.

    Example:
      >>> loss = cross_entropy + 0.1 / 60000 * l0_penalty(variables["params"])
    """
    beta, gamma, zeta = check_gate_hparams(beta, gamma, zeta)
    groups = parameter_groups(params, ("kernel", "log_alpha"), "L0")
    total = jnp.zeros((), jnp.float32)
    for leaves in groups.values():
        total = total + jnp.sum(expected_l0(leaves["log_alpha"], beta, gamma, zeta),
                                dtype=jnp.float32)
    return total


def to_masks(params: PyTree, threshold: float = 0.0, *, gamma: float = GAMMA,
             zeta: float = ZETA) -> Masks:
    """jaxsparse masks of the weights whose evaluation gate exceeds ``threshold``.

    With the default 0 the masks mark exactly the weights the deterministic layer uses.
    Returns a bool array at each L0 ``kernel`` and ``None`` elsewhere.

    Raises:
      ValueError: threshold outside [0, 1), bad constants, or no L0 layer in ``params``.

    Example:
      >>> masks = to_masks(variables["params"])
      >>> jaxsparse.metrics.global_sparsity(masks)
    """
    name = "threshold (on the evaluation gate)"
    threshold = check_finite(threshold, name)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {threshold!r}")
    _, gamma, zeta = check_gate_hparams(BETA, gamma, zeta)
    groups = parameter_groups(params, ("kernel", "log_alpha"), "L0")
    by_path = {
        path: deterministic_gate(leaves["log_alpha"], gamma, zeta) > threshold
        for path, leaves in groups.items()
    }
    return masks_at(params, by_path)


def l0_apply(
    product: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    kernel: jax.Array,
    log_alpha: jax.Array,
    bias: jax.Array | None,
    *,
    deterministic: bool,
    key: jax.Array | None,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
) -> jax.Array:
    """``product(x, kernel * z) + bias`` with sampled (training) or deterministic gates."""
    if deterministic:
        z = deterministic_gate(log_alpha, gamma, zeta)
    else:
        z = sample_gate(key, log_alpha, beta, gamma, zeta)
    return add_bias(product(x, kernel * z), bias)


class _L0Linen(nn.Module):
    """Shared call logic of the linen L0 layers."""

    def _run(self, product, x, kernel, log_alpha, bias, deterministic, rng):
        beta, gamma, zeta = check_gate_hparams(self.beta, self.gamma, self.zeta)
        det, key = linen_noise_key(self, deterministic, rng)
        dtype = compute_dtype(x, self.dtype)
        x, kernel, log_alpha, bias = cast_all(dtype, x, kernel, log_alpha, bias)
        return l0_apply(product, x, kernel, log_alpha, bias, deterministic=det, key=key,
                        beta=beta, gamma=gamma, zeta=zeta)


class L0Dense(_L0Linen):
    """Linen dense layer with per-weight hard-concrete L0 gates.

    Attributes:
      features: number of outputs.
      use_bias: whether to add a (never gated) bias.
      log_alpha_init: initial gate location (default log(9) ~ 2.197).
      beta, gamma, zeta: hard-concrete temperature and stretch limits.
      deterministic: default mode; the call argument overrides it.
      dtype, param_dtype, precision, kernel_init, bias_init: as in ``flax.linen.Dense``.
      rng_collection: collection used when no explicit ``rng`` is passed in training.

    Example:
      >>> layer = L0Dense(10)
      >>> variables = layer.init(jax.random.key(0), x, deterministic=True)
      >>> y = layer.apply(variables, x, deterministic=False, rng=jax.random.key(1))
      >>> penalty = l0_penalty(variables["params"])
    """

    features: int
    use_bias: bool = True
    log_alpha_init: float = LOG_ALPHA_INIT
    beta: float = BETA
    gamma: float = GAMMA
    zeta: float = ZETA
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
        params = linen_params(self, shape, "log_alpha", self.log_alpha_init)
        product = functools.partial(dense_product, precision=self.precision)
        return self._run(product, x, *params, deterministic, rng)


class L0Conv(_L0Linen):
    """Linen convolution (channels last, like ``flax.linen.Conv``) with per-weight L0 gates;
    see :class:`L0Dense` for the shared attributes.

    Example:
      >>> layer = L0Conv(16, (3, 3))
      >>> variables = layer.init(jax.random.key(0), images, deterministic=True)
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    log_alpha_init: float = LOG_ALPHA_INIT
    beta: float = BETA
    gamma: float = GAMMA
    zeta: float = ZETA
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
        params = linen_params(self, shape, "log_alpha", self.log_alpha_init)
        return self._run(module_conv_product(self), x, *params, deterministic, rng)


class _L0NNX(nnx.Module):
    """Shared parameters and call logic of the NNX L0 layers."""

    def _setup(self, shape, out_features, use_bias, log_alpha_init, beta, gamma, zeta,
               deterministic, dtype, param_dtype, precision, kernel_init, bias_init, rngs):
        self.beta, self.gamma, self.zeta = check_gate_hparams(beta, gamma, zeta)
        self.deterministic = deterministic
        self.dtype = dtype
        self.precision = precision
        self.kernel, self.log_alpha, self.bias = nnx_params(
            shape, out_features, log_alpha_init, use_bias=use_bias, param_dtype=param_dtype,
            kernel_init=kernel_init, bias_init=bias_init, rngs=rngs,
        )

    def _run(self, product, x, deterministic, rngs):
        det, key = nnx_noise_key(self, deterministic, rngs)
        dtype = compute_dtype(x, self.dtype)
        x, kernel, log_alpha, bias = cast_all(dtype, x, self.kernel, self.log_alpha, self.bias)
        return l0_apply(product, x, kernel, log_alpha, bias, deterministic=det, key=key,
                        beta=self.beta, gamma=self.gamma, zeta=self.zeta)


class L0DenseNNX(_L0NNX):
    """NNX dense layer with per-weight hard-concrete L0 gates (parameters ``kernel``,
    ``log_alpha``, ``bias``); the arguments are those of :class:`L0Dense` plus
    ``in_features``/``out_features`` and ``rngs`` for the initialisation.

    The call takes ``rngs``: a key, an ``nnx.Rngs`` (its ``dropout`` stream, else default)
    or an ``nnx.RngStream``; it is required in training.

    Example:
      >>> layer = L0DenseNNX(784, 300, rngs=nnx.Rngs(0))
      >>> y = layer(x, rngs=jax.random.key(1))       # training
      >>> y = layer(x, deterministic=True)           # evaluation
      >>> masks = to_masks(nnx.state(layer, nnx.Param))
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 log_alpha_init: float = LOG_ALPHA_INIT, beta: float = BETA,
                 gamma: float = GAMMA, zeta: float = ZETA, deterministic: bool = False,
                 dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = nn.initializers.lecun_normal(),
                 bias_init: Callable = nn.initializers.zeros_init(),
                 rngs: nnx.Rngs):
        shape = dense_kernel_shape(in_features, out_features, "in_features", "out_features")
        self._setup(shape, out_features, use_bias, log_alpha_init, beta,
                    gamma, zeta, deterministic, dtype, param_dtype, precision, kernel_init,
                    bias_init, rngs)

    def __call__(self, x, *, deterministic: bool | None = None, rngs=None):
        product = functools.partial(dense_product, precision=self.precision)
        return self._run(product, x, deterministic, rngs)


class L0ConvNNX(_L0NNX):
    """NNX convolution (channels last, like ``nnx.Conv``) with per-weight L0 gates.

    Example:
      >>> layer = L0ConvNNX(3, 16, (3, 3), rngs=nnx.Rngs(0))
      >>> y = layer(images, rngs=jax.random.key(1))
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *,
                 strides: int | Sequence[int] = 1, padding: Padding = "SAME",
                 kernel_dilation: int | Sequence[int] = 1, feature_group_count: int = 1,
                 use_bias: bool = True, log_alpha_init: float = LOG_ALPHA_INIT,
                 beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA,
                 deterministic: bool = False, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = nn.initializers.lecun_normal(),
                 bias_init: Callable = nn.initializers.zeros_init(),
                 rngs: nnx.Rngs):
        shape = conv_kernel_shape(kernel_size, in_features, out_features, feature_group_count,
                                  "in_features", "out_features")
        conv_padding(padding, len(shape) - 2)  # refuse a bad padding before any init
        self.strides, self.padding, self.kernel_dilation = conv_args(
            strides, padding, kernel_dilation
        )
        self.feature_group_count = feature_group_count
        self._setup(shape, out_features, use_bias, log_alpha_init, beta, gamma, zeta,
                    deterministic, dtype, param_dtype, precision, kernel_init, bias_init, rngs)

    def __call__(self, x, *, deterministic: bool | None = None, rngs=None):
        return self._run(module_conv_product(self), x, deterministic, rngs)
