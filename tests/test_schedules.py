import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import schedules


def test_periodic_dst():
    f = schedules.periodic(100, end_step=450)
    fired = [t for t in range(0, 600) if bool(f(t))]
    assert fired == [100, 200, 300, 400]


def test_periodic_include_begin_and_offset():
    f = schedules.periodic(10, end_step=45, begin_step=5, include_begin=True)
    assert [t for t in range(60) if bool(f(t))] == [5, 15, 25, 35]
    g = schedules.periodic(10)
    assert bool(g(10**6)) and not bool(g(0))


def test_cosine_drop_fraction_matches_formula():
    f = schedules.drop_fraction_schedule(0.3, end_step=1000, decay="cosine")
    for t in [0, 100, 500, 999, 1000, 2000]:
        expected = 0.15 * (1 + np.cos(np.pi * min(t, 1000) / 1000))
        assert float(f(t)) == pytest.approx(expected, abs=1e-6)
    c = schedules.drop_fraction_schedule(0.3, None, decay="constant")
    assert float(c(12345)) == pytest.approx(0.3)


def test_drop_fraction_accepts_optax_schedule():
    import optax

    f = schedules.drop_fraction_schedule(optax.linear_schedule(0.5, 0.0, 10), None)
    assert float(f(jnp.int32(5))) == pytest.approx(0.25)


def test_zhu_gupta_cubic():
    f = schedules.polynomial_sparsity(0.9, initial_sparsity=0.1, begin_step=100, end_step=1100)
    for t in [0, 100, 350, 600, 1100, 5000]:
        p = min(max((t - 100) / 1000, 0), 1)
        assert float(f(t)) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - p) ** 3, abs=1e-6)


def test_one_shot():
    f = schedules.one_shot_sparsity(0.8, at_step=50)
    assert float(f(49)) == 0.0 and float(f(50)) == pytest.approx(0.8)


def test_never():
    assert not bool(schedules.never(5))


def test_inject_hyperparams_makes_only_the_named_arguments_hyperparameters():
    import optax

    import jaxsparse

    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)}
    grads = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(16, 8)), jnp.float32)}

    def masks_after_update(drop_fraction):
        tx = jaxsparse.inject_hyperparams(jaxsparse.rigl)(
            inner=optax.sgd(0.1), sparsity=0.5, key=jax.random.key(0), end_step=100,
            update_every=1, drop_fraction=drop_fraction, drop_fraction_decay="constant")
        p, state = jaxsparse.init_masked(tx, params)
        before = np.asarray(jaxsparse.get_masks(state)["w"])
        _, state = jax.jit(tx.update)(grads, state, p)
        _, state = jax.jit(tx.update)(grads, state, p)  # step 1: a topology update
        assert set(state.hyperparams) == {"drop_fraction"}
        after = np.asarray(jaxsparse.get_masks(state)["w"])
        assert after.sum() == before.sum() == 64
        return float(state.hyperparams["drop_fraction"]), int((before & ~after).sum())

    # A schedule: the value at the update step is used; 0 changes nothing.
    assert masks_after_update(optax.constant_schedule(0.0)) == (0.0, 0)
    value, moved = masks_after_update(optax.constant_schedule(0.5))
    assert value == 0.5 and moved > 0
    with pytest.raises(ValueError, match="no argument"):
        jaxsparse.inject_hyperparams(jaxsparse.rigl, hyperparams=("lr",))
