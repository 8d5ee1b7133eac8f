"""Multi-controller JAX on CPU: 2 local processes x 4 devices (jax.distributed, coordinator
on 127.0.0.1, gloo collectives) train the tiny byte LM with RigL through topology updates,
checkpointing with Orbax from both processes. Here, in one process with 8 devices:

* the 2-process run equals the 1-process 8-device run on the same 4x2 mesh: masks bitwise,
  params and optimizer state to float32 rounding (gloo adds the data-parallel gradient
  partial sums in another order than XLA's in-process all-reduce: a few ulp);
* a checkpoint restored onto the same mesh continues bit-exactly like the run that never
  stopped; the 2-process step-4 checkpoint restored onto an 8x1 mesh in 1 process continues
  bit-exactly like the same state moved to 8x1 in memory;
* restoring without the resharding path is refused, naming the manifest file.

Launch command under test (BUILD.md):
  python -m experiments.lm.launch --num_processes=2 --devices_per_process=4 -- \
      --config=experiments/configs/lm_tiny.py --workdir=<dir>
"""

import jax
import numpy as np
import pytest

import jaxsparse
from experiments.configs import lm_tiny
from experiments.lm import data as data_lib
from experiments.lm import launch, trainer
from jaxsparse.checkpoint import Checkpointer, CheckpointError
from jaxsparse.sharding import place

pytestmark = [pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices"),
              pytest.mark.slow]


def _assert_equal(a, b, rtol=0.0, atol=0.0):
    """Bitwise (default) or to a tolerance for float leaves; masks and ints always exact."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.floating) and (rtol or atol):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm2")
    code = launch.launch([f"--config={lm_tiny.__file__}", f"--workdir={workdir}"],
                         num_processes=2, devices_per_process=4,
                         log_dir=str(workdir / "logs"), timeout=900, quiet=True)
    logs = "".join(p.read_text()[-3000:] for p in sorted((workdir / "logs").glob("*.log")))
    assert code == 0, logs
    return workdir


def _steps(setup, state, data, n):
    step = trainer.make_train_step(setup)
    for _ in range(n):
        state, _ = step(state, data)
    return state


def test_two_processes_equal_one_process_and_resume_on_another_mesh(two_process_run,
                                                                    tmp_path):
    ckdir = two_process_run / "checkpoints"
    c = lm_tiny.get_config()
    corpus = data_lib.load_corpus()

    setup42 = trainer.make_setup(c)
    data42 = trainer.replicated_array(corpus.train, setup42)
    state = _steps(setup42, trainer.init_state(setup42), data42, 4)
    mid = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input
    final = _steps(setup42, state, data42, 4)

    # Save at step 4, restore, continue: bitwise the run that never stopped.
    ck = Checkpointer(tmp_path / "ck")
    ck.save(4, mid)
    ck.close()
    resumed = _steps(setup42, trainer.restore_state(setup42, tmp_path / "ck"), data42, 4)
    _assert_equal(resumed, final)

    # 2 processes x 4 devices vs 1 process x 8 devices (same 4x2 mesh).
    restored8 = trainer.restore_state(setup42, ckdir, step=8)
    assert int(restored8.step) == 8
    masks = jaxsparse.get_masks(restored8.opt_state)
    assert len(jax.tree.leaves(masks)) == 6
    _assert_equal(masks, jaxsparse.get_masks(final.opt_state))
    _assert_equal(restored8, final, rtol=1e-5, atol=1e-6)

    # 2 -> 1 process, 4x2 -> 8x1 mesh: the step-4 checkpoint restored onto 8x1 continues
    # bit-exactly like the same checkpoint restored onto 4x2 and moved to 8x1 in memory.
    c81 = lm_tiny.get_config()
    c81.mesh_shape = (8, 1)
    setup81 = trainer.make_setup(c81)
    data81 = trainer.replicated_array(corpus.train, setup81)
    on81 = trainer.restore_state(setup81, ckdir, step=4)
    assert on81.params["block_0"]["fc"]["kernel"].sharding.mesh.shape["data"] == 8
    on42 = trainer.restore_state(setup42, ckdir, step=4)
    _assert_equal(on81, on42)
    _assert_equal(on42, mid, rtol=1e-5, atol=1e-6)
    a = _steps(setup81, on81, data81, 4)
    b = _steps(setup81, place(on42, setup81.state_shardings), data81, 4)
    _assert_equal(a, b)

    with pytest.raises(CheckpointError, match=r"4/manifest: saved with process_count=2 but "
                                              r"restoring with process_count=1"):
        trainer.restore_state(setup42, ckdir, step=4, allow_reshard=False)
