"""Sharded LM training: a 4x2 (data, model) mesh of 8 CPU devices trains the byte LM with
RigL to the same masks (exactly) and params (to float32 reduction-order tolerance) as one
device; the state stays on its shardings; the plain step gathers nothing (all-reduces only)
and the topology update gathers no whole layer."""

import re

import jax
import numpy as np
import pytest

import jaxsparse
from experiments.configs import lm_tiny
from experiments.lm import data as data_lib
from experiments.lm import trainer

pytestmark = [pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices"),
              pytest.mark.slow]

STEPS = 8  # topology updates at steps 2, 4 (RigL end_step = 0.75 * 8 = 6)


def config():
    c = lm_tiny.get_config()
    # fc kernels of 64 x 256 = 2**14 entries: large enough for the topology code's sampled
    # bracket, so the HLO check below sees the path that large layers take.
    c.model.update(d_model=64, d_ff=256, num_heads=4)
    return c


def run(c, devices):
    setup = trainer.make_setup(c, devices)
    corpus = data_lib.load_corpus()
    data = trainer.replicated_array(corpus.train[:200_000], setup)
    state = trainer.init_state(setup)
    step = trainer.make_train_step(setup)
    compiled = step.lower(state, data).compile()
    losses = []
    for _ in range(STEPS):
        state, loss = compiled(state, data)
        losses.append(float(loss))
    return setup, state, losses, compiled.as_text()


@pytest.fixture(scope="module")
def runs():
    c = config()
    sharded = run(c, None)
    c1 = config()
    c1.mesh_shape = (1, 1)
    single = run(c1, jax.devices()[:1])
    return sharded, single


def test_sharded_training_equals_single_device(runs):
    (setup, s8, l8, _), (_, s1, l1, _) = runs
    m8, m1 = jaxsparse.get_masks(s8.opt_state), jaxsparse.get_masks(s1.opt_state)
    assert len(jax.tree.leaves(m8)) == 6
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m8)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Matmuls split over the model axis add partial sums in another order: float32 noise.
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    assert l8[-1] < l8[0]
    assert int(s8.step) == STEPS


def test_state_keeps_param_shardings(runs):
    (setup, s8, _, _), _ = runs
    for got, want in zip(jax.tree.leaves(s8), jax.tree.leaves(setup.state_shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    params = s8.params
    fc = params["block_0"]["fc"]["kernel"]
    assert fc.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    masks = jaxsparse.get_masks(s8.opt_state)
    # The state holds the masks bit-packed; unpacked they are sharded like their params.
    assert masks["block_0"]["fc"]["kernel"].sharding.is_equivalent_to(fc.sharding, 2)
    proj = params["block_0"]["proj"]["kernel"]
    assert masks["block_0"]["proj"]["kernel"].sharding.is_equivalent_to(proj.sharding, 2)
    assert len(fc.addressable_shards) == 8 and fc.addressable_shards[0].data.shape == (64, 128)


def _gathers(hlo):
    """(shape, in_topology_update) of every all-gather in the compiled step."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"= (\w+)\[([\d,]*)\]\S* all-gather(?:-start)?\(", line)
        if m:
            shape = tuple(int(d) for d in m.group(2).split(",") if d)
            out.append((shape, "cond/branch_1_fun" in line))
    return out


def _entry(hlo):
    """The compiled step's ENTRY computation: the plain step (the topology update's cond
    branches and the loops inside them are computations of their own)."""
    start = hlo.index("\nENTRY ")
    return hlo[start:hlo.index("\n}\n", start)]


def test_plain_step_gathers_no_layer(runs):
    (_, _, _, hlo), _ = runs
    # Tensor parallelism needs all-reduces of activations, never a weight all-gather.
    assert all(in_update for _, in_update in _gathers(hlo)), _gathers(hlo)
    # Like the dense step, the plain step communicates by all-reduces only: nothing is
    # resharded (all-to-all) or gathered outside the topology update.
    kinds = set(re.findall(r" (all-gather|all-to-all|collective-permute|reduce-scatter|"
                           r"all-reduce)(?:-start)?\(", _entry(hlo)))
    assert kinds == {"all-reduce"}, kinds


def test_topology_update_gathers_no_whole_layer(runs):
    (_, _, _, hlo), _ = runs
    # The counting selection's sample is a strided slice (<= 2048 keys), never a gather
    # from the flattened layer.
    big = [s for s, inside in _gathers(hlo) if inside and int(np.prod(s)) > 2048]
    assert not big, big
