"""Digits (8x8, embedded) with LeNet-300-100 and RigL at 90%: the seconds-long default."""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.validation_size = 0.1  # 10% of the training images
    c.epochs = 20
    c.batch_size = 64
    c.update_every = 20
    return c
