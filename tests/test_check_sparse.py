"""Exact sparsity outside the step: ``jaxsparse.check_sparse`` and the opt-in in-step check.

A transformation chained *after* the sparse wrapper turns the ``-p`` that zeroes a dropped
weight into something else. Both checks must name the leaf; the default step must hold no
host callback (it would cost every call JAX's fast dispatch path).
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxsparse
from jaxsparse import schedules
from jaxsparse.algorithms import dst
from tests.helpers import lenient, loss_fn, tiny_batch, tiny_params

EVERY = 2


def _train(tx, steps):
    params, state = jaxsparse.init_masked(tx, tiny_params())

    @jax.jit
    def step(params, state, t):
        grads = jax.grad(loss_fn)(params, *tiny_batch(t))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(steps):
        params, state = step(params, state, t)
    return params, state, step


def _rigl(inner):
    return jaxsparse.rigl(inner, 0.7, key=jax.random.key(0), end_step=100,
                          update_every=EVERY, drop_fraction=0.5)


def _rigl_checked(inner):
    """RigL through ``sparse_transform(..., check_params=True)`` (the factories keep the
    default)."""
    rule = jaxsparse.SparsityRule(
        init_masks=dst.random_init(0.7, "erk", None, None),
        is_update_step=schedules.periodic(EVERY, 100, 0),
        update_masks=jaxsparse.layerwise(dst.drop_and_grow(
            dst.magnitude_score, dst.gradient_score,
            schedules.drop_fraction_schedule(0.5, 100, "cosine"))))
    return jaxsparse.sparse_transform(inner, rule, key=jax.random.key(0), check_params=True)


def test_a_correct_run_passes_and_a_chained_transformation_is_named():
    params, state, _ = _train(_rigl(optax.sgd(0.1)), 3 * EVERY + 1)
    jaxsparse.check_sparse(params, state)  # exact: no error

    # The learning rate chained after the wrapper scales the -p of dropped weights.
    tx = optax.chain(_rigl(lenient(optax.scale_by_adam())), optax.scale_by_learning_rate(0.1))
    params, state, _ = _train(tx, 3 * EVERY + 1)
    with pytest.raises(ValueError, match=r"nonzero outside their masks.*dense\d/kernel"):
        jaxsparse.check_sparse(params, state)


def test_a_state_without_a_sparse_optimizer_is_refused():
    params = tiny_params()
    with pytest.raises(ValueError, match="no jaxsparse SparseState"):
        jaxsparse.check_sparse(params, optax.sgd(0.1).init(params))


def test_the_default_step_holds_no_host_callback():
    tx = _rigl(optax.sgd(0.1))
    params, state = jaxsparse.init_masked(tx, tiny_params())
    grads = jax.tree.map(jnp.ones_like, params)
    hlo = jax.jit(tx.update).lower(grads, state, params).as_text()
    assert "callback" not in hlo


def test_the_in_step_check_raises_at_a_topology_update():
    tx = optax.chain(_rigl_checked(lenient(optax.scale_by_adam())), optax.scale_by_learning_rate(0.1))
    _, state, step = _train(tx, 1)
    hlo = step.lower(*jaxsparse.init_masked(tx, tiny_params()), 0).as_text()
    assert "callback" in hlo
    with pytest.raises(Exception, match=r"nonzero outside their masks.*dense\d/kernel"):
        _train(tx, 3 * EVERY + 1)


def test_a_host_given_flag_that_disagrees_with_the_schedule_is_named():
    """With ``check_params`` a host-scheduled step (``topology_update=``) checks its flag
    against the rule's schedule: a wrong one raises, naming the step counter."""
    tx = _rigl_checked(optax.sgd(0.1))
    params = tiny_params()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    assert not jaxsparse.topology_due(tx, 0)
    _, state = tx.update(grads, state, params, topology_update=False)
    with pytest.raises(Exception, match="topology_update=True at step counter 1, where the "
                                        "rule's schedule says False"):
        jax.block_until_ready(tx.update(grads, state, params, topology_update=True))
