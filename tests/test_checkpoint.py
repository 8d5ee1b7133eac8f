"""Checkpoint / resume: a run killed with SIGKILL and resumed ends bit-identical to an
uninterrupted one; a checkpoint of another model is refused with a clear message."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse
from experiments import train as train_lib
from experiments.checkpoint import Checkpointer, CheckpointMismatchError
from experiments.configs import digits_tiny

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/digits_tiny.py"


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(x.shape))


def test_roundtrip_keeps_keys_masks_and_none_leaves(tmp_path):
    params = {"Dense_0": {"kernel": jnp.arange(12.0).reshape(4, 3), "bias": jnp.ones(3)}}
    tx = jaxsparse.rigl(optax.sgd(0.1, 0.9), 0.5, key=jax.random.key(7), end_step=10)
    state = {"params": params, "opt": tx.init(params), "rng": jax.random.key(3)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(4, state, {"data_position": [1, 2]})
    ckpt.wait()
    target = {"params": jax.tree.map(jnp.zeros_like, params), "opt": tx.init(params),
              "rng": jax.random.key(0)}
    restored, meta = ckpt.restore(target)
    ckpt.close()
    assert meta == {"data_position": [1, 2]}
    _leaves_equal(restored, state)
    assert restored["opt"].masks["Dense_0"]["bias"] is None
    assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(state["rng"])


def test_restore_without_checkpoint_errors(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore({"a": jnp.zeros(2)})
    ckpt.close()


def test_checkpoint_of_other_model_is_refused(tmp_path):
    c = digits_tiny.get_config()
    c.num_steps, c.print_table = 4, False
    train_lib.train(c, tmp_path)
    other = digits_tiny.get_config()
    other.model.hidden = (24, 16)
    with pytest.raises(CheckpointMismatchError,
                       match=r"leaf .*\['Dense_0'\]\['kernel'\] is float32\[64, 32\] in the "
                             r"checkpoint but float32\[64, 24\] here") as e:
        train_lib.train(other, tmp_path, resume=True)
    assert "written by model" in str(e.value) and "[32, 16]" in str(e.value)
    dense = digits_tiny.get_config()
    dense.algorithm = "dense"
    with pytest.raises(CheckpointMismatchError, match="leaves saved vs"):
        train_lib.restore_state(dense, tmp_path)


def _run(workdir, *flags):
    cmd = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}",
           f"--workdir={workdir}", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    c = digits_tiny.get_config()  # 60 steps, checkpoints every 20
    reference = train_lib.train(c, tmp_path / "reference")["state"]

    crashed = _run(tmp_path / "run", "--config.debug_kill_at_step=30")
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr[-3000:])
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.latest_step() == 20  # the kill came after step 30: steps 21-30 are redone
    assert ckpt.read_meta()["data_position"] == [0, 20]  # 44 batches per epoch
    ckpt.close()

    resumed = _run(tmp_path / "run", "--resume")
    assert resumed.returncode == 0, (resumed.returncode, resumed.stderr[-3000:])
    assert "resumed from step 20" in resumed.stderr
    assert "final test accuracy" in resumed.stdout and "Dense_0/kernel" in resumed.stdout

    state, meta = train_lib.restore_state(c, tmp_path / "run")
    assert int(state.step) == 60 and meta["data_position"] == [1, 16]
    _leaves_equal(state, reference)  # params, optimizer state and masks, step, key
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
               if x]
    assert records[-1]["event"] == "final" and records[-1]["steps_run"] == 40
