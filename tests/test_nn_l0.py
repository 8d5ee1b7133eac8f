"""L0 hard-concrete layers (Louizos et al. 2018): gates, penalty, layers, masks, errors."""

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
from jaxsparse.nn import l0
from tests.helpers import examples

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def test_expected_l0_closed_form():
    shift = BETA * math.log(-GAMMA / ZETA)  # ~ -1.5986
    la = jnp.array([shift, 0.0, 2.197, -5.0], jnp.float32)
    got = np.asarray(l0.expected_l0(la))
    expected = [0.5, sigmoid(-shift), sigmoid(2.197 - shift), sigmoid(-5.0 - shift)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_l0_penalty_sums_layers():
    params = {
        "a": {"kernel": jnp.ones((2, 3)), "log_alpha": jnp.zeros((2, 3)), "bias": jnp.ones(3)},
        "b": {"kernel": jnp.ones((3, 1)), "log_alpha": jnp.full((3, 1), 2.197)},
        "dense": {"kernel": jnp.ones((4, 4))},
    }
    shift = BETA * math.log(-GAMMA / ZETA)
    expected = 6 * sigmoid(-shift) + 3 * sigmoid(2.197 - shift)
    assert float(l0.l0_penalty(params)) == pytest.approx(expected, rel=1e-5)
    g = jax.grad(l0.l0_penalty)(params)
    assert float(jnp.sum(g["a"]["log_alpha"])) > 0


def test_deterministic_gate_closed_form():
    la = jnp.array([-10.0, -math.log(11.0) - 0.01, 0.0, 2.197, 10.0])
    got = np.asarray(l0.deterministic_gate(la))
    expected = [min(1, max(0, sigmoid(v) * 1.2 - 0.1)) for v in np.asarray(la)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert got[0] == 0.0 and got[1] == 0.0 and got[-1] == 1.0


def test_sample_gate_matches_formula_and_statistics():
    key = jax.random.key(0)
    la = jnp.full((20000,), 0.5)
    z = l0.sample_gate(key, la)
    u = jax.random.uniform(key, la.shape, minval=1e-6, maxval=1 - 1e-6)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + la) / BETA)
    np.testing.assert_allclose(np.asarray(z), np.asarray(jnp.clip(s * 1.2 - 0.1, 0, 1)), atol=1e-6)
    # P(z != 0) is the expected-L0 term.
    p_nonzero = float(jnp.mean(z > 0))
    assert p_nonzero == pytest.approx(float(l0.expected_l0(jnp.array(0.5))), abs=0.01)
    assert float(jnp.min(z)) == 0.0 and float(jnp.max(z)) == 1.0


def test_dense_reduces_to_flax_dense_when_gates_open():
    layer = l0.L0Dense(5, log_alpha_init=20.0)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    variables = layer.init(jax.random.key(0), x, deterministic=True)
    p = {**variables["params"], "bias": jnp.arange(5, dtype=jnp.float32)}
    ref = nn.Dense(5).apply({"params": {"kernel": p["kernel"], "bias": p["bias"]}}, x)
    y = layer.apply({"params": p}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)
    # With log alpha = 20 the sampled gates are open as well.
    y_train = layer.apply({"params": p}, x, deterministic=False, rng=jax.random.key(3))
    np.testing.assert_allclose(np.asarray(y_train), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_dense_training_gates_weights():
    layer = l0.L0Dense(3)
    x = jax.random.normal(jax.random.key(1), (2, 4))
    p = dict(layer.init(jax.random.key(0), x, deterministic=True)["params"])
    p["log_alpha"] = jax.random.normal(jax.random.key(2), (4, 3))
    key = jax.random.key(9)
    y = layer.apply({"params": p}, x, deterministic=False, rng=key)
    z = l0.sample_gate(key, p["log_alpha"])
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ (p["kernel"] * z) + p["bias"][None, :]),
                               rtol=1e-5, atol=1e-6)
    y_eval = layer.apply({"params": p}, x, deterministic=True)
    z_eval = l0.deterministic_gate(p["log_alpha"])
    np.testing.assert_allclose(np.asarray(y_eval),
                               np.asarray(x @ (p["kernel"] * z_eval) + p["bias"][None, :]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=(3, 3)),
        dict(kernel_size=(3, 3), strides=2, padding="VALID", kernel_dilation=1),
        dict(kernel_size=(2,), padding=1, feature_group_count=2),
    ],
)
def test_conv_reduces_to_flax_conv_when_gates_open(kwargs):
    spatial = (7,) if len(kwargs["kernel_size"]) == 1 else (6, 5)
    x = jax.random.normal(jax.random.key(3), (2, *spatial, 4))
    layer = l0.L0Conv(6, log_alpha_init=20.0, **kwargs)
    p = dict(layer.init(jax.random.key(0), x, deterministic=True)["params"])
    p["bias"] = jnp.linspace(-1.0, 1.0, 6)
    ref = nn.Conv(6, **kwargs).apply({"params": {"kernel": p["kernel"], "bias": p["bias"]}}, x)
    y = layer.apply({"params": p}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_nnx_layers_match_linen():
    x = jax.random.normal(jax.random.key(1), (3, 4))
    layer = l0.L0DenseNNX(4, 5, rngs=nnx.Rngs(0))
    layer.log_alpha[...] = jax.random.normal(jax.random.key(4), (4, 5))
    params = {"kernel": layer.kernel[...], "log_alpha": layer.log_alpha[...],
              "bias": layer.bias[...]}
    linen = l0.L0Dense(5)
    for det, rng in ((True, None), (False, jax.random.key(5))):
        got = layer(x, deterministic=det, rngs=rng)
        ref = linen.apply({"params": params}, x, deterministic=det, rng=rng)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)

    xc = jax.random.normal(jax.random.key(2), (2, 6, 6, 4))
    conv = l0.L0ConvNNX(4, 8, (3, 3), padding="VALID", log_alpha_init=20.0, rngs=nnx.Rngs(0))
    ref_conv = nnx.Conv(4, 8, (3, 3), padding="VALID", rngs=nnx.Rngs(0))
    ref_conv.kernel[...] = conv.kernel[...]
    np.testing.assert_allclose(np.asarray(conv(xc, deterministic=True)),
                               np.asarray(ref_conv(xc)), rtol=1e-5, atol=1e-5)
    state = nnx.state(conv, nnx.Param)
    masks = l0.to_masks(state)
    jmasks.validate_masks(masks, state)
    assert jmasks.count_active(masks) == {"kernel": 3 * 3 * 4 * 8}


