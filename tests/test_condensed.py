"""Condensed export, reference, model-level export, dispatch and Flax layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxsparse.condensed as C
from jaxsparse.condensed.layers import (
    CondensedDense,
    CondensedLinear,
    CondensedStructure,
    condensed_interceptor,
    swap_linear,
)
from tests.helpers import examples


def random_mask_per_neuron(seed, shape, k):
    """A random mask with exactly ``k`` active inputs per neuron (column), in numpy: the
    export does not care how a mask was drawn, and a jitted draw compiles once per shape."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for col in range(shape[1]):
        mask[rng.permutation(shape[0])[:k], col] = True
    return mask


def make_layer(seed, n_in, n_out, k, ablate=(), dtype=jnp.float32):
    _, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    mask = random_mask_per_neuron(seed, (n_in, n_out), k)
    mask[:, list(ablate)] = False
    kernel = jax.random.normal(k2, (n_in, n_out)).astype(dtype)
    bias = jax.random.normal(k3, (n_out,)).astype(dtype)
    return kernel, jnp.asarray(mask), bias


def masked_dense(x, kernel, mask, bias):
    w = jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))
    return jnp.matmul(x, w, precision="highest") + bias[None, :]


@pytest.mark.parametrize(
    "n, dtype", [(1, "int8"), (128, "int8"), (129, "int16"), (32768, "int16"),
                 (32769, "int32")]
)
def test_index_dtype_is_smallest_that_fits(n, dtype):
    assert C.index_dtype(n) == np.dtype(dtype)


def test_condense_layer_fields_and_exact_values():
    kernel, mask, bias = make_layer(0, 12, 6, 3, ablate=(2,))
    layer = C.condense_layer(kernel, mask, bias)
    assert layer.values.shape == (5, 3) and layer.indices.shape == (5, 3)
    assert layer.indices.dtype == jnp.int8
    np.testing.assert_array_equal(layer.neurons, [0, 1, 3, 4, 5])
    assert layer.neurons.dtype == jnp.int32
    for a, col in enumerate([0, 1, 3, 4, 5]):
        rows = np.flatnonzero(np.asarray(mask[:, col]))
        np.testing.assert_array_equal(layer.indices[a], rows)  # ascending
        np.testing.assert_array_equal(layer.values[a], np.asarray(kernel)[rows, col])
    np.testing.assert_array_equal(layer.bias, np.asarray(bias)[[0, 1, 3, 4, 5]])
    np.testing.assert_array_equal(layer.ablated_bias, [0, 0, bias[2], 0, 0, 0])
    assert not layer.padded


