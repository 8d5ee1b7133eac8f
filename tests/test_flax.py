"""End to end with Flax linen params dicts and NNX (nnx.split / nnx.Optimizer)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxsparse
from tests.helpers import lenient


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.LayerNorm()(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(10)(x)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(20, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.emb = nnx.Embed(5, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.norm(self.l1(x))))


def _xy(n=16):
    x = jax.random.normal(jax.random.key(1), (n, 6, 6, 3))
    return x, jnp.arange(n) % 10


@pytest.mark.slow
def test_linen_conv_model_rigl_erk():
    model = LinenCNN()
    x, y = _xy()
    with jax.numpy_dtype_promotion("standard"):
        params = model.init(jax.random.key(0), x)
    tx = jaxsparse.rigl(lenient(optax.adam(1e-2)), 0.9, key=jax.random.key(0), end_step=16,
                        update_every=4)
    state = tx.init(params)
    masks = jaxsparse.get_masks(state)
    # Kernels sparse; biases, norm scales dense (None).
    assert masks["params"]["Conv_0"]["bias"] is None
    assert masks["params"]["LayerNorm_0"]["scale"] is None
    assert masks["params"]["Dense_0"]["kernel"].shape == (288, 32)
    params = jaxsparse.apply_masks(params, masks)

    @jax.jit
    def step(params, state):
        def loss(p):
            with jax.numpy_dtype_promotion("standard"):
                return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    counts = jaxsparse.count_active(masks)
    losses = []
    for _ in range(20):
        params, state, value = step(params, state)
        losses.append(float(value))
    masks = jaxsparse.get_masks(state)
    assert jaxsparse.count_active(masks) == counts
    assert losses[-1] < losses[0]
    nonzero = jaxsparse.count_nonzero(params)
    for path, n in counts.items():
        assert nonzero[path] <= n
    total = sum(counts.values()) + sum(
        v.size for v in jax.tree.leaves(jaxsparse.map_masked(lambda m, p: None, masks, params,
                                                             dense=lambda p: p)))
    assert total > 0


def test_nnx_optimizer_end_to_end():
    model = NNXMLP(nnx.Rngs(0))
    tx = jaxsparse.rigl(lenient(optax.adam(1e-2)), 0.8, key=jax.random.key(0), end_step=20,
                        update_every=3)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    masks = jaxsparse.get_masks(optimizer.opt_state)
    assert masks["emb"]["embedding"] is None  # embeddings stay dense by default
    assert masks["norm"]["scale"] is None
    assert masks["l1"]["kernel"].shape == (20, 16)
    nnx.update(model, jaxsparse.apply_masks(nnx.state(model, nnx.Param), masks))
    counts = jaxsparse.count_active(masks)
    x = jax.random.normal(jax.random.key(1), (32, 20))
    y = jnp.arange(32) % 8

    @nnx.jit
    def step(model, optimizer):
        def loss(m):
            with jax.numpy_dtype_promotion("standard"):
                return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    first = jax.device_get(masks["l1"]["kernel"])
    losses = [float(step(model, optimizer)) for _ in range(12)]
    # After a jitted update nnx.Optimizer keeps the packed masks' bits without their node:
    # the params give the shapes back.
    with pytest.raises(ValueError, match="get_masks\\(opt_state, params\\)"):
        jaxsparse.get_masks(optimizer.opt_state)
    masks = jaxsparse.get_masks(optimizer.opt_state, nnx.state(model, nnx.Param))
    assert jaxsparse.count_active(masks) == counts
    assert not np.array_equal(first, masks["l1"]["kernel"])  # topology moved
    for name in ("l1", "l2"):
        w = np.asarray(getattr(model, name).kernel.get_value())
        assert np.all(w[~np.asarray(masks[name]["kernel"])] == 0)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_nnx_split_state_with_plain_optax_loop():
    model = NNXMLP(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = jaxsparse.set(lenient(optax.sgd(0.1)), 0.8, key=jax.random.key(0), end_step=20,
                       update_every=2, distribution="uniform")
    state = tx.init(params)
    params = jaxsparse.apply_masks(params, jaxsparse.get_masks(state))
    x = jax.random.normal(jax.random.key(1), (32, 20))
    y = jnp.arange(32) % 8

    @jax.jit
    def step(params, state):
        def loss(p):
            with jax.numpy_dtype_promotion("standard"):
                m = nnx.merge(graphdef, p, rest)
                return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(6):
        params, state = step(params, state)
    masks = jaxsparse.get_masks(state)
    assert jaxsparse.count_active(masks) == {"l1/kernel": 64, "l2/kernel": 26}
    kernel = params["l1"]["kernel"]
    kernel = kernel.get_value() if hasattr(kernel, "get_value") else kernel
    assert np.all(np.asarray(kernel)[~np.asarray(masks["l1"]["kernel"])] == 0)
