"""The LM grid with its learning rate chosen on the validation split and test perplexity
reported (RESULTS.md tables LM-lr and LM-test): :mod:`experiments.configs.lm_small_long`
(the ``tiny`` preset, 2400 steps of 16 64-byte windows, AdamW cosine, ERK, updates every
100 steps) plus a test pass after training over the first 2048 windows of the stdlib
corpus's test split (``experiments/lm/data.py``: ``STDLIB_TEST``, files in neither train
nor validation).

Protocol: for each method and sparsity, the learning rate of {1e-3, 3e-3, 1e-2, 3e-2, 1e-1}
with the lowest validation perplexity on seed 0 is chosen (``experiments.lm.sweep.chosen_lr``);
seeds 1 and 2 then run at that rate only, and the table reports the test perplexity of
seeds 0-2 at the chosen rate. The grid first ended at 3e-2; it was extended to 1e-1 because
static and SRigL at 90% chose 3e-2, its upper end, on validation. (The sweep prints each
run's test perplexity too, so the first grid's test numbers had been seen; they took no part
in the choice.)

  python -m experiments.lm.sweep --config=experiments/configs/lm_small_val.py \\
      --out=results/lm_small_val --runs=runs/lm_small_val \\
      --methods=dense,static,rigl,srigl,magnitude --sparsities=0.9,0.75,0.5 \\
      --seeds=0,1,2 --select_seed=0 --learning_rates=0.001,0.003,0.01,0.03,0.1
"""

from experiments.configs import lm_small_long


def get_config():
    c = lm_small_long.get_config()
    c.test_windows = 2048
    return c
