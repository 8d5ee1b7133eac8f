"""MNIST LeNet-300-100 with rigl's published MNIST recipe: batch 100, SGD with Nesterov
momentum 0.9 at learning rate 0.2, divided by 3 at epochs 75 and 95, L2 weight decay 1e-4,
100 epochs. RigL/ERK at 90% by default.

  python -m experiments.train --config=experiments/configs/mnist_lenet300_published.py \
      --config.data_dir=../shared/data/mnist --workdir=/tmp/mnist_published
"""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.dataset = "mnist"
    c.validation_size = 6000  # 54k/6k
    c.epochs = 100
    c.batch_size = 100
    c.learning_rate = 0.2
    c.nesterov = True
    c.lr_schedule = "step"
    c.lr_decay_epochs = (75, 95)
    c.lr_decay_factor = 1.0 / 3.0
    c.weight_decay = 1e-4
    c.update_every = 100
    c.log_every = 200
    c.checkpoint_every = 0
    return c
