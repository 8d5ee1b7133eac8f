"""The TPU job config's full sharded train step (SRigL topology update under lax.cond,
AdamW, tensor + data parallel) lowers for the TPU platform on a machine without one
(``.trace(...).lower(lowering_platforms=("tpu",))``): catches ops or shardings that TPU
lowering rejects. Lowering is not compiling: TPU-compiler limits are not checked here."""

import jax
import jax.numpy as jnp
import pytest

from experiments.configs import lm_tpu
from experiments.lm import trainer

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")


@pytest.mark.slow
def test_tpu_config_train_step_lowers_for_tpu():
    c = lm_tpu.get_config()
    assert c.model.d_model == 768 and c.model.num_layers == 12 and c.distributed == "auto"
    assert c.batch_size % c.mesh_shape[0] == 0
    # The slice's (8, 2) mesh as (4, 2) over the 8 CPU devices; one of the 12 identical
    # blocks keeps tracing fast (every block lowers to the same ops).
    c.mesh_shape = (4, 2)
    c.model.num_layers = 1
    setup = trainer.make_setup(c)
    state = trainer.abstract_state(setup)
    data = jax.ShapeDtypeStruct((1 << 20,), jnp.uint8, sharding=setup.replicated)
    # optax's AdamW bias correction mixes a Python float with the int32 count, which the
    # suite's strict promotion rejects; the step itself is traced under standard rules.
    with jax.numpy_dtype_promotion("standard"):
        lowered = trainer.make_train_step(setup).trace(state, data).lower(
            lowering_platforms=("tpu",))
    text = lowered.as_text()
    assert "stablehlo.case" in text  # the topology update's lax.cond
    assert 'sdy.sharding<@mesh, [{}, {"model"}]>' in text  # model-axis-sharded kernels
    fc = state.params["block_0"]["fc"]["kernel"]
    assert fc.shape == (768, 3072) and fc.sharding.spec == jax.sharding.PartitionSpec(None, "model")
