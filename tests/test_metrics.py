import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse
from jaxsparse import metrics


def _masks():
    k0 = jnp.zeros((4, 3), bool).at[0, 0].set(True).at[1, 0].set(True).at[2, 2].set(True)
    return {"a": {"kernel": k0, "bias": None}, "b": {"kernel": jnp.ones((3, 2), bool)}}


def test_layer_and_global_sparsity():
    m = _masks()
    ls = metrics.layer_sparsity(m)
    assert float(ls["a/kernel"]) == pytest.approx(1 - 3 / 12)
    assert float(ls["b/kernel"]) == pytest.approx(0.0)
    assert float(metrics.global_sparsity(m)) == pytest.approx(1 - 9 / 18)
    params = {"a": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))},
              "b": {"kernel": jnp.zeros((3, 2))}}
    assert float(metrics.global_sparsity(m, params)) == pytest.approx(1 - 12 / 21)


def test_active_neurons_and_fan_in():
    k = _masks()["a"]["kernel"]
    assert int(metrics.active_neurons(k)) == 2
    np.testing.assert_array_equal(metrics.fan_in(k), [2, 0, 1])


def test_itop_rate():
    assert float(metrics.itop_rate(_masks())) == pytest.approx(9 / 18)


def test_table_lists_every_leaf_and_total():
    m = _masks()
    params = {"a": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))},
              "b": {"kernel": jnp.zeros((3, 2))}}
    rows = jaxsparse.sparsity_table(m, params)
    assert [r.path for r in rows] == ["a/bias", "a/kernel", "b/kernel"]
    assert rows[1].active == 3 and rows[1].active_neurons == 2 and rows[1].neurons == 3
    text = jaxsparse.format_table(rows)
    assert "a/kernel" in text and "3/12" in text and "12/21" in text


def test_structure_metrics():
    m = _masks()
    assert float(metrics.ablated_fraction(m["a"]["kernel"])) == pytest.approx(1 / 3)
    assert metrics.fan_in_histogram(m["a"]["kernel"]) == {0: 1, 1: 1, 2: 1}
    rows = metrics.structure_table(m)
    a = rows[0]
    assert (a.path, a.neurons, a.active_neurons, a.fan_in_min, a.fan_in_max) == (
        "a/kernel", 3, 2, 1, 2)
    assert not a.constant_fan_in and rows[1].constant_fan_in
    text = metrics.format_structure_table(rows)
    assert "2/3" in text and "33.3%" in text and "1-2" in text
