"""Every LM training option, with its default (1M-parameter byte LM, RigL at 75%, 4x2 mesh
on 8 CPU devices, the standard-library corpus).

Run:  python -m experiments.lm.trainer --config=experiments/configs/lm_base.py \
          --workdir=/tmp/lm_run
Multi-process (2 local processes x 4 CPU devices):
      python -m experiments.lm.launch --num_processes=2 --devices_per_process=4 -- \
          --config=experiments/configs/lm_base.py --workdir=/tmp/lm_run
"""

import ml_collections

from experiments.lm.model import DEFAULT_RULES, lm_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = lm_config("1m", seq_len=128)
    # Data: "stdlib" (the Python standard library's sources, experiments/lm/data.py) or
    # "text_dir" (every .txt/.md/.py/.rst file under data_dir).
    c.corpus = "stdlib"
    c.data_dir = ""
    # text_dir only: the last files (by path) held out as the test split (stdlib has its own).
    c.test_fraction = 0.0
    # Mesh: shape over all devices of all processes; logical axis -> mesh axis rules.
    c.mesh_shape = (4, 2)
    c.mesh_axes = ("data", "model")
    c.logical_axis_rules = DEFAULT_RULES
    # "auto": jax.distributed.initialize() from the environment (TPU pod slices, SLURM);
    # local multi-process runs get their coordinator from experiments/lm/launch.py.
    c.distributed = ""
    # Sparsity and optimizer: the fields of experiments/configs/base.py, built by
    # experiments.train.make_optimizer (algorithms: dense, static, set, rigl, snfs, srigl,
    # magnitude, random, granet).
    c.algorithm = "rigl"
    c.sparsity = 0.75
    c.distribution = "erk"
    c.update_every = 50
    c.drop_fraction = 0.3
    c.end_fraction = 0.75
    c.prune_begin_fraction = 0.1
    c.algorithm_kwargs = ml_collections.ConfigDict()
    c.optimizer = "adamw"  # sgd (with momentum), adam, adamw
    c.learning_rate = 3e-3
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 0.0
    c.lr_schedule = "cosine"  # warmup then cosine to 0, or constant
    c.lr_decay_epochs = ()
    c.lr_decay_factor = 1.0
    c.warmup_steps = 50
    c.seed = 0
    c.batch_size = 32  # sequences per step (global, across processes)
    c.num_steps = 600
    c.epochs = 0
    c.eval_every = 200  # steps between validation passes (0: only at the end)
    c.eval_windows = 256  # validation windows of seq_len bytes (the first ones of the split)
    # Test windows (the first ones of the test split), evaluated once, after the last step
    # (0: no test pass; also none when the corpus has no test split).
    c.test_windows = 256
    c.log_every = 25
    c.checkpoint_every = 0  # steps between checkpoints (0: only at the end; < 0: never)
    c.max_to_keep = 2
    c.progress = True  # tqdm progress bar (process 0)
    # Steps dispatched ahead of the host before it waits for one (-1: 0 on CPU, 2 on GPU/TPU;
    # experiments.lm.trainer.steps_ahead).
    c.steps_ahead = -1
    # Host-scheduled topology updates: plain and update steps compile apart and the host
    # picks one per step (jaxsparse.topology_due); same results, no lax.cond in plain steps.
    c.host_topology = False
    return c
