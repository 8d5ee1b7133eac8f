"""The byte LM at GPT-2-small shape (12 x 768, ~85M params with the 256-byte vocabulary) on
a TPU pod slice: 16 chips as a (data=8, model=2) mesh, SRigL at 90% with ERK, AdamW.

Run on every host of the slice (same command everywhere; ``distributed="auto"`` makes each
call ``jax.distributed.initialize()``, which finds the coordinator from the TPU metadata):

  python -m experiments.lm.trainer --config=experiments/configs/lm_tpu.py \
      --workdir=gs://<bucket>/lm_srigl90

Checkpoints (Orbax, sharded, masks bit-packed) go to ``<workdir>/checkpoints``; resume on any
slice shape with ``--resume`` after changing ``mesh_shape`` (``--config.mesh_shape=16,2``).
tests/test_lm_tpu.py lowers this config's full train step for the TPU platform on a CPU
machine (on 8 CPU devices, mesh 4x2).
"""

from experiments.configs import lm_base
from experiments.lm.model import lm_config


def get_config():
    c = lm_base.get_config()
    c.model = lm_config("125m", seq_len=1024)
    c.mesh_shape = (8, 2)  # 16 chips (e.g. v5litepod-16); the product must be the chip count
    c.distributed = "auto"
    c.corpus = "text_dir"
    c.data_dir = "gs://<bucket>/text"  # a folder of .txt/.md/.py/.rst files
    c.algorithm = "srigl"
    c.sparsity = 0.9
    c.update_every = 500
    c.optimizer = "adamw"
    c.learning_rate = 6e-4
    c.weight_decay = 0.1
    c.warmup_steps = 2000
    c.batch_size = 256  # sequences per step, across the slice
    c.num_steps = 100_000
    c.eval_every = 2000
    c.eval_windows = 2048
    c.log_every = 100
    c.checkpoint_every = 5000
    c.max_to_keep = 3
    return c
