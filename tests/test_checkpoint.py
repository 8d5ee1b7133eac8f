"""Checkpoints: round trip, a checkpoint of another model or config refused with a clear
message, broken checkpoints named and skipped, a read-only directory refused while the old
checkpoints stay. (SIGKILL-and-resume fault tests: tests/test_faults.py.)"""

import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse
from experiments import train as train_lib
from experiments.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointWriteError,
)
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


@pytest.mark.slow
def test_checkpoint_of_other_model_is_refused(tmp_path):
    c = digits_tiny.get_config()
    c.num_steps, c.print_table = 4, False
    train_lib.train(c, tmp_path)
    other = digits_tiny.get_config()
    other.model.hidden = (24, 16)
    with pytest.raises(train_lib.ConfigChangedError, match=r"model.hidden: \[32, 16\] -> "
                                                           r"\[24, 16\]"):
        train_lib.train(other, tmp_path, resume=True)
    with pytest.raises(CheckpointMismatchError,
                       match=r"leaf .*\['Dense_0'\]\['kernel'\] is float32\[64, 32\] in the "
                             r"checkpoint but float32\[64, 24\] here") as e:
        train_lib.restore_state(other, tmp_path)
    assert "written by model" in str(e.value) and "[32, 16]" in str(e.value)
    dense = digits_tiny.get_config()
    dense.algorithm = "dense"
    with pytest.raises(CheckpointMismatchError, match="leaves saved vs"):
        train_lib.restore_state(dense, tmp_path)


def _small_state(value):
    return {"w": jnp.full((3, 2), value, jnp.float32), "rng": jax.random.key(int(value))}


def _saved(tmp_path, steps):
    ckpt = Checkpointer(tmp_path, max_to_keep=5, async_save=False)
    for s in steps:
        ckpt.save(s, _small_state(float(s)), {"data_position": [0, s]})
    return ckpt


def _files(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_json", "deleted"])
def test_broken_metadata_names_the_file_and_resume_falls_back(tmp_path, damage):
    ckpt = _saved(tmp_path, [1, 2])
    meta = ckpt.meta_path(2)
    text = meta.read_text()
    if damage == "truncated":
        meta.write_text(text[: len(text) // 2])
    elif damage == "empty":
        meta.write_text("")
    elif damage == "not_json":
        meta.write_text("[1, 2, 3]")
    else:
        meta.unlink()
    before = _files(tmp_path)
    with pytest.raises(CheckpointCorruptError, match=rf"{tmp_path}/2/meta/metadata"):
        ckpt.read_meta(2)
    with pytest.raises(CheckpointCorruptError, match=rf"{tmp_path}/2/meta/metadata"):
        ckpt.restore(_small_state(0.0), step=2)
    with pytest.warns(UserWarning, match=rf"checkpoint {tmp_path}/2 .*is broken; falling back"):
        state, got = ckpt.restore(_small_state(0.0))
    assert got["data_position"] == [0, 1] and float(state["w"][0, 0]) == 1.0
    assert _files(tmp_path) == before  # restoring changed nothing on disk
    ckpt.close()


def test_no_intact_checkpoint_lists_every_broken_one(tmp_path):
    ckpt = _saved(tmp_path, [1, 2])
    for s in (1, 2):
        ckpt.meta_path(s).write_text("{")
    with pytest.warns(UserWarning, match="is broken"), \
            pytest.raises(CheckpointCorruptError,
                          match=rf"no intact checkpoint: {tmp_path}/2 .*; {tmp_path}/1 "):
        ckpt.restore(_small_state(0.0))
    ckpt.close()


def test_missing_array_files_fall_back_to_the_older_step(tmp_path):
    ckpt = _saved(tmp_path, [1, 2])
    shutil.rmtree(tmp_path / "2" / "state")
    with pytest.warns(UserWarning, match=rf"{tmp_path}/2 \(CheckpointCorruptError: "):
        state, meta = ckpt.restore(_small_state(0.0))
    assert meta["data_position"] == [0, 1]
    ckpt.close()


def _make_unwritable(folder):
    """Read-only for this process: chmod, or ``chattr +i`` when running as root (permission
    bits do not bind root). Returns an undo function, or None when neither works."""
    os.chmod(folder, 0o555)
    probe = Path(folder) / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return lambda: os.chmod(folder, 0o755)
    probe.unlink()
    os.chmod(folder, 0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)],
                                                 capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    return None


def test_read_only_workdir_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    ckpt = _saved(tmp_path, [1])
    before = _files(tmp_path)
    undo = _make_unwritable(tmp_path)
    if undo is None:
        pytest.skip("cannot make a directory read-only here")
    try:
        with pytest.raises(CheckpointWriteError,
                           match=rf"cannot write checkpoint step 2 to {tmp_path} .*the "
                                 r"checkpoints already there are kept \(steps \[1\]\)"):
            ckpt.save(2, _small_state(2.0), {"data_position": [0, 2]})
    finally:
        undo()
    assert _files(tmp_path) == before
    state, meta = ckpt.restore(_small_state(0.0))
    assert meta["data_position"] == [0, 1] and float(state["w"][0, 0]) == 1.0
    ckpt.close()
