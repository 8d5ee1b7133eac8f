"""Tests for experiments/models.py (run under strict dtype / rank promotion)."""

import flax.linen as flax_linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse
from experiments import models
from experiments.data import load_digits
from jaxsparse.masks import is_none, path_to_str
from tests.helpers import lenient

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
    attention = block["SelfAttention_0"]
    for name in ("query", "key", "value", "out"):
        assert attention[name]["kernel"].shape == (64, 64)
    assert params["pos_embedding"].shape == (1, 49, 64)
    assert "pos_embedding" not in "".join(jaxsparse.masks.prunable_paths(params))


def test_vit_attention_matches_flax_multi_head_attention():
    """SelfAttention is Flax's MultiHeadDotProductAttention with its 3-D q/k/v kernels
    ``[dim, heads, head_dim]`` and out kernel ``[heads, head_dim, dim]`` stored as 2-D."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    ref = flax_linen.MultiHeadDotProductAttention(num_heads=2)
    p = ref.init(jax.random.key(0), x, x)["params"]
    flat = {name: {"kernel": p[name]["kernel"].reshape(8, 8),
                   "bias": p[name]["bias"].reshape(-1)} for name in p}
    ours = models.SelfAttention(num_heads=2)
    np.testing.assert_allclose(ours.apply({"params": flat}, x), ref.apply({"params": p}, x, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ablation", [True, False])
def test_vit_srigl_neuron_is_one_attention_output_unit(ablation):
    """SRigL on the ViT: every output unit (head, feature) of q, k, v and out is its own
    neuron with fan-in ``dim`` (the paper's 2-D in_proj convention). With Flax's 3-D q/k/v
    kernels a neuron pooled the 4 heads and the per-unit fan-in over ``dim`` was random."""
    model = models.create_model(models.model_config("vit"))
    params = models.init_params(model, (8, 8, 1), jax.random.key(0))  # patch 4: 4 tokens
    # Only the attention kernels are sparse: one shape (64x64), so one compiled selection.
    tx = jaxsparse.srigl(lenient(optax.adam(1e-2)), 0.9, key=jax.random.key(0), end_step=4,
                         update_every=2, gamma_sal=0.9, ablation=ablation,
                         prunable=r"SelfAttention_0/\w+/kernel$")
    x = jax.random.uniform(jax.random.key(2), (16, 8, 8, 1))
    y = jnp.arange(16) % 10

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    checked = 0
    for t in range(3):  # the masks after init, and after the update at step 2
        if t:
            params, state = step(params, state)
        flat, _ = jax.tree_util.tree_flatten_with_path(jaxsparse.get_masks(state),
                                                       is_leaf=is_none)
        for path, m in ((path_to_str(p), np.asarray(m)) for p, m in flat if m is not None):
            if "Attention" not in path:
                continue
            # Units: (head, feature) outputs of q/k/v (input axis first), outputs of out.
            units = m.reshape(-1, 64) if "/out/" in path else m.reshape(64, -1)
            assert units.shape == (64, 64), path
            fan = units.sum(axis=0)  # the fan-in of each output unit, over dim inputs
            active = fan > 0
            assert active.sum() >= 1 and np.all(fan[active] == fan[active][0]), (path, fan)
            assert fan.max() < 64, path  # sparse, fan-in counted over dim only
            if not ablation:
                assert active.all(), path
            checked += 1
    assert checked == 3 * 8  # q, k, v, out in each of the 2 blocks


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
