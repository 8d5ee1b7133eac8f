"""SNFS's update equals its rule written plainly: per layer drop the floor(f * nnz) smallest
|W| (ties by the layer's key), split the total regrowth by mean |momentum| of the active
weights (capped by free room), grow by largest |momentum| among the positions not kept."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse
from jaxsparse import bitmask, schedules, topology
from jaxsparse.transform import _RULES, UpdateInputs

SHAPES = {"a": (40, 30), "b": (40, 30), "c": (30, 20)}


def _tree(flat):
    return {n: {"kernel": x} for n, x in flat.items()}


def _reference(masks, params, moms, key, f):
    """The rule with bool masks and a mask per layer kept between the two passes."""
    names = sorted(SHAPES)
    kept, n_drop, mean, cap = {}, [], [], []
    for j, name in enumerate(names):
        m, w, v = masks[name], params[name], moms[name]
        nnz = int(m.sum())
        n = int(np.floor(np.float32(f) * np.float32(nnz)))
        kept[name] = topology.top_k_keys(topology.candidate_keys(jnp.abs(w), m), nnz - n,
                                         tie_key=jax.random.fold_in(key, 2 * j))
        n_drop.append(n)
        mean.append(jnp.sum(jnp.where(m, jnp.abs(v), 0.0)) / max(nnz, 1))
        cap.append(m.size - (nnz - n))
    regrow = topology.distribute(sum(n_drop), jnp.stack(mean), jnp.asarray(cap, jnp.int32))
    new = {}
    for j, name in enumerate(names):
        keys = topology.candidate_keys(jnp.abs(moms[name]), ~kept[name])
        grown = topology.top_k_keys(keys, regrow[j], tie_key=jax.random.fold_in(key, 2 * j + 1))
        new[name] = kept[name] | grown
    return new


@pytest.mark.parametrize("tied", [False, True])
def test_snfs_update_equals_its_rule(tied):
    tx = jaxsparse.snfs(optax.sgd(0.1), 0.8, key=jax.random.key(1), end_step=1000,
                        update_every=10, drop_fraction=0.5, distribution="uniform")
    rule = _RULES[tx.update]
    keys = jax.random.split(jax.random.key(2), 3 * len(SHAPES))
    names = sorted(SHAPES)
    params = {n: jax.random.normal(keys[i], SHAPES[n]) for i, n in enumerate(names)}
    if tied:  # two magnitudes only: the drop ties at its threshold
        params = {n: jnp.where(p > 0, 1.0, -2.0) for n, p in params.items()}
    masks = rule.init_masks(_tree(params), jax.random.key(3))
    masks = {n: masks[n]["kernel"] for n in names}
    params = {n: jnp.where(masks[n], params[n], 0.0) for n in names}
    moms = {n: jnp.round(4 * jax.random.normal(keys[len(names) + i], SHAPES[n])) / 4
            for i, n in enumerate(names)}  # ties among the grow candidates too
    step, key = jnp.int32(10), jax.random.key(4)
    inputs = UpdateInputs(bitmask.pack_tree(_tree(masks)), _tree(params), _tree(params), step,
                          key, _tree(moms))
    got = bitmask.unpack_tree(bitmask.pack_tree(jax.jit(rule.update_masks)(inputs)))
    got = {n: got[n]["kernel"] for n in names}
    f = schedules.drop_fraction_schedule(0.5, 1000, "cosine")(step)
    want = _reference(masks, params, moms, key, f)
    for n in names:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
        assert int(got[n].sum()) > 0
    assert sum(int(got[n].sum()) for n in names) == sum(int(masks[n].sum()) for n in names)