def np_layer(seed, n_in, n_out, k, n_abl):
    rng = np.random.default_rng(seed)
    mask = np.zeros((n_in, n_out), bool)
    for col in range(n_abl, n_out):
        mask[rng.permutation(n_in)[:k], col] = True
    kernel = rng.standard_normal((n_in, n_out)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    return kernel, mask, bias


@pytest.mark.slow
@settings(max_examples=examples(6, nightly=40), deadline=None)
@given(
    n_in=st.integers(1, 300), n_out=st.integers(1, 40), k_frac=st.floats(0.01, 1.0),
    ablate_frac=st.floats(0.0, 0.9), batch=st.integers(1, 5), seed=st.integers(0, 2**16),
)
def test_round_trip_and_reference_match_dense(n_in, n_out, k_frac, ablate_frac, batch, seed):
    k = max(1, int(k_frac * n_in))
    n_abl = int(ablate_frac * n_out)
    kernel, mask, bias = np_layer(seed, n_in, n_out, k, n_abl)
    layer = C.condense_layer(kernel, mask, bias)
    assert layer.indices.dtype == C.index_dtype(n_in)
    assert layer.n_active == n_out - n_abl and (layer.n_active == 0 or layer.k == k)
    w, b = C.to_dense(layer)
    np.testing.assert_array_equal(w, np.where(mask, kernel, 0.0))
    np.testing.assert_array_equal(b, bias)
    s = C.structure_layer(kernel, mask, bias)
    np.testing.assert_array_equal(s.kernel, np.where(mask, kernel, 0.0)[:, n_abl:])
    x = np.random.default_rng(seed + 1).standard_normal((batch, n_in)).astype(np.float32)
    want = x.astype(np.float64) @ np.where(mask, kernel, 0.0) + bias
    got = C.expand(C.condensed_matmul_reference(x, layer.values, layer.indices, layer.bias),
                   layer)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got_s = C.expand(C.structured_dense(x, s), s)
    np.testing.assert_allclose(got_s, want, rtol=1e-4, atol=1e-4)


def test_non_constant_fan_in_is_an_error_unless_padded():
    kernel, mask, bias = make_layer(1, 10, 4, 3)
    mask = np.array(mask)
    mask[np.flatnonzero(~mask[:, 1])[0], 1] = True  # neuron 1: fan-in 4
    with pytest.raises(ValueError, match="constant fan-in.*between 3 and 4.*pad=True"):
        C.condense_layer(kernel, jnp.asarray(mask), bias)
    layer = C.condense_layer(kernel, jnp.asarray(mask), bias, pad=True)
    assert layer.padded and layer.k == 4
    x = jax.random.normal(jax.random.key(2), (3, 10))
    got = C.condensed_matmul_reference(x, layer.values, layer.indices, layer.bias)
    np.testing.assert_allclose(got, masked_dense(x, kernel, mask, bias), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    kernel, mask, bias = make_layer(3, 8, 4, 2)
    with pytest.raises(ValueError, match="mask shape"):
        C.condense_layer(kernel, mask[:4], bias)
    with pytest.raises(TypeError, match="bool"):
        C.condense_layer(kernel, mask.astype(jnp.int32), bias)
    with pytest.raises(ValueError, match="bias shape"):
        C.condense_layer(kernel, mask, bias[:3])
    with pytest.raises(TypeError, match="bias dtype"):
        C.condense_layer(kernel, mask, bias.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="2-D"):
        C.condense_layer(kernel[None], mask[None], bias)
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda k: C.condense_layer(k, mask, bias))(kernel)
    layer = C.condense_layer(kernel, mask, bias)
    bad = layer.replace(indices=layer.indices.at[0, 0].set(8))
    with pytest.raises(ValueError, match=r"indices\[0, 0\] = 8 is out of range"):
        C.validate_condensed(bad)
    with pytest.raises(ValueError, match=r"indices\[1, 1\] = -1 is out of range"):
        C.validate_condensed(layer.replace(indices=layer.indices.at[1, 1].set(-1)))
    with pytest.raises(ValueError, match="must both be"):
        C.validate_condensed(layer.replace(indices=layer.indices[:, :1]))
    with pytest.raises(ValueError, match="input features"):
        C.condensed_dense(jnp.ones((2, 9)), layer, impl="reference")


def test_condense_tree_of_linen_mlp():
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    params = model.init(jax.random.key(0), jnp.ones((1, 300)))
    masks = jax.tree.map(lambda x: None, params)
    masks["params"]["layers_0"]["kernel"] = jnp.asarray(random_mask_per_neuron(
        1, (300, 16), 30))
    layers = C.condense(params, masks)
    assert set(layers) == {"params/layers_0"}
    assert layers["params/layers_0"].indices.dtype == jnp.int16
    bad = dict(masks)
    bad["params"] = dict(masks["params"])
    bad["params"]["layers_0"] = {"kernel": masks["params"]["layers_0"]["kernel"],
                                 "bias": jnp.ones((16,), bool)}
    with pytest.raises(ValueError, match="only 2-D Dense kernels"):
        C.condense(params, bad)


@pytest.mark.parametrize("activation", [jax.nn.relu,
                                        pytest.param(jax.nn.gelu, marks=pytest.mark.slow)])
def test_mlp_export_folds_ablated_neurons_exactly(activation):
    dims, params, masks = [20, 32, 24, 10], [], []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        kernel, mask, bias = make_layer(10 + i, a, b, 5, ablate=(1, 3, 7) if i < 2 else ())
        params.append({"kernel": kernel, "bias": bias})
        masks.append(mask)
    model = C.condense_mlp(params, masks, activation=activation)
    # Layer 1 lost 3 input rows: its input shrank, its fan-in stays 5 through padding.
    assert [lay.n_in for lay in model.layers] == [20, 29, 21]
    assert [lay.condensed.k for lay in model.layers] == [5, 5, 5]
    x = jax.random.normal(jax.random.key(0), (7, 20))
    want = C.dense_mlp_apply(params, masks, x, activation)
    for form in ("condensed", "structured", "auto"):
        got = jax.jit(lambda x, form=form: C.mlp_apply(model, x, form=form))(x)
        assert got.shape == (7, 10)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mlp_export_checks_fan_in_on_trained_masks():
    k0, m0, b0 = make_layer(0, 10, 6, 3)
    k1, m1, b1 = make_layer(1, 6, 4, 2)
    m1 = m1.at[:, 0].set(True)  # neuron 0 of layer 1 has fan-in 6
    with pytest.raises(ValueError, match="layer 1: the condensed form needs constant fan-in"):
        C.condense_mlp([{"kernel": k0, "bias": b0}, {"kernel": k1, "bias": b1}], [m0, m1])
    with pytest.raises(ValueError, match="n_in=10 does not match the previous layer.s n_out=6"):
        C.condense_mlp([{"kernel": k0, "bias": b0}, {"kernel": k0, "bias": b0}], [m0, m0])


def test_cost_model_dispatch():
    sparse = C.sparse_linear(*make_layer(0, 768, 64, 8))  # ~99% sparse
    dense = C.sparse_linear(*make_layer(0, 64, 64, 64))  # fully dense
    cost = C.CostModel()
    assert C.choose_form(sparse, 1, cost) == "condensed"
    assert C.choose_form(dense, 256, cost) == "structured"
    cond_only = C.SparseLinear(sparse.condensed)
    assert C.choose_form(cond_only, 4096, cost) == "condensed"
    with pytest.raises(ValueError, match="without the structured form"):
        C.sparse_dense(jnp.ones((1, 768)), cond_only, form="structured")
    with pytest.raises(ValueError, match="unknown form"):
        C.sparse_dense(jnp.ones((1, 768)), sparse, form="csr")


def test_linen_condensed_dense_and_interceptor():
    model = nn.Sequential([nn.Dense(24), nn.relu, nn.Dense(24), nn.relu, nn.Dense(5)])
    x = jax.random.normal(jax.random.key(0), (3, 40))
    params = model.init(jax.random.key(1), x)
    masks = jax.tree.map(lambda p: None, params)
    for name, (shape, k) in {"layers_0": ((40, 24), 6), "layers_2": ((24, 24), 4)}.items():
        mask = random_mask_per_neuron(len(name), shape, k)
        mask[:, 5] = False  # an ablated neuron
        masks["params"][name]["kernel"] = jnp.asarray(mask)
    masked = jax.tree.map(
        lambda p, m: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)),
        params, masks, is_leaf=lambda t: t is None)
    want = model.apply(masked, x)
    layers = C.condense(params, masks)
    with condensed_interceptor(layers, impl="reference"):
        got = model.apply(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    layer = layers["params/layers_0"]
    mod = CondensedDense(features=24, n_active=layer.n_active, k=layer.k,
                         index_dtype=layer.indices.dtype, impl="reference")
    variables = CondensedDense.variables_from(layer)
    init_vars = mod.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, init_vars) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_allclose(
        mod.apply(variables, x), nn.Dense(24).apply({"params": masked["params"]["layers_0"]}, x),
        rtol=1e-5, atol=1e-5)


