"""Fashion-MNIST with LeNet-5, RigL/ERK at 90%."""

from experiments.configs import base
from experiments.models import model_config


def get_config():
    c = base.get_config()
    c.dataset = "fashion_mnist"
    c.validation_size = 6000  # 54k/6k
    c.model = model_config("lenet5")
    c.epochs = 20
    c.learning_rate = 0.05
    c.log_every = 100
    c.checkpoint_every = 2000
    return c
