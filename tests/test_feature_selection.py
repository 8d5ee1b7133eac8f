"""jaxsparse.features (neuron strength, top-K) and the QuickSelection example on digits."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import feature_selection as fs
from experiments.configs import fs_digits_tiny
from jaxsparse import features


def test_input_and_output_strength_hand_checked():
    kernel = jnp.array([[1.0, -2.0, 0.0], [0.5, 0.5, -3.0]])
    mask = jnp.array([[True, True, False], [True, False, True]])
    np.testing.assert_allclose(features.input_strength(kernel), [3.0, 4.0])
    np.testing.assert_allclose(features.input_strength(kernel, mask), [3.0, 3.5])
    np.testing.assert_allclose(features.output_strength(kernel, mask), [1.5, 2.0, 3.0])
    conv = jnp.ones((3, 3, 2, 4))
    assert features.input_strength(conv).shape == (3, 3, 2)


def test_top_k_features_order_and_ties():
    scores = jnp.array([0.1, 0.9, 0.5, 0.9, 0.0])
    np.testing.assert_array_equal(features.top_k_features(scores, 3), [1, 3, 2])
    np.testing.assert_array_equal(features.feature_mask(scores.reshape(1, 5), 2),
                                  [[False, True, False, True, False]])


def test_k_larger_than_input_dimension():
    with pytest.raises(ValueError, match="k=65 must be between 1 and the input dimension 64"):
        features.top_k_features(jnp.zeros((8, 8)), 65)
    with pytest.raises(ValueError, match="K=1000 is larger than the input dimension 784"):
        fs.check_ks((50, 1000), 784, "mnist")
    with pytest.raises(TypeError, match="k must be a Python int"):
        features.top_k_features(jnp.zeros(4), 2.0)


def test_strength_errors_name_the_argument():
    with pytest.raises(ValueError, match="input_strength: kernel must have rank >= 2"):
        features.input_strength(jnp.zeros(4))
    with pytest.raises(ValueError, match=r"output_strength: mask shape \(2, 2\)"):
        features.output_strength(jnp.zeros((2, 3)), jnp.zeros((2, 2), bool))


@pytest.fixture(scope="module")
def digits_run():
    cfg = fs.fs_config(fs_digits_tiny.get_config())
    return cfg, fs.run(cfg)


@pytest.mark.slow
def test_quickselection_learns_and_selects_informative_pixels(digits_run):
    cfg, records = digits_run
    by = {(r["method"], r["k"]): r for r in records}
    qs = by[("quickselection", 10)]
    # The autoencoder learned (reconstruction loss fell) at the configured sparsity.
    assert qs["dae_loss_last_epoch"] < 0.5 * qs["dae_loss_first_epoch"]
    assert qs["dae_sparsity"] == pytest.approx(cfg.sparsity, abs=0.01)
    # Strong inputs are informative pixels: none of the 10 is constant on the training set
    # (digits has several always-blank border pixels).
    from experiments import data as data_lib

    x_train = fs.flat_data(data_lib.load_dataset("digits"))[0]
    assert np.all(x_train[:, qs["selected"]].var(axis=0) > 0)
    # 10 of 64 pixels classify far above chance (10%).
    assert qs["test_accuracy"] > 0.6
    assert by[("all", 64)]["test_accuracy"] > 0.9


@pytest.mark.slow
def test_summary_table_and_plot(digits_run, tmp_path):
    _, records = digits_run
    table = fs.summary_table(records)
    for method in ("quickselection", "variance", "random", "all"):
        assert f"| {method} |" in table
    assert "K=10" in table
    out = fs.plot_selection(records, (8, 8, 1), tmp_path / "sel.png", "digits")
    assert out.stat().st_size > 1000


def test_bad_k_is_refused_before_training(tmp_path):
    cfg = fs.fs_config(fs_digits_tiny.get_config())._replace(ks=(10, 100))
    with pytest.raises(ValueError, match="K=100 is larger than the input dimension 64"):
        fs.run(cfg)
