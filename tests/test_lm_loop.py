"""The LM training loop (experiments.lm.trainer.train): how far the host lets steps run
ahead changes when it waits, never what is computed."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse
from experiments.configs import lm_tiny
from experiments.lm import data as data_lib
from experiments.lm import trainer


def _config(steps_ahead):
    c = lm_tiny.get_config()
    c.mesh_shape = (1, 1)
    c.num_steps = 6  # topology updates at steps 2 and 4
    c.checkpoint_every = -1
    c.steps_ahead = steps_ahead
    return c


def test_steps_ahead_default_is_by_platform_and_an_explicit_value_wins():
    c = _config(-1)
    assert trainer.steps_ahead(c) == (0 if jax.default_backend() == "cpu" else 2)
    c.steps_ahead = 3
    assert trainer.steps_ahead(c) == 3
    del c["steps_ahead"]  # a config written before the option: by platform too
    assert trainer.steps_ahead(c) == (0 if jax.default_backend() == "cpu" else 2)


@pytest.mark.slow
def test_running_ahead_trains_the_same_run():
    devices = jax.devices()[:1]
    waited, rec0 = trainer.train(_config(0), None, devices)
    ahead, rec3 = trainer.train(_config(3), None, devices)
    assert rec0["steps"] == rec3["steps"] == 6 and int(ahead.step) == 6
    assert rec0["train_loss"] == rec3["train_loss"]
    for a, b in zip(jax.tree.leaves(waited.params), jax.tree.leaves(ahead.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(jaxsparse.get_masks(waited.opt_state)),
                    jax.tree.leaves(jaxsparse.get_masks(ahead.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The test split, evaluated once after training: a direct pass over its first windows.
    c = _config(0)
    win = data_lib.eval_windows(data_lib.load_corpus().test, c.model.seq_len, c.test_windows)
    assert rec0["test_windows"] == len(win) == c.test_windows
    setup = trainer.make_setup(c, devices)
    with nn.logical_axis_rules(setup.rules):
        direct = float(trainer.lm_loss(setup.model, waited.params, jnp.asarray(win)))
    np.testing.assert_allclose(rec0["test_loss"], direct, rtol=1e-5)
    assert rec0["test_perplexity"] == pytest.approx(math.exp(rec0["test_loss"]))
    assert rec0["test_loss"] != rec0["valid_loss"]


@pytest.mark.slow
def test_host_scheduled_topology_trains_the_same_run():
    """``host_topology``: two compiled steps, picked per step on the host, train the run of
    the one-step loop (RigL, a topology update at step 2): the same masks, params to float32
    rounding; dense ignores it."""
    devices = jax.devices()[:1]
    one, rec_one = trainer.train(_config(0), None, devices)
    c = _config(0)
    c.host_topology = True
    setup = trainer.make_setup(c, devices)
    choose = trainer.step_chooser(setup)
    due = [jaxsparse.topology_due(setup.tx, t) for t in range(6)]
    assert due[2] and not due[0] and not due[1]
    assert choose(0) is choose(1) and choose(0) is not choose(2)
    two, rec_two = trainer.train(c, None, devices)
    for a, b in zip(jax.tree.leaves(jaxsparse.get_masks(one.opt_state)),
                    jax.tree.leaves(jaxsparse.get_masks(two.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Not bitwise: without the cond XLA fuses the gradient pass of the program differently
    # (float32 sums in another order, ~1e-7 relative after 6 steps).
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert rec_two["train_loss"] == pytest.approx(rec_one["train_loss"], rel=1e-5)
    c.algorithm = "dense"
    dense = trainer.step_chooser(trainer.make_setup(c, devices))
    assert dense(0) is dense(2)


@pytest.mark.slow
def test_each_step_kinds_first_call_is_timed_with_the_first_step(monkeypatch):
    """Under ``host_topology`` the update step compiles at its first call (step 2): that
    call counts in ``first_step_time``, not in the tokens/s of its log interval. A fake
    clock: a step kind's first call takes 100 s, every other call 1 s."""
    clock = [0.0]
    monkeypatch.setattr(trainer, "time", type("Clock", (), {
        "perf_counter": staticmethod(lambda: clock[0])}))
    real_chooser, wrapped = trainer.step_chooser, {}

    def chooser(setup):
        choose = real_chooser(setup)

        def timed(fn):
            def call(*args):
                clock[0] += 1.0 if fn in wrapped else 100.0
                wrapped.setdefault(fn, call)
                return fn(*args)
            return call

        return lambda t: wrapped.get(choose(t)) or timed(choose(t))

    monkeypatch.setattr(trainer, "step_chooser", chooser)
    c = _config(0)
    c.host_topology = True
    c.log_every = 6
    _, rec = trainer.train(c, None, jax.devices()[:1])
    assert len(wrapped) == 2  # the plain and the update step
    assert rec["first_step_time"] == pytest.approx(200.0)
    # Steps 3-6 in the last interval, 1 s each.
    assert rec["tokens_per_s"] == pytest.approx(c.batch_size * c.model.seq_len / 1.0)

