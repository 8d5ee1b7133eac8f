"""jaxsparse.freeze: frozen entries never move, whatever the inner optimizer does."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse
from jaxsparse import freeze as fz
from tests.helpers import lenient, loss_fn, tiny_batch, tiny_params


def _frozen_half(params):
    # Freeze the first half of each kernel's rows; biases and norm stay trainable (None).
    def mask(path, p):
        name = jax.tree_util.keystr(path)
        if "kernel" not in name:
            return None
        m = np.zeros(p.shape, bool)
        m[: p.shape[0] // 2] = True
        return jnp.asarray(m)

    return jax.tree_util.tree_map_with_path(mask, params)


def _train(tx, params, steps, state=None):
    state = tx.init(params) if state is None else state

    @jax.jit
    def step(params, state, i):
        x, y = tiny_batch(i)
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, i)
    return params, state


@pytest.mark.parametrize("inner", [
    optax.adamw(1e-2, weight_decay=0.1),
    optax.sgd(0.1, momentum=0.9),
])
def test_frozen_entries_do_not_move(inner):
    params = tiny_params()
    frozen = _frozen_half(params)
    tx = optax.chain(lenient(inner), fz.freeze(frozen))
    new, _ = _train(tx, params, 5)
    for path in ("dense0", "dense1"):
        m = np.asarray(frozen[path]["kernel"])
        before, after = np.asarray(params[path]["kernel"]), np.asarray(new[path]["kernel"])
        np.testing.assert_array_equal(after[m], before[m])
        assert np.all(after[~m] != before[~m])  # the free entries trained
    assert not np.allclose(new["dense0"]["bias"], params["dense0"]["bias"])


def test_set_frozen_between_tasks_without_retracing():
    params = tiny_params()
    tx = optax.chain(lenient(optax.adam(1e-2)), fz.freeze())
    state = tx.init(params)
    assert float(fz.frozen_fraction(fz.get_frozen(state))) == 0.0
    traces = []

    @jax.jit
    def step(params, state, i):
        traces.append(1)
        x, y = tiny_batch(i)
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(params, state, 0)
    everything = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params)
    state = fz.set_frozen(state, everything)
    assert float(fz.frozen_fraction(fz.get_frozen(state))) == 1.0
    before = params
    for i in range(1, 4):
        params, state = step(params, state, i)
    jax.tree.map(np.testing.assert_array_equal, params, before)
    assert len(traces) == 1


def test_freeze_inside_sparse_wrapper_keeps_frozen_weights():
    # The sparse wrapper gives its inner chain masked gradients; frozen entries still keep
    # their value on plain steps (topology updates may drop them: that is the rule's choice).
    params = tiny_params()
    frozen = _frozen_half(params)
    tx = jaxsparse.static(optax.chain(lenient(optax.adam(1e-2)), fz.freeze(frozen)), 0.5,
                          key=jax.random.key(0))
    state = tx.init(params)
    params = jaxsparse.apply_masks(params, jaxsparse.get_masks(state))
    new, _ = _train(tx, params, 3, state)
    m = np.asarray(frozen["dense0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(new["dense0"]["kernel"])[m],
                                  np.asarray(params["dense0"]["kernel"])[m])


def test_bad_frozen_masks_name_the_leaf():
    params = tiny_params()
    frozen = _frozen_half(params)
    frozen["dense1"]["kernel"] = jnp.zeros((3, 3), jnp.bool_)
    with pytest.raises(ValueError, match="dense1"):
        fz.freeze(frozen).init(params)


def test_set_frozen_errors():
    params = tiny_params()
    state = optax.chain(optax.sgd(0.1), fz.freeze()).init(params)
    bad = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params)
    bad["dense0"]["kernel"] = jnp.ones((2, 2), jnp.bool_)
    with pytest.raises(ValueError, match=r"'dense0/kernel' has shape \(2, 2\)"):
        fz.set_frozen(state, bad)
    with pytest.raises(ValueError, match="exactly one FreezeState.*found 0"):
        fz.set_frozen(optax.sgd(0.1).init(params), bad)
    with pytest.raises(ValueError, match="different tree structure"):
        fz.set_frozen(state, {"dense0": bad["dense0"]})
