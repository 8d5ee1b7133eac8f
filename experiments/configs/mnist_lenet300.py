"""MNIST with LeNet-300-100 (784-300-100-10), SGD momentum, RigL/ERK at 90%.

  python -m experiments.train --config=experiments/configs/mnist_lenet300.py \
      --config.data_dir=../shared/data/mnist --workdir=/tmp/mnist_rigl
"""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.dataset = "mnist"
    c.validation_size = 6000  # 54k/6k, as sparse_learning
    c.epochs = 20
    c.batch_size = 128
    c.learning_rate = 0.05
    c.update_every = 100
    c.log_every = 100
    c.checkpoint_every = 2000
    return c
