"""The same train step on a Mesh of 8 simulated CPU devices (data x model) gives the same
masks and params as on one device."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse
from jaxsparse.masks import map_masked
from tests.helpers import lenient, make_step, tiny_batch, tiny_params


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("algo", ["rigl", "snfs", "magnitude"])
def test_sharded_step_matches_single_device(algo):
    def make():
        key = jax.random.key(0)
        if algo == "rigl":
            return jaxsparse.rigl(lenient(optax.adam(1e-2)), 0.8, key=key, end_step=12,
                                  update_every=3)
        if algo == "snfs":
            return jaxsparse.snfs(lenient(optax.adam(1e-2)), 0.8, key=key, end_step=12,
                                  update_every=3)
        return jaxsparse.magnitude_pruning(lenient(optax.adam(1e-2)), 0.8, end_step=9,
                                           frequency=3)

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    spec = {
        "dense0": {"kernel": P(None, "model"), "bias": P("model")},
        "norm": {"scale": P("model")},
        "dense1": {"kernel": P("model", None), "bias": P()},
    }
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec,
                             is_leaf=lambda s: isinstance(s, P))

    def train(sharded):
        tx = make()
        params = tiny_params()
        state = tx.init(params)
        params = jaxsparse.apply_masks(params, jaxsparse.get_masks(state))
        if sharded:
            params = jax.device_put(params, shardings)
            put = lambda m, s: jax.device_put(m, s)  # noqa: E731
            state = state._replace(
                masks=map_masked(put, state.masks, shardings, dense=lambda s: None),
                ever_active=None if state.ever_active is None else map_masked(
                    put, state.ever_active, shardings, dense=lambda s: None),
            )
        step = jax.jit(make_step(tx))
        for t in range(14):
            x, y = tiny_batch(t)
            if sharded:
                x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
                y = jax.device_put(y, NamedSharding(mesh, P("data")))
            params, state, _ = step(params, state, x, y)
        return params, state

    p1, s1 = train(False)
    p8, s8 = train(True)
    assert len(p8["dense0"]["kernel"].sharding.device_set) == 8 or \
        len(p8["dense0"]["kernel"].devices()) >= 2
    m1, m8 = jaxsparse.get_masks(s1), jaxsparse.get_masks(s8)
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m8)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
