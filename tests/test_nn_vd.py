"""Sparse variational dropout layers (Molchanov et al. 2017): math, layers, masks, errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import masks as jmasks
from jaxsparse import metrics
from jaxsparse.nn import variational_dropout as vd
from tests.helpers import examples

K1, K2, K3 = 0.63576, 1.87320, 1.48695


def neg_kl_reference(la: float) -> float:
    sigmoid = 1.0 / (1.0 + math.exp(-(K2 + K3 * la)))
    return K1 * sigmoid - 0.5 * math.log1p(math.exp(-la)) - K1


@pytest.mark.parametrize("la", [-8.0, -2.0, 0.0, 1.5, 3.0, 8.0])
def test_kl_approx_closed_form(la):
    got = float(vd.kl_approx(jnp.array(la, jnp.float32)))
    assert got == pytest.approx(-neg_kl_reference(la), rel=1e-5, abs=1e-6)


def test_kl_approx_known_values():
    # At log alpha = 0: -KL = k1 sigmoid(k2) - 0.5 log 2 - k1.
    expected = -(K1 / (1 + math.exp(-K2)) - 0.5 * math.log(2.0) - K1)
    assert float(vd.kl_approx(jnp.zeros(()))) == pytest.approx(expected, rel=1e-6)
    # Large alpha: the weight is pure noise and costs (almost) nothing.
    assert abs(float(vd.kl_approx(jnp.array(8.0)))) < 1e-3


@settings(max_examples=examples(30, nightly=2000), deadline=None)
@given(st.floats(-8.0, 7.9), st.floats(0.01, 4.0))
def test_kl_approx_decreases_with_log_alpha(la, delta):
    hi = min(la + delta, 8.0)
    kl = vd.kl_approx(jnp.array([la, hi], jnp.float32))
    assert float(kl[0]) >= float(kl[1]) - 1e-6


def test_log_alpha_clipped():
    theta = jnp.array([1.0, 1e-3, 0.0, 2.0])
    ls2 = jnp.array([-10.0, 0.0, 0.0, math.log(4.0)])
    la = vd.log_alpha(theta, ls2)
    np.testing.assert_allclose(np.asarray(la), [-8.0, 8.0, 8.0, 0.0], atol=1e-5)


def _dense_vars(key=0, features=5, in_features=4):
    layer = vd.VDDense(features)
    x = jnp.ones((2, in_features))
    return layer, layer.init(jax.random.key(key), x, deterministic=True)


def test_kl_divergence_sums_layers_and_ignores_others():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic=True):
            x = vd.VDDense(6)(x, deterministic=deterministic)
            x = nn.Dense(3)(x)
            return vd.VDDense(2)(x, deterministic=deterministic)

    params = Net().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    params = jax.tree.map(lambda x: x, params)
    params["VDDense_0"]["log_sigma2"] = jnp.full((4, 6), -1.0)
    expected = 0.0
    for name in ("VDDense_0", "VDDense_1"):
        la = np.clip(
            np.asarray(params[name]["log_sigma2"], np.float64)
            - np.log(np.asarray(params[name]["kernel"], np.float64) ** 2 + 1e-8),
            -8, 8,
        )
        expected += sum(-neg_kl_reference(v) for v in la.ravel())
    got = float(vd.kl_divergence(params))
    assert got == pytest.approx(expected, rel=1e-4)
    # Differentiable and finite, even through a zero weight.
    params["VDDense_1"]["kernel"] = params["VDDense_1"]["kernel"].at[0, 0].set(0.0)
    grads = jax.jit(jax.grad(vd.kl_divergence))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_dense_reduces_to_flax_dense_when_noise_off():
    layer, variables = _dense_vars()
    x = jax.random.normal(jax.random.key(1), (3, 4))
    p = variables["params"]
    # log_sigma2 = -40 keeps log alpha < 3 even for tiny weights: the gates are all open.
    p = {**p, "bias": jnp.arange(5, dtype=jnp.float32), "log_sigma2": jnp.full((4, 5), -40.0)}
    y = layer.apply({"params": p}, x, deterministic=True)
    ref = nn.Dense(5).apply({"params": {"kernel": p["kernel"], "bias": p["bias"]}}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_dense_eval_zeroes_weights_at_or_above_threshold():
    layer = vd.VDDense(3, threshold=1.0)
    x = jax.random.normal(jax.random.key(1), (2, 4))
    kernel = jnp.ones((4, 3))
    # log alpha = log_sigma2 - log 1 = log_sigma2: above, at, and below the threshold.
    ls2 = jnp.array([[2.0, 1.0, 0.5]] * 4)
    params = {"kernel": kernel, "log_sigma2": ls2, "bias": jnp.zeros(3)}
    y = layer.apply({"params": params}, x, deterministic=True)
    kept = jnp.array([[0.0, 0.0, 1.0]] * 4)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ kept), atol=1e-6)


def test_dense_training_uses_local_reparameterisation():
    layer, variables = _dense_vars()
    p = dict(variables["params"])
    p["log_sigma2"] = jnp.full((4, 5), -2.0)
    x = jax.random.normal(jax.random.key(2), (3, 4))
    key = jax.random.key(7)
    y = layer.apply({"params": p}, x, deterministic=False, rng=key)
    theta = p["kernel"]
    la = jnp.clip(p["log_sigma2"] - jnp.log(theta**2 + 1e-8), -8, 8)
    mean = x @ theta
    var = (x**2) @ (jnp.exp(la) * theta**2)
    expected = mean + jnp.sqrt(var + 1e-8) * jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-6)
    # The rng collection works too (reproducibly), and different keys give different samples.
    y2 = layer.apply({"params": p}, x, deterministic=False, rngs={"dropout": key})
    y2b = layer.apply({"params": p}, x, deterministic=False, rngs={"dropout": key})
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y2b))
    assert not np.allclose(np.asarray(y2), np.asarray(mean))
    y3 = layer.apply({"params": p}, x, deterministic=False, rng=jax.random.key(8))
    assert not np.allclose(np.asarray(y3), np.asarray(y))


def test_dense_training_noise_statistics():
    layer = vd.VDDense(1, use_bias=False)
    x = jnp.array([[1.0, 2.0]])
    params = {"kernel": jnp.array([[1.0], [0.5]]), "log_sigma2": jnp.log(jnp.array([[0.04], [0.01]]))}
    keys = jax.random.split(jax.random.key(0), 4000)
    ys = jax.vmap(
        lambda k: layer.apply({"params": params}, x, deterministic=False, rng=k)
    )(keys).ravel()
    # mean = 1*1 + 2*0.5 = 2; var = 1*0.04 + 4*0.01 = 0.08
    assert float(jnp.mean(ys)) == pytest.approx(2.0, abs=0.03)
    assert float(jnp.var(ys)) == pytest.approx(0.08, rel=0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=(3, 3)),
        dict(kernel_size=(3, 3), strides=2, padding="VALID"),
        dict(kernel_size=(2, 3), padding=((1, 0), (2, 1)), kernel_dilation=(1, 2)),
        dict(kernel_size=(3,), padding="SAME", feature_group_count=2),
    ],
)
def test_conv_reduces_to_flax_conv_when_noise_off(kwargs):
    spatial = (7,) if len(kwargs["kernel_size"]) == 1 else (7, 6)
    x = jax.random.normal(jax.random.key(3), (2, *spatial, 4))
    layer = vd.VDConv(6, **kwargs)
    variables = layer.init(jax.random.key(0), x, deterministic=True)
    p = dict(variables["params"])
    p["bias"] = jnp.linspace(-1.0, 1.0, 6)
    p["log_sigma2"] = jnp.full(p["kernel"].shape, -40.0)
    y = layer.apply({"params": p}, x, deterministic=True)
    ref = nn.Conv(6, **kwargs).apply({"params": {"kernel": p["kernel"], "bias": p["bias"]}}, x)
    assert y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_conv_training_mean_and_variance():
    x = jax.random.normal(jax.random.key(3), (1, 5, 5, 2))
    layer = vd.VDConv(3, (3, 3), use_bias=False)
    p = dict(layer.init(jax.random.key(0), x, deterministic=True)["params"])
    p["log_sigma2"] = jnp.full(p["kernel"].shape, -3.0)
    key = jax.random.key(4)
    y = layer.apply({"params": p}, x, deterministic=False, rng=key)
    conv = nn.Conv(3, (3, 3), use_bias=False)
    theta = p["kernel"]
    la = jnp.clip(p["log_sigma2"] - jnp.log(theta**2 + 1e-8), -8, 8)
    mean = conv.apply({"params": {"kernel": theta}}, x)
    var = conv.apply({"params": {"kernel": jnp.exp(la) * theta**2}}, x**2)
    expected = mean + jnp.sqrt(var + 1e-8) * jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_nnx_layers_match_linen():
    x = jax.random.normal(jax.random.key(1), (3, 4))
    dense = vd.VDDenseNNX(4, 5, rngs=nnx.Rngs(0))
    dense.log_sigma2[...] = jnp.full((4, 5), -1.0)
    params = {"kernel": dense.kernel[...], "log_sigma2": dense.log_sigma2[...],
              "bias": dense.bias[...]}
    linen = vd.VDDense(5)
    key = jax.random.key(5)
    for det, rng in ((True, None), (False, key)):
        got = dense(x, deterministic=det, rngs=rng)
        ref = linen.apply({"params": params}, x, deterministic=det, rng=rng)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
    # nnx.Rngs are accepted; with all gates open the eval path is an nnx.Linear.
    out = dense(x, rngs=nnx.Rngs(dropout=1))
    assert out.shape == (3, 5)
    fresh = vd.VDDenseNNX(4, 5, rngs=nnx.Rngs(0), deterministic=True, log_sigma2_init=-40.0)
    lin = nnx.Linear(4, 5, rngs=nnx.Rngs(0))
    lin.kernel[...] = fresh.kernel[...]
    lin.bias[...] = fresh.bias[...] + 0.5
    fresh.bias[...] = lin.bias[...]
    np.testing.assert_allclose(np.asarray(fresh(x)), np.asarray(lin(x)), rtol=1e-6, atol=1e-6)

    xc = jax.random.normal(jax.random.key(2), (2, 6, 6, 4))
    conv = vd.VDConvNNX(4, 8, (3, 3), strides=(2, 1), padding="VALID", rngs=nnx.Rngs(0),
                        log_sigma2_init=-40.0)
    ref_conv = nnx.Conv(4, 8, (3, 3), strides=(2, 1), padding="VALID", rngs=nnx.Rngs(0))
    ref_conv.kernel[...] = conv.kernel[...]
    np.testing.assert_allclose(
        np.asarray(conv(xc, deterministic=True)), np.asarray(ref_conv(xc)), rtol=1e-5, atol=1e-5
    )


def test_nnx_layer_under_jit_and_masks():
    layer = vd.VDDenseNNX(4, 3, rngs=nnx.Rngs(0))

    @nnx.jit
    def forward(m, x, key):
        return m(x, rngs=key)

    y = forward(layer, jnp.ones((2, 4)), jax.random.key(0))
    assert y.shape == (2, 3) and bool(jnp.all(jnp.isfinite(y)))
    state = nnx.state(layer, nnx.Param)
    masks = vd.to_masks(state)
    jmasks.validate_masks(masks, state)
    assert jmasks.count_active(masks) == {"kernel": 12}
    assert float(vd.kl_divergence(state)) > 0


def test_to_masks_matches_threshold_rule():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = vd.VDDense(6)(x, deterministic=True)
            x = nn.Dense(3)(x)
            return vd.VDConv(2, (1,))(x[..., None, :], deterministic=True)

    params = Net().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    params = jax.tree.map(lambda x: x, params)
    params["VDDense_0"]["log_sigma2"] = jax.random.uniform(
        jax.random.key(1), (4, 6), minval=-6.0, maxval=4.0
    )
    params["VDConv_0"]["log_sigma2"] = jax.random.uniform(
        jax.random.key(2), (1, 3, 2), minval=-6.0, maxval=4.0
    )
    for threshold in (-1.0, 0.5, 3.0):
        masks = vd.to_masks({"params": params}, threshold)
        jmasks.validate_masks(masks, {"params": params})
        m = masks["params"]
        assert m["Dense_0"]["kernel"] is None and m["Dense_0"]["bias"] is None
        assert m["VDDense_0"]["log_sigma2"] is None and m["VDDense_0"]["bias"] is None
        for name in ("VDDense_0", "VDConv_0"):
            la = vd.log_alpha(params[name]["kernel"], params[name]["log_sigma2"])
            np.testing.assert_array_equal(np.asarray(m[name]["kernel"]), np.asarray(la < threshold))
        # The masks feed jaxsparse.metrics.
        n_on = int(jnp.sum(m["VDDense_0"]["kernel"])) + int(jnp.sum(m["VDConv_0"]["kernel"]))
        assert float(metrics.global_sparsity(masks)) == pytest.approx(1 - n_on / 30)


@settings(max_examples=examples(20, nightly=1000), deadline=None)
@given(st.floats(-7.9, 8.0), st.integers(0, 2**16))
def test_to_masks_property(threshold, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "kernel": jax.random.normal(k1, (3, 4)),
        "log_sigma2": jax.random.uniform(k2, (3, 4), minval=-10.0, maxval=6.0),
    }
    mask = vd.to_masks(params, threshold)["kernel"]
    la = np.clip(
        np.asarray(params["log_sigma2"]) - np.log(np.asarray(params["kernel"]) ** 2 + 1e-8), -8, 8
    )
    # Away from the boundary (float rounding) the rule is exact.
    clear = np.abs(la - threshold) > 1e-4
    np.testing.assert_array_equal(np.asarray(mask)[clear], (la < threshold)[clear])


def test_penalty_schedule_ramps_linearly():
    sched = vd.penalty_schedule(0.5, warmup_steps=10, begin_step=5)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == 0.0
    assert float(sched(10)) == pytest.approx(0.25)
    assert float(sched(15)) == pytest.approx(0.5)
    assert float(sched(1000)) == pytest.approx(0.5)
    const = vd.penalty_schedule(2.0, warmup_steps=0)
    assert float(const(0)) == 2.0 and float(const(9)) == 2.0


@pytest.mark.parametrize("bad", [8.5, -8.0, float("nan"), float("inf")])
def test_bad_threshold_errors(bad):
    params = {"kernel": jnp.ones((2, 2)), "log_sigma2": jnp.zeros((2, 2))}
    with pytest.raises(ValueError, match=r"threshold \(on log alpha\) must be a finite number"):
        vd.to_masks(params, bad)
    with pytest.raises(ValueError, match="threshold"):
        vd.VDDense(2, threshold=bad).init(jax.random.key(0), jnp.ones((1, 2)), deterministic=True)
    with pytest.raises(ValueError, match="threshold"):
        vd.VDDenseNNX(2, 2, threshold=bad, rngs=nnx.Rngs(0))


def test_bad_penalty_weight_errors():
    with pytest.raises(ValueError, match=r"peak_value \(penalty weight\) must be a finite"):
        vd.penalty_schedule(-1.0, 10)
    with pytest.raises(ValueError, match="peak_value"):
        vd.penalty_schedule(float("nan"), 10)
    with pytest.raises(TypeError, match="peak_value .* must be a number"):
        vd.penalty_schedule("big", 10)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        vd.penalty_schedule(1.0, -3)


def test_no_vd_parameters_errors():
    params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="found no variational dropout parameters"):
        vd.to_masks(params)
    with pytest.raises(ValueError, match="'kernel' and 'log_sigma2'"):
        vd.kl_divergence(params)
    bad = {"kernel": jnp.ones((2, 3)), "log_sigma2": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match=r"kernel has shape \(2, 3\) but log_sigma2 has shape"):
        vd.to_masks(bad)


def test_training_without_rng_errors():
    layer, variables = _dense_vars()
    with pytest.raises(ValueError, match="VDDense is stochastic in training .* needs a PRNG key"):
        layer.apply(variables, jnp.ones((1, 4)), deterministic=False)
    nnx_layer = vd.VDDenseNNX(4, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="VDDenseNNX is stochastic in training"):
        nnx_layer(jnp.ones((1, 4)))
    with pytest.raises(TypeError, match="rngs must be a jax.random.key"):
        nnx_layer(jnp.ones((1, 4)), rngs=3)


def test_masks_feed_condensed_export():
    """A trained VD layer exports to the condensed form and runs exactly as its eval path."""
    from jaxsparse.condensed.export import condense, expand
    from jaxsparse.condensed.reference import condensed_matmul_reference

    layer = vd.VDDense(5)
    x = jax.random.normal(jax.random.key(1), (3, 8))
    p = dict(layer.init(jax.random.key(0), x, deterministic=True)["params"])
    p["log_sigma2"] = jax.random.uniform(jax.random.key(2), (8, 5), minval=-6.0, maxval=4.0)
    p["bias"] = jnp.linspace(-1.0, 1.0, 5)
    masks = vd.to_masks(p)
    layers = condense(p, masks, pad=True)
    assert list(layers) == [""]  # the layer at the root of this params dict
    c = layers[""]
    y = expand(condensed_matmul_reference(x, c.values, c.indices, c.bias), c)
    ref = layer.apply({"params": p}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_training_loss_gradients_reach_every_parameter():
    layer, variables = _dense_vars()
    x = jax.random.normal(jax.random.key(1), (8, 4))

    @jax.jit
    def loss(p):
        y = layer.apply({"params": p}, x, deterministic=False, rng=jax.random.key(3))
        return jnp.mean(y**2) + 1e-3 * vd.kl_divergence(p)

    p = dict(variables["params"])
    p["log_sigma2"] = jnp.full((4, 5), -2.0)
    grads = jax.grad(loss)(p)
    for name in ("kernel", "log_sigma2", "bias"):
        g = grads[name]
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, name
