"""CIFAR-10 (32x32) with the small VGG-style CNN, RigL/ERK at 90%. Needs the CIFAR-10 batch
files (--config.data_dir) or tensorflow-datasets; not verifiable on the project's CI."""

from experiments.configs import base
from experiments.models import model_config


def get_config():
    c = base.get_config()
    c.dataset = "cifar10"
    c.validation_size = 5000  # 45k/5k
    c.model = model_config("vgg")
    c.epochs = 60
    c.learning_rate = 0.05
    c.weight_decay = 5e-4
    c.log_every = 100
    c.checkpoint_every = 2000
    return c
