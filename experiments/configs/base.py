"""Every training option, with its default (digits + LeNet-300-100 + RigL at 90%).

Run:  python -m experiments.train --config=experiments/configs/base.py --workdir=/tmp/run
"""

import importlib.util

import ml_collections
from ml_collections import config_dict

from experiments.models import model_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Data: digits (embedded), mnist, fashion_mnist, cifar10. data_dir: folder of the dataset
    # files (default $JAXSPARSE_DATA_DIR, else tensorflow-datasets).
    c.dataset = "digits"
    c.data_dir = ""
    # Held out of the training set for choosing hyperparameters (a count, or a fraction
    # below 1; 0: none, then the per-epoch evaluations use the test split). The test split
    # is otherwise evaluated once, at the end.
    c.validation_size = 0.1
    c.validation_seed = 0
    # Model: see experiments/models.py (lenet300, lenet5, vgg, vit).
    c.model = model_config("lenet300")
    # Sparsity: dense, static, set, rigl, snfs, magnitude, random (+ srigl when available).
    c.algorithm = "rigl"
    c.sparsity = 0.9
    c.distribution = "erk"  # uniform, er, erk
    c.update_every = 100  # DST: topology update period; pruning: pruning frequency
    # DST: initial drop fraction (cosine decayed to 0 at end_step); None keeps the
    # algorithm's own default (RigL/SET 0.3, SNFS 0.5).
    c.drop_fraction = config_dict.placeholder(float)
    c.end_fraction = 0.75  # DST updates / pruning stop at end_fraction * total steps
    c.prune_begin_fraction = 0.1  # magnitude / random pruning start at this fraction
    c.algorithm_kwargs = ml_collections.ConfigDict()  # extra keyword args for the factory
    # True: rescale each neuron's initial active weights by sqrt(fan-in / active fan-in)
    # (jaxsparse.sparse_init); False: plain masking of the dense init, as the papers do.
    c.sparse_init = False
    # Optimizer.
    c.optimizer = "sgd"  # sgd (with momentum), adam, adamw
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 0.0
    c.lr_schedule = "cosine"  # cosine, constant, step
    c.lr_decay_epochs = (75, 95)  # step: epochs at which the rate is multiplied ...
    c.lr_decay_factor = 1.0 / 3.0  # ... by this factor
    c.lr_decay_steps = ()  # step: also at these steps (sparse_learning: every 25k iterations)
    c.warmup_steps = 0
    # Loop.
    c.batch_size = 128
    c.epochs = 10
    c.num_steps = 0  # > 0: train for exactly this many steps instead of `epochs`
    c.eval_batch_size = 1000
    c.eval_every_epochs = 1  # test evaluation period in epochs (0: only at the end)
    c.seed = 0
    c.log_every = 50  # steps between host syncs (progress bar, train metrics in JSONL)
    c.checkpoint_every = 0  # steps between checkpoints (0: only at the end)
    c.max_to_keep = 2
    c.progress = True  # tqdm progress bar
    # Also TensorBoard scalars in <workdir>/tensorboard: on when tensorboardX is installed.
    c.tensorboard = importlib.util.find_spec("tensorboardX") is not None
    c.print_table = True  # per-layer sparsity table at the end
    # Host-scheduled topology updates: plain and update steps compile apart and the host
    # picks one per step (jaxsparse.topology_due); the same masks, params to float32
    # rounding, no lax.cond in plain steps (README, "Host-scheduled topology updates").
    c.host_topology = False
    return c
