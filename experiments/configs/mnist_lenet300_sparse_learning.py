"""MNIST LeNet-300-100 under sparse_learning's own protocol (Dettmers & Zettlemoyer 2019,
``mnist_cifar/main.py`` + ``sparselearning/core.py``), the protocol behind its published
table (SET 98.39/98.14/97.74/95.80, SNFS 98.67/98.53/98.20/97.53 at 90/95/98/99%, dense
98.69):

* 54k/6k train/validation split (10% of the training set held out);
* uniform per-layer density (every layer at the target sparsity, not ERK);
* topology updated once per epoch (every 540 steps of batch 100), prune rate 0.5
  cosine-decayed over the whole run (``end_fraction=1``), for SET and SNFS alike;
* SGD, Nesterov momentum 0.9, lr 0.1, x0.1 every 25k iterations, L2 5e-4, 100 epochs.

  python -m experiments.sweep --config experiments/configs/mnist_lenet300_sparse_learning.py \
      --out runs/sl_replica --methods dense,static,set,snfs --sparsities 0.9,0.95,0.98,0.99 \
      --seeds 0,1,2 --set data_dir=../shared/data/mnist

Not replicated: anything of sparse_learning's code beyond the settings above (its
momentum bookkeeping and budget redistribution follow jaxsparse's ``snfs``).
"""

from experiments.configs import base

STEPS_PER_EPOCH = (60000 - 6000) // 100


def get_config():
    c = base.get_config()
    c.dataset = "mnist"
    c.validation_size = 6000  # 54k / 6k
    c.algorithm = "snfs"
    c.distribution = "uniform"
    c.update_every = STEPS_PER_EPOCH
    c.drop_fraction = 0.5
    c.end_fraction = 1.0
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 5e-4
    c.lr_schedule = "step"
    c.lr_decay_epochs = ()
    c.lr_decay_steps = (25000, 50000)
    c.lr_decay_factor = 0.1
    c.batch_size = 100
    c.epochs = 100
    c.eval_every_epochs = 10
    c.log_every = STEPS_PER_EPOCH
    c.checkpoint_every = 0
    return c
