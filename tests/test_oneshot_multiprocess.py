"""One-shot pruning with data-parallel calibration in 2 processes x 2 CPU devices
(``jax.distributed`` on 127.0.0.1, gloo collectives, launched by ``experiments.lm.launch``)
equals the same calibration in 1 process on a 4-device mesh: masks and Wanda's params bit for
bit, SparseGPT's reconstructed kernels to a few float32 ulp (gloo adds the per-device Hessian
partial sums in another order than XLA's in-process all-reduce).

Run as a module, this file is the worker: every process builds the same model and
calibration batches, prunes with ``batch_sharding`` over the 4-device mesh, and process 0
writes the results to ``--out``.
"""

import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CASES = {"sparsegpt": dict(method="sparsegpt", sparsity=0.5, blocksize=8),
         "sparsegpt24": dict(method="sparsegpt", nm=(2, 4), blocksize=8),
         "wanda": dict(method="wanda", sparsity=0.5)}


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32)(x))
        q, v = nn.Dense(16)(h), nn.Dense(16)(h)
        h = h + nn.Dense(32)(nn.relu(q * v))
        return nn.Dense(8)(h)


def setup():
    model = Net()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 24)))
    rng = np.random.default_rng(7)
    mix = rng.normal(size=(24, 24))
    batches = [(rng.normal(size=(32, 24)) @ mix).astype(np.float32) for _ in range(3)]
    return model, variables, batches


def run(mesh) -> dict:
    from jaxsparse import oneshot

    model, variables, batches = setup()
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    out = {}
    for name, kw in CASES.items():
        res = oneshot.prune(model, variables, batches, batch_sharding=sharding, **kw)
        flat = jax.tree_util.tree_flatten_with_path((res.params, res.masks))[0]
        for path, leaf in flat:
            if leaf is not None:
                out[f"{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num_processes", type=int, required=True)
    p.add_argument("--process_id", type=int, required=True)
    a = p.parse_args(argv)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    out = run(Mesh(np.array(jax.devices()), ("data",)))
    if jax.process_index() == 0:
        np.savez(a.out, **out)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    from experiments.lm import launch

    if len(jax.devices()) < 4:  # not at import: the workers import this module first
        pytest.skip("needs 4 (simulated) devices")
    out = tmp_path / "two.npz"
    code = launch.launch([f"--out={out}"], num_processes=2, devices_per_process=2,
                         module="tests.test_oneshot_multiprocess", log_dir=str(tmp_path),
                         timeout=600, quiet=True)
    logs = "".join(f.read_text()[-3000:] for f in sorted(tmp_path.glob("*.log")))
    assert code == 0, logs
    two = dict(np.load(out))
    one = run(Mesh(np.array(jax.devices()[:4]), ("data",)))
    assert sorted(one) == sorted(two) and len(one) == 3 * (5 * 2 + 5)  # 3 cases x (5 kernels + 5 biases + 5 masks)
    for key, a in one.items():
        if a.dtype == bool or key.startswith("wanda"):  # masks; Wanda only selects
            np.testing.assert_array_equal(a, two[key], err_msg=key)
            assert a.dtype != bool or a.sum() > 0
        else:  # SparseGPT's reconstructed kernels: float32 rounding of the Hessian sums
            np.testing.assert_allclose(a, two[key], rtol=1e-5, atol=1e-6, err_msg=key)


if __name__ == "__main__":
    main(sys.argv[1:])
