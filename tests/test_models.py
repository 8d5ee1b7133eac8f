"""Tests for experiments/models.py (run under strict dtype / rank promotion)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse
from experiments import models
from experiments.data import load_digits

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_models_give_logits_for_every_input_size(name, shape):
    cfg = models.model_config(name)
    if name == "vit" and shape[0] == 8:
        cfg.patch = 2
    model = models.create_model(cfg, num_classes=7)
    # Shapes only (no compilation): keeps this grid fast.
    params = jax.eval_shape(lambda k: models.init_params(model, shape, k), jax.random.key(0))
    x = jax.ShapeDtypeStruct((3, *shape), jnp.uint8)
    logits = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    prunable = jaxsparse.masks.prunable_paths(params)
    assert prunable and all(p.endswith("kernel") for p in prunable)


def test_lenet300_is_784_300_100_10():
    model = models.create_model(models.model_config("lenet300"))
    params = jax.eval_shape(lambda k: models.init_params(model, (28, 28, 1), k),
                            jax.random.key(0))
    shapes = [params[f"Dense_{i}"]["kernel"].shape for i in range(3)]
    assert shapes == [(784, 300), (300, 100), (100, 10)]
    assert models.count_params(params) == 266610


def test_uint8_input_is_scaled():
    model = models.create_model(models.model_config("lenet300"))
    params = models.init_params(model, (8, 8, 1), jax.random.key(0))
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    a = model.apply({"params": params}, jnp.asarray(x))
    b = model.apply({"params": params}, jnp.asarray(x, jnp.float32) / 255.0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_vit_has_mlp_blocks_and_attention():
    cfg = models.model_config("vit")
    model = models.create_model(cfg)
    params = jax.eval_shape(lambda k: models.init_params(model, (28, 28, 1), k),
                            jax.random.key(0))
    block = params["EncoderBlock_0"]
    assert block["MlpBlock_0"]["Dense_0"]["kernel"].shape == (64, 128)
    assert block["MlpBlock_0"]["Dense_1"]["kernel"].shape == (128, 64)
    assert "MultiHeadDotProductAttention_0" in block
    assert params["pos_embedding"].shape == (1, 49, 64)
    assert "pos_embedding" not in "".join(jaxsparse.masks.prunable_paths(params))


@pytest.mark.slow
def test_a_few_sgd_steps_fit_a_batch():
    model = models.create_model(models.model_config("lenet5"))
    params = models.init_params(model, (8, 8, 1), jax.random.key(0))
    ds = load_digits()
    x, y = jnp.asarray(ds.x_train[:64]), jnp.asarray(ds.y_train[:64])

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    first = loss(params)
    for _ in range(100):
        params, state = step(params, state)
    assert loss(params) < 0.2 * first


def test_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.model_config("resnet")
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.create_model({"name": "resnet"})
    with pytest.raises(ValueError, match="bad options for model 'lenet5'"):
        models.create_model({"name": "lenet5", "width": 3})
    model = models.create_model(models.model_config("vit"))
    with pytest.raises(ValueError, match=r"not divisible by patch 4"):
        models.init_params(model, (30, 30, 1), jax.random.key(0))
