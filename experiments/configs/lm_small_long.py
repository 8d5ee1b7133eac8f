"""The longer LM results grid (table LM-long): :mod:`experiments.configs.lm_small` (the
``tiny`` preset on 64-byte windows of the stdlib corpus, 1 device, AdamW lr 3e-3 cosine,
batch 16, ERK, 256 validation windows) trained 8x longer, with its schedules scaled to
the step count:

* ``num_steps`` 300 -> 2400 (2.5M bytes, about 1.2 epochs of the train split);
* ``warmup_steps`` 15 -> 120 (5% of the run, as before);
* ``update_every`` 25 -> 100 (the RigL paper's delta T; 18 topology updates before
  ``end_fraction`` = 0.75, 15 magnitude-pruning steps between 10% and 75% of the run);
* ``log_every`` 25 -> 50 (the train-loss curve) and ``eval_every`` 0 -> 400 (validation
  perplexity six times per run, for the curves; the table uses the last one).

The learning rate and everything else are lm_small's, not tuned. The LM reports
validation perplexity only.

  python -m experiments.lm.sweep --config=experiments/configs/lm_small_long.py \
      --out=results/lm_small_long --runs=runs/lm_small_long \
      --methods=dense,static,rigl,srigl,magnitude --sparsities=0.9,0.75,0.5 --seeds=0,1,2
"""

from experiments.configs import lm_small


def get_config():
    c = lm_small.get_config()
    c.num_steps = 2400
    c.warmup_steps = 120
    c.update_every = 100
    c.log_every = 50
    c.eval_every = 400
    return c