def test_to_masks_matches_gate_rule():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = l0.L0Dense(6)(x, deterministic=True)
            return nn.Dense(2)(x)

    params = Net().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    params = jax.tree.map(lambda x: x, params)
    la = jax.random.uniform(jax.random.key(1), (4, 6), minval=-5.0, maxval=3.0)
    params["L0Dense_0"]["log_alpha"] = la
    for threshold in (0.0, 0.5):
        masks = l0.to_masks(params, threshold)
        jmasks.validate_masks(masks, params)
        assert masks["Dense_0"]["kernel"] is None
        assert masks["L0Dense_0"]["log_alpha"] is None and masks["L0Dense_0"]["bias"] is None
        gate = np.clip(1 / (1 + np.exp(-np.asarray(la))) * 1.2 - 0.1, 0, 1)
        np.testing.assert_array_equal(np.asarray(masks["L0Dense_0"]["kernel"]), gate > threshold)
    # threshold 0: gate > 0 <=> log alpha > -log(11).
    m0 = np.asarray(l0.to_masks(params)["L0Dense_0"]["kernel"])
    np.testing.assert_array_equal(m0, np.asarray(la) > -math.log(11.0))
    assert float(metrics.global_sparsity(l0.to_masks(params))) == pytest.approx(1 - m0.mean())


@settings(max_examples=examples(20, nightly=1000), deadline=None)
@given(st.floats(0.0, 0.99), st.integers(0, 2**16))
def test_masked_eval_equals_gated_eval(threshold, seed):
    """Eval output with the gates equals the dense product with gates zeroed outside the
    mask (the mask keeps exactly the nonzero gates at threshold 0); a higher threshold keeps
    exactly the gates above it, a subset."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    p = {"kernel": jax.random.normal(k1, (3, 2)),
         "log_alpha": jax.random.uniform(k2, (3, 2), minval=-6.0, maxval=6.0),
         "bias": jnp.zeros(2)}
    x = jax.random.normal(k3, (4, 3))
    y = l0.L0Dense(2).apply({"params": p}, x, deterministic=True)
    mask = l0.to_masks(p)["kernel"]
    gate = l0.deterministic_gate(p["log_alpha"])
    y_masked = x @ jnp.where(mask, p["kernel"] * gate, 0.0)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_masked), rtol=1e-5, atol=1e-6)
    above = np.asarray(l0.to_masks(p, threshold)["kernel"])
    np.testing.assert_array_equal(above, np.asarray(gate) > threshold)
    assert not np.any(above & ~np.asarray(mask))


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_bad_threshold_errors(bad):
    params = {"kernel": jnp.ones((2, 2)), "log_alpha": jnp.zeros((2, 2))}
    with pytest.raises(ValueError, match=r"threshold \(on the evaluation gate\) must be"):
        l0.to_masks(params, bad)


def test_bad_hyperparameters_error():
    with pytest.raises(ValueError, match="gamma must be < 0"):
        l0.L0DenseNNX(2, 2, gamma=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="zeta must be > 1"):
        l0.l0_penalty({"kernel": jnp.ones((2, 2)), "log_alpha": jnp.zeros((2, 2))}, zeta=0.9)
    with pytest.raises(ValueError, match=r"beta \(hard-concrete temperature\) must be"):
        l0.L0Dense(2, beta=0.0).init(jax.random.key(0), jnp.ones((1, 2)), deterministic=True)
    with pytest.raises(ValueError, match=r"peak_value \(penalty weight\)"):
        l0.penalty_schedule(-0.5, 100)


def test_no_l0_parameters_errors():
    params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="found no L0 parameters"):
        l0.to_masks(params)
    with pytest.raises(ValueError, match="'kernel' and 'log_alpha'"):
        l0.l0_penalty(params)


def test_training_without_rng_errors():
    layer = l0.L0Dense(2)
    variables = layer.init(jax.random.key(0), jnp.ones((1, 3)), deterministic=True)
    with pytest.raises(ValueError, match="L0Dense is stochastic in training .* needs a PRNG key"):
        layer.apply(variables, jnp.ones((1, 3)), deterministic=False)
    with pytest.raises(ValueError, match="L0DenseNNX is stochastic in training"):
        l0.L0DenseNNX(3, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 3)))


def test_training_loss_gradients_reach_the_gates():
    layer = l0.L0Dense(3)
    x = jax.random.normal(jax.random.key(1), (8, 4))
    p = dict(layer.init(jax.random.key(0), x, deterministic=True)["params"])
    p["log_alpha"] = jnp.zeros((4, 3))

    @jax.jit
    def loss(p):
        y = layer.apply({"params": p}, x, deterministic=False, rng=jax.random.key(3))
        return jnp.mean(y**2) + 1e-2 * l0.l0_penalty(p)

    grads = jax.grad(loss)(p)
    for name in ("kernel", "log_alpha", "bias"):
        g = grads[name]
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, name
