"""A tiny byte LM (1 layer, d=32, seq 32; ~20k params) for tests and quick multi-process
checks: RigL at 75%, topology update every 2 steps, 4x2 mesh.

  python -m experiments.lm.launch --num_processes=2 --devices_per_process=4 -- \
      --config=experiments/configs/lm_tiny.py --workdir=/tmp/lm_tiny
"""

from experiments.configs import lm_base


def get_config():
    c = lm_base.get_config()
    c.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64, seq_len=32)
    c.optimizer = "sgd"
    c.learning_rate = 0.5
    c.warmup_steps = 0
    c.batch_size = 16
    c.num_steps = 8
    c.update_every = 2
    c.log_every = 4
    c.eval_every = 0
    c.eval_windows = 16
    c.test_windows = 16
    c.checkpoint_every = 4
    c.progress = False
    return c