def test_nnx_swap_linear():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(30, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)])

        def __call__(self, x):
            return self.layers[1](jax.nn.relu(self.layers[0](x)))

    model = MLP(nnx.Rngs(0))
    masks = jax.tree.map(lambda p: None, nnx.state(model, nnx.Param))
    mask = random_mask_per_neuron(3, (30, 16), 5)
    mask[:, 2] = False
    masks["layers"][0]["kernel"] = jnp.asarray(mask)
    model.layers[0].kernel[...] = jnp.where(mask, model.layers[0].kernel[...], 0.0)
    x = jax.random.normal(jax.random.key(4), (6, 30))
    want = model(x)
    assert swap_linear(model, masks, impl="reference") == ["layers/0"]
    assert isinstance(model.layers[0], CondensedLinear)
    np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)
    structure = nnx.state(model, CondensedStructure)
    assert structure["layers"][0]["indices"][...].dtype == jnp.int8
    assert "indices" not in nnx.state(model, nnx.Param)["layers"][0]


def test_cost_model_prefers_condensed_for_bf16_on_cpu():
    k, m, b = make_layer(0, 768, 64, 153)  # 80% sparse
    f32 = C.sparse_linear(k, m, b)
    bf16 = C.sparse_linear(k.astype(jnp.bfloat16), m, b.astype(jnp.bfloat16))
    cost = C.CostModel()
    assert C.choose_form(f32, 256, cost) == "structured"
    assert C.choose_form(bf16, 1, cost) == "condensed"
