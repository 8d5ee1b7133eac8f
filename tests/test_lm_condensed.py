"""The byte LM with condensed MLP blocks (issue 18): the same function and gradients as the
masked dense LM that ``expand_params`` builds from it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.lm import model as model_lib
from jaxsparse.algorithms.structured import fan_in_budgets
from jaxsparse.condensed import training as T

SEQ = 16


def _models(sparsity):
    # The tiny preset cut to one block (fast to compile; both blocks are built alike).
    dense = model_lib.make_model(model_lib.lm_config("tiny", seq_len=SEQ, num_layers=1))
    cond = model_lib.make_model(model_lib.lm_config("tiny", seq_len=SEQ, num_layers=1,
                                                    mlp="condensed", mlp_sparsity=sparsity))
    return dense, cond


def _n_in(model):
    out = {}
    for i in range(model.num_layers):
        out[f"block_{i}/fc"] = model.d_model
        out[f"block_{i}/proj"] = model.d_ff
    return out


def _tokens(seed=0, batch=3):
    return jax.random.randint(jax.random.key(seed), (batch, SEQ + 1), 0, 256, jnp.int32)


def _loss(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.parametrize("sparsity", [0.9, pytest.param(0.99, marks=pytest.mark.slow)])
def test_condensed_lm_equals_expanded_masked_lm(sparsity):
    dense, cond = _models(sparsity)
    v = model_lib.init_variables(cond, jax.random.key(1))
    fc = v["params"]["block_0"]["fc"]["values"]
    assert fc.shape == (cond.d_ff, model_lib.mlp_fan_in(cond.d_model, sparsity))
    assert v["sparsity"]["block_0"]["proj"]["indices"].shape == (
        cond.d_model, model_lib.mlp_fan_in(cond.d_ff, sparsity))
    # Same init scale as the dense layer's kernel (normal 0.02).
    assert 0.015 < float(jnp.std(fc)) < 0.025
    params, masks = T.expand_params(v["params"], v["sparsity"], _n_in(cond))
    # Attention, embeddings and LayerNorms are untouched and unmasked.
    assert masks["block_0"]["query"]["kernel"] is None
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(lambda k: model_lib.init_params(dense, k), jax.random.key(0)))
    density = float(np.mean(np.asarray(masks["block_0"]["fc"]["kernel"])))
    assert density == pytest.approx(model_lib.mlp_fan_in(cond.d_model, sparsity) / cond.d_model)
    tokens = _tokens()[:, :-1]
    y_c = jax.jit(cond.apply)(v, tokens)
    y_d = jax.jit(dense.apply)({"params": params}, tokens)
    assert y_c.shape == (3, SEQ, 256)
    np.testing.assert_allclose(np.asarray(y_c), np.asarray(y_d), rtol=1e-5, atol=1e-5)


def test_condensed_lm_gradients_match_masked_dense_lm():
    dense, cond = _models(0.9)
    v = model_lib.init_variables(cond, jax.random.key(2))
    # Non-trivial values and biases (zero-init biases would hide a wrong bias gradient).
    v["params"] = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), v["params"])
    params, masks = T.expand_params(v["params"], v["sparsity"], _n_in(cond))
    tok = _tokens(1)
    x, y = tok[:, :-1], tok[:, 1:]

    def loss_c(p):
        return _loss(cond.apply({"params": p, "sparsity": v["sparsity"]}, x), y)

    def loss_d(p):
        return _loss(dense.apply({"params": p}, x), y)

    lc, gc = jax.jit(jax.value_and_grad(loss_c))(v["params"])
    ld, gd = jax.jit(jax.value_and_grad(loss_d))(params)
    assert float(lc) == pytest.approx(float(ld), rel=1e-6)
    for i in range(cond.num_layers):
        for name in ("fc", "proj"):
            idx = np.asarray(v["sparsity"][f"block_{i}"][name]["indices"]).astype(int)
            g_dense = np.asarray(gd[f"block_{i}"][name]["kernel"])  # [n_in, n_out]
            g_slots = g_dense.T[np.arange(idx.shape[0])[:, None], idx]
            np.testing.assert_allclose(np.asarray(gc[f"block_{i}"][name]["values"]), g_slots,
                                       rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(np.asarray(gc[f"block_{i}"][name]["bias"]),
                                       np.asarray(gd[f"block_{i}"][name]["bias"]),
                                       rtol=1e-4, atol=1e-7)
    # Every other leaf (attention, embeddings, LayerNorms) has the dense model's gradient.
    gc_flat = T._flat_paths(gc)
    for path, g in T._flat_paths(gd).items():
        if path.endswith(("fc/kernel", "proj/kernel", "fc/bias", "proj/bias")):
            continue
        np.testing.assert_allclose(np.asarray(gc_flat[path]), np.asarray(g), rtol=1e-4,
                                   atol=1e-7, err_msg=path)
    # The growth scores: the full dense gradient of each MLP kernel (masked or not).
    dg = T.dense_weight_grads(cond.apply, v, _loss, x, y)
    for i in range(cond.num_layers):
        for name in ("fc", "proj"):
            np.testing.assert_allclose(np.asarray(dg[f"block_{i}"][name]["kernel"]),
                                       np.asarray(gd[f"block_{i}"][name]["kernel"]),
                                       rtol=1e-4, atol=1e-7)


def test_mlp_fan_in_matches_uniform_srigl_budgets_and_is_checked():
    for preset in ("tiny", "1m"):
        dense = model_lib.make_model(model_lib.lm_config(preset))
        shapes = jax.eval_shape(lambda k, m=dense: model_lib.init_params(m, k),
                                jax.random.key(0))
        for s in (0.5, 0.9, 0.95, 0.99):
            ks = fan_in_budgets(shapes, s, "uniform", r"/(fc|proj)/kernel$", None)
            assert ks["block_0/fc/kernel"] == model_lib.mlp_fan_in(dense.d_model, s)
            assert ks["block_0/proj/kernel"] == model_lib.mlp_fan_in(dense.d_ff, s)
    assert model_lib.mlp_fan_in(64, 0.999) == 1
    with pytest.raises(ValueError, match="mlp_sparsity"):
        model_lib.mlp_fan_in(64, 1.0)
    bad = model_lib.TransformerLM(num_layers=1, d_model=8, num_heads=2, d_ff=16, seq_len=4,
                                  mlp="sparse")
    with pytest.raises(ValueError, match="mlp must be one of"):
        bad.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_logical_axes_of_condensed_values_and_trainer_refusal():
    _, cond = _models(0.95)
    axes = model_lib.logical_axes(cond)
    P = jax.sharding.PartitionSpec
    assert axes["block_0"]["fc"] == {"values": P("mlp", None), "bias": P("mlp")}
    assert axes["block_0"]["proj"] == {"values": P("embed", None), "bias": P("embed")}
    assert axes["block_0"]["query"]["kernel"] == P("embed", "qkv")
    from experiments.configs import lm_tiny
    from experiments.lm import trainer
    c = lm_tiny.get_config()
    c.model.mlp, c.model.mlp_sparsity = "condensed", 0.9
    with pytest.raises(ValueError, match="condensed_training_lm"):
        trainer.make_setup(c, jax.devices()[:1])
