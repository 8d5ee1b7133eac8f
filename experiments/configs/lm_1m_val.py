"""Table LM-test's protocol (:mod:`experiments.configs.lm_small_val`: learning rate chosen
per method and sparsity on seed 0's validation perplexity, test perplexity of seeds 0-2 at
the chosen rate) on the ``1m`` preset (4 blocks, d=128, d_ff=512; 0.86M params, 0.79M of
them prunable): ~70 ms a step on this 2-core CPU, ~3 minutes a run.

  python -m experiments.lm.sweep --config=experiments/configs/lm_1m_val.py \\
      --out=results/lm_1m_val --runs=runs/lm_1m_val \\
      --methods=dense,static,rigl,srigl,magnitude --sparsities=0.9,0.75,0.5 \\
      --seeds=0,1,2 --select_seed=0 --learning_rates=0.001,0.003,0.01,0.03,0.1
"""

from experiments.configs import lm_small_val
from experiments.lm.model import lm_config


def get_config():
    c = lm_small_val.get_config()
    c.model = lm_config("1m", seq_len=64)
    return c
