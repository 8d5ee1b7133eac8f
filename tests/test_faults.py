"""Fault injection: a training process killed with SIGKILL at a random point (including while
an asynchronous checkpoint is being written) and then resumed ends bit-identical to an
uninterrupted run. The kill comes from the test, not from a hook inside the training loop.

CI runs one trial of each kind; the nightly profile runs more:

  JAXSPARSE_FAULT_TRIALS=10 python -m pytest tests/test_faults.py -q -m slow
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import train as train_lib
from experiments.checkpoint import Checkpointer
from experiments.configs import digits_tiny

ROOT = Path(__file__).resolve().parents[1]
TRIALS = int(os.environ.get("JAXSPARSE_FAULT_TRIALS", "1"))
STEPS, CKPT_EVERY, LOG_EVERY = 400, 10, 5


def config():
    c = digits_tiny.get_config()
    c.num_steps, c.checkpoint_every, c.log_every, c.max_to_keep = STEPS, CKPT_EVERY, LOG_EVERY, 3
    c.print_table = False
    return c


FLAGS = [f"--config.num_steps={STEPS}", f"--config.checkpoint_every={CKPT_EVERY}",
         f"--config.log_every={LOG_EVERY}", "--config.max_to_keep=3",
         "--config.print_table=false"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final state."""
    return train_lib.train(config(), tmp_path_factory.mktemp("reference"))["state"]


def _start(workdir: Path, *flags) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.train",
           "--config=experiments/configs/digits_tiny.py", f"--workdir={workdir}", *FLAGS, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _logged_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = [json.loads(line).get("step", -1) for line in path.read_text().splitlines()
             if line.endswith("}")]
    return max(steps, default=-1)


def _saving(workdir: Path) -> bool:
    folder = workdir / "checkpoints"
    return folder.is_dir() and any("tmp" in p.name for p in folder.iterdir())


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 300.0) -> bool:
    """SIGKILLs ``proc`` as soon as ``condition()`` holds; False if it exited first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    proc.kill()
    proc.wait()
    return False


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(x.shape))


def _trial(workdir: Path, reference, kind: str, rng: random.Random) -> str:
    proc = _start(workdir)
    if kind == "step":
        at = rng.randrange(CKPT_EVERY, STEPS - LOG_EVERY)
        killed = _kill_when(proc, lambda: _logged_step(workdir) >= at)
        where = f"after step {at}"
    else:
        killed = _kill_when(proc, lambda: _saving(workdir))
        where = "during an async checkpoint save"
    assert killed, f"the run ended before the kill {where}: {proc.stderr.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    resumed = _start(workdir, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, (where, err[-3000:])
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    assert ckpt.latest_step() == STEPS
    ckpt.close()
    state, meta = train_lib.restore_state(config(), workdir)
    assert int(state.step) == STEPS
    _leaves_equal(state, reference)  # params, optimizer state and masks, step, key
    final = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["event"] == "final" and final["steps"] == STEPS
    return where


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("kind", ["step", "save"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, reference, kind, trial):
    _trial(tmp_path / "run", reference, kind, random.Random(1000 * trial + len(kind)))
