"""Masks: prunable predicates, validation errors, get_masks lookup."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse
from jaxsparse import masks as M
from tests.helpers import lenient, tiny_params


def test_default_prunable_selects_kernels_only():
    params = tiny_params()
    assert M.prunable_paths(params) == ["dense0/kernel", "dense1/kernel"]


def test_prunable_regex_and_predicate():
    params = tiny_params()
    assert M.prunable_paths(params, r"dense1/kernel") == ["dense1/kernel"]
    assert M.prunable_paths(params, [r"dense0/kernel", r"norm"]) == ["dense0/kernel",
                                                                      "norm/scale"]
    assert M.prunable_paths(params, lambda p, x: x.ndim == 1) == [
        "dense0/bias", "dense1/bias", "norm/scale"]
    with pytest.raises(TypeError, match="prunable must be"):
        M.prunable_paths(params, 3)
    # Compiled patterns work like strings, alone or in a list.
    assert M.prunable_paths(params, re.compile(r"dense1/k")) == ["dense1/kernel"]
    assert M.prunable_paths(params, [re.compile(r"norm"), r"dense0/k"]) == [
        "dense0/kernel", "norm/scale"]


def test_apply_masks_zeroes_inactive_and_keeps_dense():
    params = tiny_params()
    masks = M.ones_masks(params)
    masks["dense0"]["kernel"] = masks["dense0"]["kernel"].at[0].set(False)
    out = jaxsparse.apply_masks(params, masks)
    assert np.all(out["dense0"]["kernel"][0] == 0)
    np.testing.assert_array_equal(out["dense0"]["kernel"][1:], params["dense0"]["kernel"][1:])
    np.testing.assert_array_equal(out["norm"]["scale"], params["norm"]["scale"])


def test_mask_shape_mismatch_names_leaf():
    params = tiny_params()
    masks = M.ones_masks(params)
    masks["dense1"]["kernel"] = jnp.ones((3, 3), bool)
    with pytest.raises(ValueError, match=r"mask for 'dense1/kernel' has shape \(3, 3\)"):
        jaxsparse.apply_masks(params, masks)


def test_mask_dtype_mismatch_names_leaf():
    params = tiny_params()
    masks = M.ones_masks(params)
    masks["dense0"]["kernel"] = jnp.ones((20, 16), jnp.float32)
    with pytest.raises(ValueError, match="mask for 'dense0/kernel' must be a bool array"):
        jaxsparse.validate_masks(masks, params)


def test_mask_structure_mismatch_names_leaves():
    params = tiny_params()
    masks = M.ones_masks(params)
    del masks["norm"]
    with pytest.raises(ValueError, match="norm/scale"):
        jaxsparse.validate_masks(masks, params)


def test_get_masks_inside_chain_and_errors():
    params = tiny_params()
    sparse = jaxsparse.static(lenient(optax.sgd(0.1)), 0.5, key=jax.random.key(0),
                              distribution="uniform")
    state = optax.chain(optax.identity(), sparse).init(params)
    masks = jaxsparse.get_masks(state)
    assert jaxsparse.count_active(masks) == {"dense0/kernel": 160, "dense1/kernel": 64}
    with pytest.raises(ValueError, match="no jaxsparse SparseState"):
        jaxsparse.get_masks(optax.adam(1e-3).init(params))
    two = (state[1], state[1])  # what optax.chain(sparse, sparse).init(params) returns
    with pytest.raises(ValueError, match="found 2 SparseStates"):
        jaxsparse.get_masks(two)


def test_factory_argument_errors():
    inner = optax.sgd(0.1)
    params = tiny_params()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        jaxsparse.rigl(inner, 1.0, key=jax.random.key(0), end_step=10)
    with pytest.raises(ValueError, match="needs key"):
        jaxsparse.rigl(inner, 0.5, key=None, end_step=10)
    with pytest.raises(ValueError, match="unknown distribution 'foo'"):
        jaxsparse.rigl(inner, 0.5, key=jax.random.key(0), end_step=10,
                       distribution="foo").init(params)
    with pytest.raises(ValueError, match="override 'conv' matches no prunable leaf"):
        jaxsparse.set(inner, 0.5, key=jax.random.key(0), end_step=10,
                      overrides={"conv": 0.0}).init(params)
    with pytest.raises(ValueError, match="drop_fraction must be in"):
        jaxsparse.rigl(inner, 0.5, key=jax.random.key(0), end_step=10, drop_fraction=1.5)
    with pytest.raises(ValueError, match="unknown drop fraction decay"):
        jaxsparse.rigl(inner, 0.5, key=jax.random.key(0), end_step=10,
                       drop_fraction_decay="linear")
    with pytest.raises(ValueError, match="update_every must be an integer >= 1"):
        jaxsparse.rigl(inner, 0.5, key=jax.random.key(0), end_step=10, update_every=0)
    with pytest.raises(ValueError, match="end_step .* must be greater than begin_step"):
        jaxsparse.rigl(inner, 0.5, key=jax.random.key(0), end_step=10, begin_step=20)
    with pytest.raises(ValueError, match="layer 'dense0/kernel'.*would keep no weights"):
        jaxsparse.static(inner, 0.999, key=jax.random.key(0),
                         distribution="uniform").init(params)
    with pytest.raises(ValueError, match="unknown ranking"):
        jaxsparse.magnitude_pruning(inner, 0.5, end_step=10, ranking="best")
    with pytest.raises(ValueError, match="initial_sparsity .* must not exceed"):
        jaxsparse.magnitude_pruning(inner, 0.5, end_step=10, initial_sparsity=0.7)
    with pytest.raises(ValueError, match="momentum must be in"):
        jaxsparse.snfs(inner, 0.5, key=jax.random.key(0), end_step=10, momentum=1.0)


def test_overrides_keep_first_layer_dense_in_rigl():
    params = tiny_params()
    tx = jaxsparse.rigl(optax.sgd(0.1), 0.8, key=jax.random.key(0), end_step=10,
                        distribution="uniform", overrides={"dense0": 0.0})
    masks = jaxsparse.get_masks(tx.init(params))
    assert masks["dense0"]["kernel"] is None
    assert int(masks["dense1"]["kernel"].sum()) == round(0.2 * 128)


def test_sparse_init_rescales_each_neuron_to_its_active_fan_in():
    w = jnp.arange(1.0, 13.0).reshape(4, 3)  # fan-in 4, 3 neurons
    m = jnp.array([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]], bool)  # active 4, 1, 0
    params = {"k": w, "b": jnp.ones(3)}
    out = jaxsparse.sparse_init(params, {"k": m, "b": None})
    expected = np.where(np.asarray(m), np.asarray(w) * np.sqrt([4 / 4, 4 / 1, 1.0]), 0.0)
    np.testing.assert_allclose(out["k"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["b"], params["b"])
    # Conv kernels: the neuron is the output channel, fan-in h * w * in.
    conv = jnp.ones((3, 3, 2, 4))
    cm = jnp.zeros((3, 3, 2, 4), bool).at[0, 0, 0, :].set(True).at[1, 1, 1, 2].set(True)
    out = jaxsparse.sparse_init({"c": conv}, {"c": cm})["c"]
    assert float(out[0, 0, 0, 0]) == pytest.approx(np.sqrt(18.0))
    assert float(out[0, 0, 0, 2]) == pytest.approx(np.sqrt(9.0))
    with pytest.raises(ValueError, match="mask for 'k' must be a bool array"):
        jaxsparse.sparse_init(params, {"k": m.astype(jnp.float32), "b": None})


def test_sparse_init_restores_the_dense_output_variance():
    # A lecun-normal 512 -> 256 layer masked to 5%: plain masking shrinks the output
    # variance ~20x; the rescaled init keeps it at the dense value.
    kw, kx, km = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(kw, (512, 256)) / np.sqrt(512)
    x = jax.random.normal(kx, (2048, 512))
    m = jax.random.bernoulli(km, 0.05, (512, 256))
    dense_var = float(jnp.var(x @ w))
    plain_var = float(jnp.var(x @ jaxsparse.apply_masks({"k": w}, {"k": m})["k"]))
    scaled_var = float(jnp.var(x @ jaxsparse.sparse_init({"k": w}, {"k": m})["k"]))
    assert plain_var < 0.1 * dense_var
    assert scaled_var == pytest.approx(dense_var, rel=0.1)


def _mixed_params():
    """A float kernel beside bool and int8 leaves named like kernels."""
    return {"dense": {"kernel": jnp.full((4, 3), 2.0)},
            "flags": {"kernel": jnp.ones((4, 3), bool)},
            "quant": {"kernel": jnp.full((4, 3), 7, jnp.int8)}}


def test_only_floating_leaves_are_prunable_by_default():
    params = _mixed_params()
    assert M.prunable_paths(params) == ["dense/kernel"]
    assert jaxsparse.layer_specs(params) == [jaxsparse.LayerSpec("dense/kernel", (4, 3))]
    masks = M.ones_masks(params)
    assert masks["flags"]["kernel"] is None and masks["quant"]["kernel"] is None
    masks["dense"]["kernel"] = jnp.zeros((4, 3), bool)
    for fn in (jaxsparse.apply_masks, jaxsparse.sparse_init):
        out = fn(params, masks)
        assert out["flags"]["kernel"].dtype == jnp.bool_ and bool(jnp.all(out["flags"]["kernel"]))
        np.testing.assert_array_equal(out["quant"]["kernel"], params["quant"]["kernel"])
        assert not bool(jnp.any(out["dense"]["kernel"]))
    # bfloat16 and float16 kernels are floating: prunable.
    half = {"kernel": jnp.ones((2, 2), jnp.bfloat16), "w": jnp.ones((2, 2), jnp.float16)}
    assert M.prunable_paths(half) == ["kernel", "w"]


@pytest.mark.parametrize("prunable", [r"kernel", lambda path, leaf: leaf.ndim == 2])
def test_explicit_prunable_selecting_a_non_floating_leaf_names_it(prunable):
    with pytest.raises(TypeError, match=r"leaf 'flags/kernel' of dtype bool.*floating"):
        jaxsparse.layer_specs(_mixed_params(), prunable)
    with pytest.raises(TypeError, match="leaf 'flags/kernel'"):
        M.ones_masks(_mixed_params(), prunable)


def test_a_mask_over_an_integer_leaf_is_refused_naming_it():
    params = _mixed_params()
    masks = {"dense": {"kernel": None}, "flags": {"kernel": None},
             "quant": {"kernel": jnp.zeros((4, 3), bool)}}
    for fn in (jaxsparse.apply_masks, jaxsparse.sparse_init):
        with pytest.raises(TypeError, match=r"mask for 'quant/kernel' covers a leaf of dtype int8"):
            fn(params, masks)
