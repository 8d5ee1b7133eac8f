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
