"""Per-layer one-shot pruning: magnitude, Wanda, SparseGPT against a float64 OBS reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import oneshot
from jaxsparse.oneshot import methods


def obs_reference(kernel, x, *, sparsity=None, nm=None, blocksize=128, percdamp=0.01):
    """Unblocked SparseGPT in numpy float64: every pruned weight's error is propagated to all
    later inputs at once (no lazy batching); the mask rule is the same (per block of
    ``blocksize`` inputs, or per N:M group when the sweep reaches it)."""
    w = np.array(kernel, np.float64)
    x = np.asarray(x, np.float64)
    d = w.shape[0]
    h = 2.0 * x.T @ x / x.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += percdamp * np.mean(np.diag(h)) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    mask = np.zeros(w.shape, bool)
    bs = min(blocksize, d)
    counts = methods.block_counts(d, sparsity, bs) if nm is None else None
    for i in range(d):
        if nm is not None and i % nm[1] == 0:
            s = w[i:i + nm[1]] ** 2 / np.diag(u)[i:i + nm[1], None] ** 2
            order = np.argsort(-s, axis=0, kind="stable")
            np.put_along_axis(mask[i:i + nm[1]], order[:nm[0]], True, axis=0)
        if nm is None and i % bs == 0:
            s = w[i:i + bs] ** 2 / np.diag(u)[i:i + bs, None] ** 2
            order = np.argsort(-s, axis=0, kind="stable")
            np.put_along_axis(mask[i:i + bs], order[:counts[i // bs]], True, axis=0)
        q = np.where(mask[i], w[i], 0.0)
        err = (w[i] - q) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
        w[i] = q
    return w, mask


def correlated_inputs(seed, rows, d_in, outliers=1.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, d_in // 2))
    mix = rng.normal(size=(d_in // 2, d_in))
    scale = np.exp(outliers * rng.normal(size=d_in))  # outlier features, as in LLM inputs
    return ((z @ mix + 0.3 * rng.normal(size=(rows, d_in))) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    x = correlated_inputs(1, 256, 24)
    kernel = rng.normal(size=(24, 6)).astype(np.float32)
    return kernel, x


@pytest.mark.parametrize("kw", [
    dict(sparsity=0.5, blocksize=24),   # one block
    dict(sparsity=0.6, blocksize=8),    # three blocks, lazy updates across them
    dict(sparsity=0.7, blocksize=10),   # a padded last block, uneven counts
    dict(nm=(2, 4), blocksize=8),       # (N:M results do not depend on the block size)
    dict(nm=(4, 8), blocksize=16),      # padded: 24 inputs in blocks of 16
])
def test_sparsegpt_matches_unblocked_float64_obs(layer, kw):
    kernel, x = layer
    ref_w, ref_mask = obs_reference(kernel, x, **kw)
    res = oneshot.sparsegpt_layer(jnp.asarray(kernel), oneshot.input_stats(jnp.asarray(x)),
                                  **kw)
    np.testing.assert_array_equal(np.asarray(res.mask), ref_mask)
    np.testing.assert_allclose(np.asarray(res.kernel), ref_w, rtol=2e-3, atol=2e-3)
    assert np.all(np.asarray(res.kernel)[~ref_mask] == 0)


def _counts_ok(mask, kw):
    mask = np.asarray(mask)
    if "nm" in kw:
        n, m = kw["nm"]
        groups = mask.reshape(mask.shape[0] // m, m, -1).sum(1)
        return np.all(groups == n)
    return np.all(mask.sum(0) == oneshot.kept_per_neuron(mask.shape[0], kw["sparsity"]))


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(nm=(2, 4))])
def test_sparsegpt_beats_wanda_and_magnitude_on_reconstruction(kw):
    rng = np.random.default_rng(3)
    x = correlated_inputs(4, 512, 64, outliers=0.5)
    kernel = jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32))
    stats = oneshot.input_stats(jnp.asarray(x))
    results = {
        "magnitude": oneshot.magnitude_layer(kernel, **kw),
        "wanda": oneshot.wanda_layer(kernel, stats, **kw),
        "sparsegpt": oneshot.sparsegpt_layer(kernel, stats, blocksize=16, **kw),
    }
    err = {}
    for name, res in results.items():
        assert _counts_ok(res.mask, kw), name
        assert np.all(np.asarray(res.kernel)[~np.asarray(res.mask)] == 0), name
        err[name] = float(np.sum((x @ (np.asarray(kernel) - np.asarray(res.kernel))) ** 2))
    assert err["sparsegpt"] < 0.92 * err["wanda"] and err["wanda"] < err["magnitude"], err


def test_wanda_hand_checked():
    # Input 0 carries norm 10, input 1 norm 1: Wanda keeps input 0 of neuron 0 although its
    # weight is smaller; magnitude keeps input 1.
    kernel = jnp.array([[0.5, 2.0], [1.0, 0.1]], jnp.float32)
    stats = oneshot.InputStats(None, jnp.array([100.0, 1.0]), jnp.float32(4))
    w = oneshot.wanda_layer(kernel, stats, sparsity=0.5)
    np.testing.assert_array_equal(np.asarray(w.mask), [[True, True], [False, False]])
    np.testing.assert_array_equal(np.asarray(w.kernel), [[0.5, 2.0], [0.0, 0.0]])
    m = oneshot.magnitude_layer(kernel, sparsity=0.5)
    np.testing.assert_array_equal(np.asarray(m.mask), [[False, True], [True, False]])


def test_stats_accumulate_over_batches():
    x = correlated_inputs(5, 40, 8)
    whole = oneshot.input_stats(jnp.asarray(x))
    parts = None
    for chunk in np.split(x, 4):
        parts = oneshot.add_stats(parts, oneshot.input_stats(jnp.asarray(chunk)))
    np.testing.assert_allclose(np.asarray(parts.gram), np.asarray(whole.gram), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(parts.sq_norms), np.asarray(whole.sq_norms), rtol=1e-5)
    assert float(parts.count) == 40


def test_dead_inputs_warn_naming_the_layer_and_are_pruned_first(layer):
    kernel, x = layer
    x = x.copy()
    x[:, [3, 7]] = 0.0
    with pytest.warns(UserWarning, match=r"'blocks/0/mlp'.*2 of 24 inputs"):
        res = oneshot.sparsegpt_layer(jnp.asarray(kernel), oneshot.input_stats(jnp.asarray(x)),
                                      sparsity=0.5, name="blocks/0/mlp")
    assert not np.asarray(res.mask)[[3, 7]].any()
    ref_w, _ = obs_reference(kernel, x, sparsity=0.5)
    np.testing.assert_allclose(np.asarray(res.kernel), ref_w, rtol=2e-3, atol=2e-3)


def test_singular_hessian_is_dampened_with_a_warning(layer):
    kernel, _ = layer
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(200, 3)) @ rng.normal(size=(3, 24))).astype(np.float32)  # rank 3
    stats = oneshot.input_stats(jnp.asarray(x))
    with pytest.warns(UserWarning, match=r"'dec/out'.*singular"):
        res = oneshot.sparsegpt_layer(jnp.asarray(kernel), stats, sparsity=0.5, percdamp=0.0,
                                      name="dec/out")
    assert np.all(np.isfinite(np.asarray(res.kernel)))
    assert _counts_ok(res.mask, dict(sparsity=0.5))


@pytest.mark.parametrize("call, match", [
    (lambda k, s: oneshot.sparsegpt_layer(k, s, nm=(2, 5), name="L1"),
     r"'L1'.*multiple of M=5"),
    (lambda k, s: oneshot.wanda_layer(k, s, nm=(2, 5), name="L2"), r"'L2'.*multiple of M=5"),
    (lambda k, s: oneshot.magnitude_layer(k, sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (lambda k, s: oneshot.magnitude_layer(k), r"exactly one of sparsity"),
    (lambda k, s: oneshot.magnitude_layer(k, sparsity=0.5, nm=(2, 4)), r"exactly one"),
    (lambda k, s: oneshot.magnitude_layer(k, nm=(5, 4)), r"0 < N <= M"),
    (lambda k, s: oneshot.magnitude_layer(k[None], sparsity=0.5, name="conv"),
     r"'conv'.*2-D Dense"),
    (lambda k, s: oneshot.sparsegpt_layer(k, s._replace(gram=None), sparsity=0.5, name="L3"),
     r"'L3'.*with_gram=True"),
    (lambda k, s: oneshot.wanda_layer(k, s._replace(count=jnp.float32(0)), sparsity=0.5,
                                      name="L4"), r"'L4'.*no calibration rows"),
    (lambda k, s: oneshot.wanda_layer(k[:8], s, sparsity=0.5, name="L5"),
     r"'L5'.*statistics for 24 inputs.*d_in=8"),
    (lambda k, s: oneshot.sparsegpt_layer(
        k, s._replace(gram=s.gram.at[0, 0].set(jnp.nan)), sparsity=0.5, name="L6"),
     r"'L6'.*inf or nan"),
    (lambda k, s: oneshot.sparsegpt_layer(k, s, nm=(2, 4), blocksize=6), r"multiple of M=4"),
])
def test_bad_input_names_the_layer(layer, call, match):
    kernel, x = layer
    stats = oneshot.input_stats(jnp.asarray(x))
    with pytest.raises(ValueError, match=match):
        call(jnp.asarray(kernel), stats)
