"""Per-layer budgets: uniform, ER, ERK, overrides, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxsparse
from jaxsparse.distributions import LayerSpec, layer_budgets, layer_specs
from tests.helpers import examples

LENET = [LayerSpec("fc1/kernel", (784, 300)), LayerSpec("fc2/kernel", (300, 100)),
         LayerSpec("fc3/kernel", (100, 10))]
CNN = [LayerSpec("conv1/kernel", (3, 3, 3, 16)), LayerSpec("conv2/kernel", (3, 3, 16, 32)),
       LayerSpec("fc/kernel", (512, 10))]


def total(specs):
    return sum(s.size for s in specs)


def test_uniform_is_per_layer():
    b = layer_budgets(LENET, 0.9, "uniform")
    assert b == {"fc1/kernel": 23520, "fc2/kernel": 3000, "fc3/kernel": 100}


@pytest.mark.parametrize("dist", ["er", "erk"])
@pytest.mark.parametrize("specs", [LENET, CNN])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_er_erk_global_budget_is_exact(dist, specs, sparsity):
    b = layer_budgets(specs, sparsity, dist)
    assert sum(b.values()) == round((1 - sparsity) * total(specs))
    assert all(0 < b[s.path] <= s.size for s in specs)


def test_erk_densities_follow_scores_and_saturate_at_one():
    b = layer_budgets(LENET, 0.9, "erk")
    # 100x10 would exceed density 1: it is made dense and eps re-solved.
    assert b["fc3/kernel"] == 1000
    d1, d2 = b["fc1/kernel"] / 235200, b["fc2/kernel"] / 30000
    s1, s2 = (784 + 300) / 235200, (300 + 100) / 30000
    assert d1 / d2 == pytest.approx(s1 / s2, rel=1e-3)


def test_erk_uses_kernel_dims_and_er_does_not():
    erk = layer_budgets(CNN, 0.9, "erk")
    er = layer_budgets(CNN, 0.9, "er")
    assert erk != er
    d_erk = {s.path: erk[s.path] / s.size for s in CNN}
    assert d_erk["conv1/kernel"] < 1  # neither conv saturates: their ratio is the scores'
    ratio = d_erk["conv1/kernel"] / d_erk["conv2/kernel"]
    assert ratio == pytest.approx((25 / 432) / (54 / 4608), rel=1e-2)
    d_er = {s.path: er[s.path] / s.size for s in CNN}
    assert d_er["conv1/kernel"] / d_er["conv2/kernel"] == pytest.approx(
        ((3 + 16) / 48) / ((16 + 32) / 512), rel=1e-2)  # ER: last two dims only


def test_erk_override_dense_moves_to_other_side():
    b = layer_budgets(CNN, 0.9, "erk", overrides={"conv1": 0.0})
    assert b["conv1/kernel"] == 432
    assert sum(b.values()) == round(0.1 * total(CNN))
    free = layer_budgets(CNN, 0.9, "erk")
    assert b["conv2/kernel"] < free["conv2/kernel"]  # the others pay for the dense layer


def test_erk_override_exceeding_budget_is_an_error():
    with pytest.raises(ValueError, match="more than the global budget"):
        layer_budgets(LENET, 0.9, "erk", overrides={"fc1": 0.0})


def test_erk_override_fixed_sparsity_and_budget():
    b = layer_budgets(LENET, 0.9, "erk", overrides={"fc3": 0.8})
    assert b["fc3/kernel"] == 200
    assert sum(b.values()) == round(0.1 * total(LENET))


def test_uniform_overrides_state_of_sparsity_style():
    b = layer_budgets(LENET, 0.9, "uniform", overrides={"fc1": 0.0, "fc3": 0.8})
    assert b == {"fc1/kernel": 235200, "fc2/kernel": 3000, "fc3/kernel": 200}


@settings(deadline=None, max_examples=examples(40, nightly=3000))
@given(
    dims=st.lists(st.tuples(st.integers(2, 300), st.integers(2, 300)), min_size=1, max_size=5),
    sparsity=st.floats(0.0, 0.97),
    dist=st.sampled_from(["er", "erk"]),
)
def test_erk_budget_property(dims, sparsity, dist):
    specs = [LayerSpec(f"l{i}/kernel", d) for i, d in enumerate(dims)]
    try:
        b = layer_budgets(specs, sparsity, dist)
    except ValueError as e:
        assert "would keep no weights" in str(e)
        return
    assert sum(b.values()) == round((1 - sparsity) * total(specs))
    for s in specs:
        assert 1 <= b[s.path] <= s.size


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        layer_budgets(LENET, bad, "erk")


def test_unknown_distribution():
    with pytest.raises(ValueError, match="unknown distribution 'erdos'"):
        layer_budgets(LENET, 0.9, "erdos")


def test_override_matching_nothing_names_pattern():
    with pytest.raises(ValueError, match="override 'conv9' matches no prunable leaf"):
        layer_budgets(LENET, 0.9, "uniform", overrides={"conv9": 0.5})


def test_override_value_out_of_range_names_pattern():
    with pytest.raises(ValueError, match=r"overrides\['fc1'\] must be in \[0, 1\)"):
        layer_budgets(LENET, 0.9, "uniform", overrides={"fc1": 1.0})


def test_layer_with_zero_weights_names_leaf():
    with pytest.raises(ValueError, match="layer 'fc3/kernel'.*would keep no weights"):
        layer_budgets(LENET, 0.9995, "uniform")


def test_overlapping_overrides():
    with pytest.raises(ValueError, match="more than one override"):
        layer_budgets(LENET, 0.9, "uniform", overrides={"fc": 0.5, "fc1": 0.2})


def test_largest_remainder_sum_exact_for_many_layers():
    specs = [LayerSpec(f"l{i}/kernel", (7 + i, 13 + 2 * i)) for i in range(20)]
    b = layer_budgets(specs, 0.83, "erk")
    assert sum(b.values()) == round(0.17 * total(specs))
    assert np.all(np.array(list(b.values())) > 0)


@pytest.mark.parametrize("dist", ["uniform", "er", "erk"])
@pytest.mark.parametrize("shape, what", [((0, 10), "0 input features"),
                                          ((3, 3, 0, 16), "0 input features"),
                                          ((10, 0), "0 output features"),
                                          ((0,), "no entries")])
def test_zero_size_leaf_is_refused_naming_it(dist, shape, what):
    specs = LENET[:1] + [LayerSpec("empty/kernel", shape)]
    with pytest.raises(ValueError, match=rf"'empty/kernel' has shape .*\({what}\).*prunable="):
        layer_budgets(specs, 0.9, dist)


def test_zero_size_kernel_is_refused_by_layer_specs_and_factories():
    params = {"a": {"kernel": jnp.ones((4, 3))}, "b": {"kernel": jnp.ones((0, 3))}}
    with pytest.raises(ValueError, match=r"'b/kernel' has shape \(0, 3\) \(0 input features\)"):
        layer_specs(params)
    for tx in (jaxsparse.static(optax.sgd(0.1), 0.5, key=jax.random.key(0)),
               jaxsparse.magnitude_pruning(optax.sgd(0.1), 0.5, end_step=10)):
        with pytest.raises(ValueError, match="'b/kernel'"):
            tx.init(params)
    assert layer_specs(params, "a/kernel") == [LayerSpec("a/kernel", (4, 3))]


@pytest.mark.parametrize("dist", ["uniform", "er", "erk"])
def test_scalar_selected_by_prunable_is_refused_naming_it(dist):
    params = {"kernel": jnp.ones((4, 3)), "temperature": jnp.ones(())}
    with pytest.raises(ValueError, match="'temperature' is a scalar.*prunable="):
        layer_specs(params, lambda path, leaf: True)
    with pytest.raises(ValueError, match="'temperature' is a scalar"):
        layer_budgets([LayerSpec("temperature", ())], 0.5, dist)
