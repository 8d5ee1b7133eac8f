"""The LM results grid's config: the ``tiny`` preset (2 blocks, d=64, d_ff=256; 0.13M
params, 0.10M of them in the 12 prunable kernels) on 128-byte windows of the stdlib corpus,
1 device, AdamW, 600 steps of 32 sequences (2.5M bytes, ~1.1 epochs of the train split).

  python -m experiments.lm.sweep --config=experiments/configs/lm_small.py \
      --out=results/lm_small --runs=runs/lm_small
"""

from experiments.configs import lm_base
from experiments.lm.model import lm_config


def get_config():
    c = lm_base.get_config()
    c.model = lm_config("tiny", seq_len=128)
    c.mesh_shape = (1, 1)
    c.batch_size = 32
    c.num_steps = 600
    c.update_every = 50
    c.learning_rate = 3e-3
    c.warmup_steps = 30
    c.eval_every = 0
    c.eval_windows = 256
    c.log_every = 50
    c.checkpoint_every = -1
    c.progress = False
    return c
