"""Pruning at initialisation: SNIP, GraSP and SynFlow scores against brute force, and
one-shot masks under every ranking / distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import masks as jmasks
from jaxsparse import pruning_at_init as pai
from jaxsparse.distributions import layer_budgets, layer_specs
from tests.helpers import examples


def make_params(seed=0, sizes=(3, 4, 2)):
    keys = jax.random.split(jax.random.key(seed), 2 * len(sizes))
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        params[f"l{i}"] = {
            "kernel": jax.random.normal(keys[2 * i], (a, b)),
            "bias": 0.1 * jax.random.normal(keys[2 * i + 1], (b,)),
        }
    return params


def mlp(params, x):
    h = jnp.tanh(x @ params["l0"]["kernel"] + params["l0"]["bias"][None, :])
    return h @ params["l1"]["kernel"] + params["l1"]["bias"][None, :]


def mlp_np(params, x):
    h = np.tanh(x @ params["l0"]["kernel"] + params["l0"]["bias"])
    return h @ params["l1"]["kernel"] + params["l1"]["bias"]


def to_np(params):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def fd_grad(f, params, h=1e-6):
    """Central finite differences of a float64 numpy function of a params dict."""
    grads = jax.tree.map(np.zeros_like, params)
    for layer in params:
        for name in params[layer]:
            w = params[layer][name]
            for idx in np.ndindex(w.shape):
                old = w[idx]
                w[idx] = old + h
                up = f(params)
                w[idx] = old - h
                down = f(params)
                w[idx] = old
                grads[layer][name][idx] = (up - down) / (2 * h)
    return grads


def batch(seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (5, 3)), jax.random.randint(k2, (5,), 0, 2)


def test_snip_matches_finite_differences():
    params = make_params()
    x, y = batch()
    target = jax.nn.one_hot(y, 2)

    def loss_fn(p, b):
        xb, tb = b
        return 0.5 * jnp.mean((mlp(p, xb) - tb) ** 2)

    scores = pai.snip_scores(loss_fn, params, (x, target))
    xn, tn = np.asarray(x, np.float64), np.asarray(target, np.float64)
    pn = to_np(params)
    g = fd_grad(lambda p: 0.5 * np.mean((mlp_np(p, xn) - tn) ** 2), pn)
    for layer in pn:
        for name in pn[layer]:
            np.testing.assert_allclose(np.asarray(scores[layer][name]),
                                       np.abs(g[layer][name] * pn[layer][name]),
                                       rtol=1e-3, atol=1e-6)


def ce_np(p, x, y, temperature):
    logits = mlp_np(p, x) / temperature
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return np.mean(lse - logits[np.arange(len(y)), y])


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_matches_finite_difference_hessian_gradient(temperature):
    params = make_params(seed=3)
    x, y = batch(seed=4)
    scores = pai.grasp_scores(mlp, params, (x, y), temperature=temperature)
    xn, yn = np.asarray(x, np.float64), np.asarray(y)
    pn = to_np(params)

    def loss(p):
        return ce_np(p, xn, yn, temperature)

    g = fd_grad(loss, pn, h=1e-5)
    eps = 1e-3 * temperature  # step along g, scaled so the perturbation is ~1e-3
    plus = jax.tree.map(lambda w, d: w + eps * d, pn, g)
    minus = jax.tree.map(lambda w, d: w - eps * d, pn, g)
    hg = jax.tree.map(lambda a, b: (a - b) / (2 * eps), fd_grad(loss, plus, h=1e-5),
                      fd_grad(loss, minus, h=1e-5))
    for layer in pn:
        for name in pn[layer]:
            expected = pn[layer][name] * hg[layer][name]  # = -S, the keep-score
            got = np.asarray(scores[layer][name])
            scale = np.abs(expected).max()
            np.testing.assert_allclose(got / scale, expected / scale, atol=2e-3)


def test_grasp_sign_convention_matches_paper():
    """GraSP removes the largest S = -w * Hg: one_shot_masks keeps the highest w * Hg."""
    params = make_params(seed=5)
    x, y = batch(seed=6)
    keep = pai.grasp_scores(mlp, params, (x, y))

    def loss(p):
        logits = mlp(p, x) / 200.0
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    g = jax.grad(loss)(params)
    hg = jax.tree.map(jnp.zeros_like, params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat)
    hg = unravel(hessian @ jax.flatten_util.ravel_pytree(g)[0])
    paper_s = jax.tree.map(lambda w, h: -w * h, params, hg)
    for a, b in zip(jax.tree.leaves(keep), jax.tree.leaves(paper_s), strict=True):
        np.testing.assert_allclose(np.asarray(a), -np.asarray(b), rtol=1e-4, atol=1e-9)


def linear3(params, x):
    for name in ("l0", "l1", "l2"):
        x = x @ params[name]["kernel"]
    return x


def test_synflow_matches_explicit_formula():
    params = {f"l{i}": {"kernel": jax.random.normal(jax.random.key(i), s)}
              for i, s in enumerate([(3, 4), (4, 5), (5, 2)])}
    scores = pai.synflow_scores(linear3, params, (1, 3))
    a = [np.abs(np.asarray(params[f"l{i}"]["kernel"], np.float64)) for i in range(3)]
    ones_in, ones_out = np.ones(3), np.ones(2)
    # R = 1^T A0 A1 A2 1; dR/dA1[j, k] = (1^T A0)_j (A2 1)_k.
    expected = [
        a[0] * (a[1] @ a[2] @ ones_out)[None, :],
        a[1] * np.outer(ones_in @ a[0], a[2] @ ones_out),
        a[2] * (ones_in @ a[0] @ a[1])[:, None],
    ]
    for i in range(3):
        np.testing.assert_allclose(np.asarray(scores[f"l{i}"]["kernel"]), expected[i], rtol=1e-5)
    # Synaptic flow is conserved: every layer's scores sum to R.
    r = ones_in @ a[0] @ a[1] @ a[2] @ ones_out
    for i in range(3):
        assert float(jnp.sum(scores[f"l{i}"]["kernel"])) == pytest.approx(r, rel=1e-5)
    # Masked weights are zero in the linearised network.
    masks = jmasks.ones_masks(params)
    masks["l1"]["kernel"] = masks["l1"]["kernel"].at[0, :].set(False)
    masked = pai.synflow_scores(linear3, params, (1, 3), masks=masks)
    assert float(jnp.sum(masked["l1"]["kernel"][0])) == 0.0
    assert float(jnp.sum(masked["l0"]["kernel"][:, 0])) == 0.0


TRACES = []


def counting_linear3(params, x):
    TRACES.append(None)  # runs once per trace
    return linear3(params, x)


@pytest.mark.slow
def test_synflow_masks_exact_counts_and_one_round():
    params = {f"l{i}": {"kernel": jax.random.normal(jax.random.key(i), s)}
              for i, s in enumerate([(6, 8), (8, 8), (8, 3)])}
    one = pai.synflow_masks(linear3, params, (1, 6), 0.7, rounds=1)
    direct = pai.one_shot_masks(pai.synflow_scores(linear3, params, (1, 6)), 0.7)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    specs = layer_specs(params)
    for ranking, distribution in (("global", "uniform"), ("layerwise", "erk")):
        masks = pai.synflow_masks(counting_linear3, params, (1, 6), 0.8, rounds=10,
                                  ranking=ranking, distribution=distribution)
        jmasks.validate_masks(masks, params)
        budgets = layer_budgets(specs, 0.8, distribution)
        counts = jmasks.count_active(masks)
        if ranking == "layerwise":
            assert counts == budgets
        else:
            assert sum(counts.values()) == sum(budgets.values())
            # Iterative SynFlow keeps every layer connected.
            assert min(counts.values()) > 0
    # Another sparsity and other params of the same shapes reuse the compiled rounds.
    traces = len(TRACES)
    other = jax.tree.map(lambda w: -2.0 * w, params)
    masks = pai.synflow_masks(counting_linear3, other, (1, 6), 0.6, rounds=10,
                              ranking="layerwise", distribution="erk")
    assert len(TRACES) == traces
    assert jmasks.count_active(masks) == layer_budgets(specs, 0.6, "erk")
    # An unhashable apply_fn still works (compiled for that call).

    class Unhashable:
        __hash__ = None

        def __call__(self, p, x):
            return linear3(p, x)

    again = pai.synflow_masks(Unhashable(), other, (1, 6), 0.6, rounds=10,
                              ranking="layerwise", distribution="erk")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(masks), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_shot_layerwise_counts_and_selection():
    params = make_params(sizes=(10, 8, 6))
    scores = jax.tree.map(lambda w: jnp.abs(w), params)
    for distribution in ("uniform", "erk", "er"):
        masks = pai.one_shot_masks(scores, 0.75, ranking="layerwise", distribution=distribution)
        budgets = layer_budgets(layer_specs(params), 0.75, distribution)
        assert jmasks.count_active(masks) == budgets
        assert masks["l0"]["bias"] is None
        for layer in ("l0", "l1"):
            s = np.asarray(scores[layer]["kernel"]).ravel()
            kept = np.asarray(masks[layer]["kernel"]).ravel()
            assert s[kept].min() > s[~kept].max()


@pytest.mark.slow
@settings(max_examples=examples(15, nightly=500), deadline=None)
@given(st.integers(0, 2**16), st.floats(0.0, 0.95))
def test_one_shot_global_keeps_the_largest(seed, sparsity):
    params = make_params(seed=seed, sizes=(5, 7, 3))
    scores = jax.tree.map(jnp.abs, params)
    masks = pai.one_shot_masks(scores, sparsity)
    total = sum(layer_budgets(layer_specs(params), sparsity, "uniform").values())
    kept = np.concatenate([np.asarray(masks[k]["kernel"]).ravel() for k in ("l0", "l1")])
    s = np.concatenate([np.asarray(scores[k]["kernel"]).ravel() for k in ("l0", "l1")])
    assert kept.sum() == total
    expected = np.zeros_like(kept)
    expected[np.argsort(-s, kind="stable")[:total]] = True
    np.testing.assert_array_equal(kept, expected)


def test_one_shot_overrides_and_where():
    params = make_params(sizes=(10, 8, 6))
    scores = jax.tree.map(jnp.abs, params)
    masks = pai.one_shot_masks(scores, 0.3, overrides={"l0": 0.0}, distribution="erk")
    assert bool(jnp.all(masks["l0"]["kernel"]))
    budgets = layer_budgets(layer_specs(params), 0.3, "erk", overrides={"l0": 0.0})
    assert jmasks.count_active(masks) == budgets

    where = jmasks.ones_masks(params)
    where["l1"]["kernel"] = jnp.zeros((8, 6), bool).at[:, :2].set(True)  # 16 candidates
    masks = pai.one_shot_masks(scores, 0.9, ranking="layerwise", where=where)
    assert not bool(jnp.any(masks["l1"]["kernel"][:, 2:]))
    assert int(jnp.sum(masks["l1"]["kernel"])) == 5  # round(0.1 * 48)


def test_one_shot_on_nnx_state():
    model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 3, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    masks = pai.one_shot_masks(jax.tree.map(jnp.abs, state), 0.5, ranking="layerwise")
    jmasks.validate_masks(masks, state)
    assert jmasks.count_active(masks) == {"layers/0/kernel": 12, "layers/1/kernel": 9}


def test_fixed_masks_keeps_params_sparse():
    params = make_params()
    masks = pai.one_shot_masks(jax.tree.map(jnp.abs, params), 0.5)
    params = jmasks.apply_masks(params, masks)
    tx = pai.fixed_masks(optax.sgd(0.1), masks)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    for layer in ("l0", "l1"):
        m = masks[layer]["kernel"]
        assert not bool(jnp.any(jnp.where(m, 0.0, new[layer]["kernel"])))
        np.testing.assert_allclose(np.asarray(jnp.where(m, new[layer]["kernel"], 0.0)),
                                   np.asarray(jnp.where(m, params[layer]["kernel"] - 0.1, 0.0)))


def test_errors():
    params = make_params()
    scores = jax.tree.map(jnp.abs, params)
    with pytest.raises(ValueError, match="unknown ranking 'best'"):
        pai.one_shot_masks(scores, 0.5, ranking="best")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        pai.one_shot_masks(scores, 1.0)
    with pytest.raises(ValueError, match="unknown distribution 'erdos'"):
        pai.one_shot_masks(scores, 0.5, distribution="erdos")
    with pytest.raises(ValueError, match="no prunable leaves in the score tree"):
        pai.one_shot_masks({"bias": jnp.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="where .* must have the structure of the scores"):
        pai.one_shot_masks(scores, 0.5, where={"l0": jnp.ones((3, 4), bool)})
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        pai.grasp_scores(mlp, params, batch(), temperature=0.0)
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        pai.synflow_masks(mlp, params, (1, 3), 0.5, rounds=0)
    with pytest.raises(ValueError, match="mask for 'l0/kernel' has shape"):
        bad = jmasks.ones_masks(params)
        bad["l0"]["kernel"] = jnp.ones((4, 3), bool)
        pai.synflow_scores(mlp, params, (1, 3), masks=bad)
