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
