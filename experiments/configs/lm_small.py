"""The LM results grid's config: the ``tiny`` preset (2 blocks, d=64, d_ff=256; 0.13M
params, 98k of them in the 12 prunable kernels) on 64-byte windows of the stdlib corpus,
1 device, AdamW, 300 steps of 16 sequences (0.3M bytes, ~0.15 epochs of the train split:
sized for a shared 2-core machine; the ranking of methods, not the perplexity, is the
point).

  python -m experiments.lm.sweep --config=experiments/configs/lm_small.py \
      --out=results/lm_small --runs=runs/lm_small
"""

from experiments.configs import lm_base
from experiments.lm.model import lm_config


def get_config():
    c = lm_base.get_config()
    c.model = lm_config("tiny", seq_len=64)
    c.mesh_shape = (1, 1)
    c.batch_size = 16
    c.num_steps = 300
    c.update_every = 25
    c.learning_rate = 3e-3
    c.warmup_steps = 15
    c.eval_every = 0
    c.eval_windows = 256
    c.log_every = 25
    c.checkpoint_every = -1
    c.progress = False
    return c
