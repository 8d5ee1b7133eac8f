"""ViT-tiny with condensed MLP blocks (issue 18): the same function and gradients as the
masked dense ViT that ``expand_params`` builds from it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import models
from experiments.lm.model import mlp_fan_in
from jaxsparse.condensed import training as T

SHAPE = (8, 8, 1)
SMALL = dict(patch=4, dim=16, depth=1, num_heads=2, mlp_dim=32)  # one block: fast to compile


def _models(sparsity):
    dense = models.create_model(models.model_config("vit", **SMALL))
    cond = models.create_model(models.model_config("vit", **SMALL, mlp="condensed",
                                                   mlp_sparsity=sparsity))
    return dense, cond


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _batch():
    x = jax.random.uniform(jax.random.key(3), (4, *SHAPE))
    return x, jnp.arange(4, dtype=jnp.int32) % 10


def _is_mlp(path):
    return "/MlpBlock_0/" in path


def test_condensed_vit_forward_and_gradients_equal_the_masked_dense_vit():
    dense, cond = _models(0.9)
    v = models.init_variables(cond, SHAPE, jax.random.key(1))
    v["params"] = jax.tree.map(  # nonzero biases: a wrong bias gradient would show
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), v["params"])
    n_in = models.condensed_n_in(cond)
    fc = "EncoderBlock_0/MlpBlock_0/Dense_0"
    assert T._flat_paths(v["params"])[f"{fc}/values"].shape == (32, mlp_fan_in(16, 0.9))
    assert T._flat_paths(v["sparsity"])[f"{fc}/indices"].shape == (32, mlp_fan_in(16, 0.9))
    params, masks = T.expand_params(v["params"], v["sparsity"], n_in)
    # The expanded tree is the dense ViT's; only the MLP kernels are masked.
    assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(
        lambda k: models.init_params(dense, SHAPE, k), jax.random.key(0)))
    masked = [p for p, m in T._flat_paths(masks, is_leaf=lambda m: m is None).items()
              if m is not None]
    assert sorted(masked) == sorted(f"{layer}/kernel" for layer in n_in)
    x, y = _batch()

    def loss_c(p):
        return _loss(cond.apply({"params": p, "sparsity": v["sparsity"]}, x), y)

    def loss_d(p):
        return _loss(dense.apply({"params": p}, x), y)

    both = jax.jit(lambda pc, pd: (cond.apply({"params": pc, "sparsity": v["sparsity"]}, x),
                                   dense.apply({"params": pd}, x),
                                   jax.value_and_grad(loss_c)(pc),
                                   jax.value_and_grad(loss_d)(pd),
                                   T.growth_inputs(cond.apply, {**v, "params": pc}, _loss,
                                                   x, y)))
    y_c, y_d, (lc, gc), (ld, gd), growth = both(v["params"], params)
    np.testing.assert_allclose(np.asarray(y_c), np.asarray(y_d), rtol=1e-5, atol=1e-5)
    assert float(lc) == pytest.approx(float(ld), rel=1e-6)
    gc_flat, gd_flat = T._flat_paths(gc), T._flat_paths(gd)
    idx_flat = T._flat_paths(v["sparsity"])
    for layer in n_in:  # values: the dense kernel's gradient at the slots
        idx = np.asarray(idx_flat[f"{layer}/indices"]).astype(int)
        g_dense = np.asarray(gd_flat[f"{layer}/kernel"])
        np.testing.assert_allclose(np.asarray(gc_flat[f"{layer}/values"]),
                                   g_dense.T[np.arange(idx.shape[0])[:, None], idx],
                                   rtol=1e-4, atol=1e-7, err_msg=layer)
        # The growth scores' factors: x^T dy is the dense kernel's full gradient.
        g = T._flat_paths(growth, is_leaf=lambda a: isinstance(a, T.GrowthInputs))[layer]
        np.testing.assert_allclose(np.asarray(T.weight_grad(g.x, g.dy)), g_dense,
                                   rtol=1e-4, atol=1e-6, err_msg=layer)
    for path, g in gd_flat.items():  # every other leaf: the dense ViT's gradient
        if _is_mlp(path) and path.endswith("/kernel"):
            continue
        np.testing.assert_allclose(np.asarray(gc_flat[path]), np.asarray(g), rtol=1e-4,
                                   atol=1e-7, err_msg=path)


def test_condensed_vit_options_are_checked():
    x = jnp.zeros((1, *SHAPE))
    with pytest.raises(ValueError, match="mlp must be one of"):
        models.create_model(models.model_config("vit", **SMALL, mlp="sparse")).init(
            jax.random.key(0), x)
    with pytest.raises(ValueError, match="mlp_sparsity must be in"):
        models.create_model(models.model_config("vit", **SMALL, mlp="condensed",
                                                mlp_sparsity=1.0)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="bad options for model 'lenet300'"):
        models.create_model(models.model_config("lenet300", mlp="condensed"))
    # The dense default is unchanged: no sparsity collection.
    assert set(models.init_variables(_models(0.9)[0], SHAPE, jax.random.key(0))) == {"params"}
