"""Lottery tickets: IMP with rewinding, scratch-e / scratch-b, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import lottery
from jaxsparse import masks as jmasks
from jaxsparse.distributions import layer_budgets, layer_specs
from tests.helpers import examples


def make_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "a": {"kernel": jax.random.normal(k[0], (6, 5)), "bias": jnp.zeros(5)},
        "b": {"kernel": jax.random.normal(k[1], (5, 4)), "bias": jnp.zeros(4)},
    }


TARGET = make_params(seed=42)


@jax.jit
def _descend(params, masks, num_steps):
    """num_steps of gradient descent on 0.5 |params - TARGET|^2, masked weights kept 0."""

    def step(_, p):
        new = jax.tree.map(lambda w, t: w - 0.1 * (w - t), p, TARGET)
        return jmasks.apply_masks(new, masks)

    return jax.lax.fori_loop(0, num_steps, step, params)


class Recorder:
    """A train_fn that records what IMP passes it."""

    def __init__(self):
        self.calls = []

    def __call__(self, params, masks, num_steps):
        self.calls.append((params, masks, num_steps))
        trained = _descend(params, masks, num_steps)
        return trained, {"steps": num_steps}


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_imp_sparsities():
    assert lottery.imp_sparsities(3, prune_fraction=0.5) == pytest.approx([0.5, 0.75, 0.875])
    s = lottery.imp_sparsities(4, sparsity=0.9)
    assert s[-1] == 0.9
    np.testing.assert_allclose(np.diff(np.log1p(-np.asarray(s))), np.log(0.1) / 4, rtol=1e-9)


def test_imp_rewinds_to_init_and_reaches_sparsity():
    params = make_params()
    train_fn = Recorder()
    result = lottery.imp(train_fn, params, num_steps=20, rounds=3, prune_fraction=0.5)
    assert result.sparsities == pytest.approx([0.5, 0.75, 0.875])
    specs = layer_specs(params)
    assert jmasks.count_active(result.masks) == layer_budgets(specs, 0.875, "uniform")
    for masks, s in zip(result.masks_per_round, result.sparsities, strict=True):
        assert jmasks.count_active(masks) == layer_budgets(specs, s, "uniform")
    # Dense training, then one retraining per round, all from the saved init.
    assert [c[2] for c in train_fn.calls] == [20, 20, 20, 20]
    assert sorted(result.checkpoints) == [0, 20]
    assert_trees_equal(result.rewind_params, params)
    retrainings = zip(train_fn.calls[1:], result.masks_per_round, strict=True)
    for (passed, masks, _), round_masks in retrainings:
        assert_trees_equal(masks, round_masks)
        assert_trees_equal(passed, jmasks.apply_masks(params, round_masks))
    # Masks only shrink, and round 1 keeps the largest trained magnitudes per layer.
    for prev, nxt in zip(result.masks_per_round, result.masks_per_round[1:], strict=False):
        for p, n in zip(jax.tree.leaves(prev), jax.tree.leaves(nxt), strict=True):
            assert not bool(jnp.any(n & ~p))
    dense_trained = result.checkpoints[20]
    for layer in ("a", "b"):
        w = np.abs(np.asarray(dense_trained[layer]["kernel"])).ravel()
        kept = np.asarray(result.masks_per_round[0][layer]["kernel"]).ravel()
        assert w[kept].min() >= w[~kept].max()
    assert result.histories[0] == {"steps": 20} and len(result.histories) == 4
    # The returned params are those of the last retraining, exactly sparse.
    assert_trees_equal(result.params, jmasks.apply_masks(result.params, result.masks))


def test_imp_rewinds_to_an_early_step():
    params = make_params(seed=1)
    train_fn = Recorder()
    result = lottery.imp(train_fn, params, num_steps=30, rounds=2, sparsity=0.8, rewind_step=5,
                         ranking="global")
    assert [c[2] for c in train_fn.calls] == [5, 25, 25, 25]
    theta_k = _descend(params, jmasks.ones_masks(params), 5)
    assert_trees_equal(result.rewind_params, theta_k)
    assert_trees_equal(result.checkpoints[5], theta_k)
    retrainings = zip(train_fn.calls[2:], result.masks_per_round, strict=True)
    for (passed, _, _), masks in retrainings:
        assert_trees_equal(passed, jmasks.apply_masks(theta_k, masks))
    total = sum(layer_budgets(layer_specs(params), 0.8, "uniform").values())
    assert sum(jmasks.count_active(result.masks).values()) == total
    assert result.histories[0] == ({"steps": 5}, {"steps": 25})


def test_imp_from_saved_checkpoints():
    params = make_params(seed=2)
    trained = _descend(params, jmasks.ones_masks(params), 10)
    early = _descend(params, jmasks.ones_masks(params), 2)
    train_fn = Recorder()
    result = lottery.imp(train_fn, params, num_steps=10, rounds=1, sparsity=0.5, rewind_step=2,
                         checkpoints={0: params, 2: early, 10: trained})
    assert [c[2] for c in train_fn.calls] == [8]  # no dense retraining
    assert_trees_equal(train_fn.calls[0][0], jmasks.apply_masks(early, result.masks))
    with pytest.raises(ValueError, match=r"cannot rewind to step 3: no weights were saved at "
                                         r"that step; saved steps are \[0, 2, 10\]"):
        lottery.imp(Recorder(), params, num_steps=10, rounds=1, sparsity=0.5, rewind_step=3,
                    checkpoints={0: params, 2: early, 10: trained})
    with pytest.raises(ValueError, match="checkpoints must hold the trained dense weights at "
                                         "step num_steps=10"):
        lottery.imp(Recorder(), params, num_steps=10, rounds=1, sparsity=0.5,
                    checkpoints={0: params})


@settings(max_examples=examples(8, nightly=150), deadline=None)
# Up to 1 - 0.5^3 = 87.5% sparsity: every layer of the tiny model keeps some weights.
@given(st.integers(1, 3), st.floats(0.1, 0.5), st.sampled_from(["uniform", "erk"]))
def test_imp_hits_the_requested_sparsity(rounds, fraction, distribution):
    params = make_params(seed=rounds)
    result = lottery.imp(Recorder(), params, num_steps=2, rounds=rounds,
                         prune_fraction=fraction, distribution=distribution)
    final = 1.0 - (1.0 - fraction) ** rounds
    assert result.sparsities[-1] == pytest.approx(final)
    budgets = layer_budgets(layer_specs(params), result.sparsities[-1], distribution)
    assert jmasks.count_active(result.masks) == budgets


def test_rewind_helper():
    params = make_params()
    masks = jmasks.ones_masks(params)
    masks["a"]["kernel"] = masks["a"]["kernel"].at[0].set(False)
    out = lottery.rewind({0: params}, 0, masks)
    assert not bool(jnp.any(out["a"]["kernel"][0]))
    assert_trees_equal(lottery.rewind({0: params}, 0), params)
    with pytest.raises(ValueError, match=r"cannot rewind to step 100: .* saved steps are \[0\]"):
        lottery.rewind({0: params}, 100)


def test_scratch_e_and_b():
    params = make_params()
    result = lottery.imp(Recorder(), params, num_steps=4, rounds=1, sparsity=0.5)
    fresh = make_params(seed=9)
    for fn, steps in ((lottery.scratch_e, 4), (lottery.scratch_b, 8)):
        train_fn = Recorder()
        trained, history = fn(train_fn, result.masks, fresh, num_steps=4)
        (passed, masks, n), = train_fn.calls
        assert n == steps and history == {"steps": steps}
        assert_trees_equal(passed, jmasks.apply_masks(fresh, result.masks))
        assert_trees_equal(masks, result.masks)
        assert_trees_equal(trained, jmasks.apply_masks(trained, result.masks))
    with pytest.raises(ValueError, match="budget must be a finite number > 0"):
        lottery.scratch(Recorder(), result.masks, fresh, num_steps=4, budget=0)


def test_imp_errors():
    params = make_params()
    train_fn = Recorder()
    kw = dict(num_steps=10, rounds=2)
    with pytest.raises(ValueError, match="give exactly one of sparsity"):
        lottery.imp(train_fn, params, sparsity=0.5, prune_fraction=0.2, **kw)
    with pytest.raises(ValueError, match="give exactly one of sparsity"):
        lottery.imp(train_fn, params, **kw)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        lottery.imp(train_fn, params, sparsity=1.5, **kw)
    with pytest.raises(ValueError, match="prune_fraction must be in"):
        lottery.imp(train_fn, params, prune_fraction=0.0, **kw)
    with pytest.raises(ValueError, match="rounds must be an int >= 1, got 0"):
        lottery.imp(train_fn, params, sparsity=0.5, num_steps=10, rounds=0)
    with pytest.raises(ValueError, match="cannot rewind to step 10: IMP saves the dense run's "
                                         r"weights at steps 0..9"):
        lottery.imp(train_fn, params, sparsity=0.5, rewind_step=10, **kw)
    with pytest.raises(ValueError, match="unknown ranking 'random'"):
        lottery.imp(train_fn, params, sparsity=0.5, ranking="random", **kw)
    with pytest.raises(ValueError, match="override 'nope' matches no prunable leaf"):
        lottery.imp(train_fn, params, sparsity=0.5, overrides={"nope": 0.0}, **kw)
    assert train_fn.calls == []  # every error is raised before any training
